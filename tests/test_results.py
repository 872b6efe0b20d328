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
