"""The grid of arms: optimizers × QK-Norm × seeds, one run directory each, finished arms skipped."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from .config import Config
from .data.tokens import prepare
from .train import arm_label, ensure_writable, train

log = logging.getLogger(__name__)


def arms(cfg: Config) -> list[Config]:
    """One resolved Config per (optimizer, qk_norm, seed), named '<arm>-s<seed>'."""
    out = []
    for opt in cfg.sweep.optimizers:
        for qk in cfg.sweep.qk_norm:
            for seed in cfg.sweep.seeds:
                out.append(replace(
                    cfg, name=f"{arm_label(opt, qk)}-s{seed}",
                    optim=replace(cfg.optim, name=opt),
                    model=replace(cfg.model, qk_norm=qk),
                    train=replace(cfg.train, seed=seed),
                ))
    return out


def is_finished(run_dir: Path) -> bool:
    """A run is finished when the last complete line of its metrics file is an `end` row."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line).get("kind") == "end"
        except json.JSONDecodeError:
            continue
    return False


def run_sweep(cfg: Config, out_dir: Path, report: bool = True) -> list[Path]:
    """Train every arm not already finished under `out_dir`, then build the report there."""
    out_dir = Path(out_dir)
    ensure_writable(out_dir)
    grid = arms(cfg)
    todo = [a for a in grid if not is_finished(out_dir / a.name)]
    for a in grid:
        if a not in todo:
            log.info("skip %s: already finished", a.name)
    data = prepare(cfg.data, cfg.model.seq_len, cfg.train.batch_size) if todo else None
    for i, a in enumerate(todo):
        log.info("[%d/%d] training %s", i + 1, len(todo), a.name)
        # an unfinished folder is a run that was cut off; it restarts from scratch
        train(a, out_dir / a.name, data=data, force=True)
    paths = [out_dir / a.name / "metrics.jsonl" for a in grid]
    if report:
        from .report import build_report

        build_report(out_dir)
    return paths
