"""The grid of arms: optimizers × QK-Norm × seeds, one run directory each, ended arms skipped.

Re-running a sweep on its folder is safe: arms that ended (finished or diverged) are not touched, an
arm that was cut off resumes from its checkpoint (or starts over if it has none), and the folder is
locked so that a second sweep on it stops at once instead of interleaving writes.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from .checkpoint import METRICS, config_differences, end_row, first_row, folder_lock
from .config import Config, UserError, arm_label, parse_arm, to_dict
from .data.tokens import prepare
from .runlog import ensure_writable
from .train import train

log = logging.getLogger(__name__)


def arms(cfg: Config) -> list[Config]:
    """One resolved Config per (arm, seed), named '<arm>-s<seed>'. The arms are `sweep.arms` when
    given (e.g. a fifth arm 'muon+qkclip'), else the optimizers × qk_norm grid."""
    labels = cfg.sweep.arms or [arm_label(o, q) for o in cfg.sweep.optimizers for q in cfg.sweep.qk_norm]
    out = []
    for label in labels:
        opt, qk_norm, qk_clip = parse_arm(label)
        for seed in cfg.sweep.seeds:
            out.append(replace(
                cfg, name=f"{label}-s{seed}",
                optim=replace(cfg.optim, name=opt, qk_clip=qk_clip),
                model=replace(cfg.model, qk_norm=qk_norm),
                train=replace(cfg.train, seed=seed),
            ))
    return out


def is_finished(run_dir: Path) -> bool:
    """A run has ended (finished or diverged) when the last complete row of its metrics file is an
    `end` row; a torn last line (a crash mid-write) is dropped with a warning first."""
    return end_row(Path(run_dir) / METRICS) is not None


def check_arm_folders(grid: list[Config], out_dir: Path) -> None:
    """Refuse to mix runs of different settings in one sweep folder: an arm folder whose run was made
    with other settings would otherwise be skipped as done, or resumed under the wrong config."""
    for a in grid:
        head = first_row(out_dir / a.name / METRICS)
        if head is None or not isinstance(head.get("config"), dict):
            continue
        diffs = config_differences(head["config"], to_dict(a))
        if diffs:
            key, old, new = diffs[0]
            raise UserError(f"{out_dir / a.name} holds a run made with other settings ({key}: {old!r} there, "
                            f"{new!r} now); use another --out, or --force to replace its runs")


def run_sweep(cfg: Config, out_dir: Path, report: bool = True, force: bool = False) -> list[Path]:
    """Train every arm not already ended under `out_dir`, then build the report there. `force`
    retrains every arm from scratch."""
    out_dir = Path(out_dir)
    ensure_writable(out_dir)
    grid = arms(cfg)
    with folder_lock(out_dir):
        if not force:
            check_arm_folders(grid, out_dir)
        todo = [a for a in grid if force or not is_finished(out_dir / a.name)]
        for a in grid:
            if a not in todo:
                log.info("skip %s: already ended", a.name)
        data = prepare(cfg.data, cfg.model.seq_len, cfg.train.batch_size) if todo else None
        for i, a in enumerate(todo):
            log.info("[%d/%d] training %s", i + 1, len(todo), a.name)
            train(a, out_dir / a.name, data=data, force=force, resume=not force)
        paths = [out_dir / a.name / METRICS for a in grid]
        if report:
            from .report import build_report

            build_report(out_dir)
    return paths
