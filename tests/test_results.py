"""The published results rebuild from their compressed metrics alone, to the committed report."""

import math
import shutil
from pathlib import Path

import pytest

from rankprobe.report import build_report

RESULTS = Path(__file__).parents[1] / "results"


@pytest.mark.slow
@pytest.mark.parametrize("study", ["seed-study"])
def test_published_report_rebuilds_from_its_metrics(study, tmp_path):
    src = RESULTS / study
    copy = tmp_path / study
    for path in src.rglob("metrics.jsonl.xz"):  # the metrics alone: no figures, no report
        (copy / path.parent.relative_to(src)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy / path.relative_to(src))
    build_report(copy)
    assert (copy / "report.md").read_text() == (src / "report.md").read_text(), (
        f"results/{study}/report.md is stale: rebuild it with `rankprobe report results/{study}`")
    assert sorted(p.name for p in copy.glob("*.png")) == sorted(p.name for p in src.glob("*.png"))


def test_mechanism_preset_rates_are_the_scans_best():
    """Each hidden_lr of the mechanism-22l preset is the best value of its published 5M-token scan (the
    seed study's rule), as its scan.md marks it; a rerun scan that moves the best fails here."""
    from rankprobe.config import load

    settings = load("mechanism-22l").sweep.settings
    rates = {arm: s["optim.hidden_lr"] for arm, s in settings.items() if "optim.hidden_lr" in s and "@" not in arm}
    assert set(rates) == {"sgd", "normsgd", "lion", "signum", "adafactor", "soap"}
    for opt, rate in rates.items():
        best = [line for line in (RESULTS / "lr-scan" / opt / "scan.md").read_text().splitlines()
                if "**(best)**" in line]
        assert len(best) == 1, f"{opt}: no single best row in its scan.md"
        value = best[0].split("|")[1].replace("**(best)**", "").strip()
        assert float(value) == pytest.approx(rate), f"{opt}: preset {rate}, scan best {value}"


def _scan_table(opt: str) -> list[dict]:
    """The rows of results/lr-scan/<opt>/scan.md: value, whether marked best, status, W_k step."""
    lines = (RESULTS / "lr-scan" / opt / "scan.md").read_text().splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")][2:]
    return [{"value": float(r[0].replace("**(best)**", "")), "best": "**(best)**" in r[0], "status": r[1],
             "step": r[-1]} for r in rows]


def test_mechanism_step_arms_take_the_scanned_rate_nearest_adamws_step():
    """Each `<opt>@step` arm of mechanism-22l takes the value of its scan whose W_k step (scan.md's last
    column) is nearest, in ratio, the step of AdamW's scan at its best rate."""
    from rankprobe.config import load

    settings = load("mechanism-22l").sweep.settings
    target = float(next(r for r in _scan_table("adamw") if r["best"])["step"])
    step_arms = {arm.split("@")[0]: s["optim.hidden_lr"] for arm, s in settings.items() if arm.endswith("@step")}
    assert set(step_arms) == {"signum", "lion", "adafactor", "normsgd", "soap"}
    for opt, rate in step_arms.items():
        rows = [r for r in _scan_table(opt) if r["status"] == "finished"]
        nearest = min(rows, key=lambda r: abs(math.log(float(r["step"]) / target)))
        assert nearest["value"] == pytest.approx(rate), f"{opt}@step: preset {rate}, nearest step at {nearest['value']}"
