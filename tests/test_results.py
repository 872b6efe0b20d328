"""The published results rebuild from their compressed metrics alone, to the committed report."""

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
    rates = {arm: s["optim.hidden_lr"] for arm, s in settings.items() if "optim.hidden_lr" in s}
    assert set(rates) == {"sgd", "normsgd", "lion", "signum", "adafactor", "soap"}
    for opt, rate in rates.items():
        best = [line for line in (RESULTS / "lr-scan" / opt / "scan.md").read_text().splitlines()
                if "**(best)**" in line]
        assert len(best) == 1, f"{opt}: no single best row in its scan.md"
        value = best[0].split("|")[1].replace("**(best)**", "").strip()
        assert float(value) == pytest.approx(rate), f"{opt}: preset {rate}, scan best {value}"
