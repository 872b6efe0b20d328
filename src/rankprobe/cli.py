"""The `rankprobe` command: demo, train, sweep, scan, probe, report, export. The only place that reads argv.

Every subcommand that takes a config also takes dotted overrides (`--model.n_layer 22`). User
mistakes (UserError) print one line and exit 2; nothing is written before the inputs are checked.
A single run whose loss went NaN/inf exits 1; a sweep carries on with its other arms.

`train` also runs under torchrun (`torchrun --nproc_per_node N -m rankprobe.cli train ...`): every
rank runs this same command; rank 0 alone prints, the others stop with it (rankprobe.dist).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .coerce import unknown_key
from .config import all_keys, field_docs, load, preset_names
from .errors import ConfigError, UserError
from .runfolder import EXIT_DIVERGED

EXIT_USAGE = 2


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--model.n_layer', '22', '--train.seed=3'] -> {'model.n_layer': '22', 'train.seed': '3'}."""
    out: dict[str, str] = {}
    valid, i = all_keys(), 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (overrides look like --model.n_layer 22)")
        key, eq, value = arg[2:].partition("=")
        if key not in valid:  # now, before a misspelt option (--resum) takes the next flag as its value
            raise unknown_key(key, valid)
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} needs a value")
            i += 1
            value = args[i]
        out[key] = value
        i += 1
    return out


def _override_help() -> str:
    docs = field_docs()
    width = max(len(k) for k in all_keys()) + 4
    lines = ["config overrides (any of these as --KEY VALUE; lists as a,b,c):"]
    lines += [f"  --{k:<{width}}{docs.get(k, '')}" for k in all_keys() if not k.startswith(("name", "out"))]
    return "\n".join(lines)


def _parallel_options(parser: argparse.ArgumentParser, what: str) -> None:
    par = parser.add_mutually_exclusive_group()
    par.add_argument("--workers", type=int, default=0, metavar="N",
                     help=f"train N {what} at a time in subprocesses (default: one after another in this process)")
    par.add_argument("--gpus", type=int, default=0, metavar="N",
                     help=f"train N {what} at a time (N × K with --per-gpu K), each worker pinned to one GPU")
    parser.add_argument("--per-gpu", type=int, default=1, metavar="K",
                        help=f"with --gpus: K {what} at a time on each GPU, if they fit in its memory together "
                             "(default: 1); their set-up, compiling and probes then overlap the others' training")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `rankprobe: error:` line (exit 2) like every other bad input,
    not the usage block followed by a second line. Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"rankprobe: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    presets = ", ".join(preset_names())
    p = _Parser(
        prog="rankprobe", allow_abbrev=False,
        description="Train LLaMA-style decoders under optimizer × QK-Norm arms and probe the rank of attention keys.",
    )
    p.add_argument("--version", action="version", version=f"rankprobe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    d = sub.add_parser("demo", allow_abbrev=False, help="the 4-arm study on the embedded corpus, tiny and on the CPU",
                       description="Run the `demo` preset sweep and write its report.",
                       epilog=_override_help(), formatter_class=fmt)
    d.add_argument("--out", default="rankprobe-demo", help="output folder (default: rankprobe-demo)")

    t = sub.add_parser("train", allow_abbrev=False, help="train one arm",
                       description=f"Train one arm from CONFIG (a TOML file or a preset: {presets}).",
                       epilog=_override_help(), formatter_class=fmt)
    t.add_argument("config", metavar="CONFIG")
    t.add_argument("--out", help="run folder (default: <config out>/<config name>)")
    mode = t.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue the run in the folder from its last checkpoint (metrics cut back to it)")
    mode.add_argument("--force", action="store_true", help="replace a run already in the folder")

    s = sub.add_parser("sweep", allow_abbrev=False, help="train every arm of a grid, then build the report",
                       description=f"Run every arm of CONFIG's [sweep] grid (a TOML file or a preset: {presets}); "
                                   "arms already finished are skipped.",
                       epilog=_override_help(), formatter_class=fmt)
    s.add_argument("config", metavar="CONFIG")
    s.add_argument("--out", help="sweep folder (default: the config's out)")
    s.add_argument("--force", action="store_true", help="retrain every arm, replacing the runs in the folder")
    _parallel_options(s, "arms")

    # internal: one arm of a parallel sweep, from its resolved config (rankprobe.sweep)
    a = sub.add_parser("_arm", allow_abbrev=False)
    a.add_argument("config", metavar="CONFIG_JSON")
    a.add_argument("--out", required=True)
    arm_mode = a.add_mutually_exclusive_group()
    arm_mode.add_argument("--resume", action="store_true")
    arm_mode.add_argument("--force", action="store_true")

    sc = sub.add_parser("scan", allow_abbrev=False, help="one run per value of a setting (e.g. a learning-rate scan)",
                        description=f"Train CONFIG (a TOML file or a preset: {presets}) once per value of one "
                                    "dotted setting and write scan.md with the final validation loss of each; "
                                    "runs already ended are skipped.",
                        epilog=_override_help(), formatter_class=fmt)
    sc.add_argument("config", metavar="CONFIG")
    sc.add_argument("--param", required=True, help="the dotted setting to scan, e.g. optim.lr, optim.muon_lr or optim.hidden_lr")
    sc.add_argument("--values", required=True, help="comma-separated values, e.g. 1e-3,3e-3,1e-2")
    sc.add_argument("--out", help="scan folder (default: <config out>/scan-<param>)")
    sc.add_argument("--force", action="store_true", help="retrain every value from scratch")
    _parallel_options(sc, "runs")

    _probe_parser(sub)
    r = sub.add_parser("report", allow_abbrev=False, help="rebuild figures and report.md from metrics files",
                       description="Rebuild every figure and report.md under DIR from its metrics.jsonl files alone.")
    r.add_argument("dir", metavar="DIR")
    r.add_argument("--metric", choices=("pr", "erank", "stable_rank", "rankme"), default="pr",
                   help="spectral metric for the figures and headline (default: pr)")
    r.add_argument("--tap", choices=("proj", "norm", "rope"),
                   help="key tap for the headline (default: the runs' probe.tap)")

    e = sub.add_parser("export", allow_abbrev=False, help="metrics files as CSV, Parquet or TensorBoard",
                       description="Write every run under DIR in the long format of `rankprobe.load` (one line per "
                                   "number: run, arm, seed, step, tokens, kind, tap, tensor, layer, head, metric, "
                                   "value) as metrics.csv or metrics.parquet, or replay its rows into TensorBoard "
                                   "event files (one folder per run under tensorboard/).")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--to", required=True, choices=("csv", "parquet", "tensorboard"), help="the format")
    e.add_argument("--out", help="output folder (default: DIR)")
    return p


def _probe_parser(sub) -> None:
    """`rankprobe probe`: checkpoints RankProbe did not train (probes/hf.py)."""
    pr = sub.add_parser("probe", allow_abbrev=False, help="probe checkpoints RankProbe did not train",
                        description="Probe CHECKPOINT — a Hugging Face causal LM folder (every family in "
                                    "docs/probes.md) or a RankProbe run folder — with every lens, into a metrics "
                                    "folder that `rankprobe report` draws next to trained arms. Several "
                                    "checkpoints (folders, globs, a Trainer output folder of checkpoint-N, "
                                    "Pythia-style stepN) become one run, a trajectory over their steps.")
    pr.add_argument("checkpoint", metavar="CHECKPOINT", nargs="+")
    pr.add_argument("--out", help="output folder (default: <first CHECKPOINT name>-probe)")
    pr.add_argument("--arm", help="arm name in the report (default: hf:<model_type>)")
    pr.add_argument("--tokens-per-step", type=int, metavar="N",
                    help="training tokens per step, for checkpoints that do not record their token count")
    pr.add_argument("--corpus", default="embedded",
                    help="probe text for HF models, tokenized with the model's own tokenizer (default: embedded); "
                         "a RankProbe run is probed on its own held-out probe set")
    pr.add_argument("--tokens", type=int, default=16384, help="probe tokens (default: 16384)")
    pr.add_argument("--seq-len", type=int, default=512, help="sequence length for HF models (default: 512)")
    pr.add_argument("--allow-long-context", action="store_true",
                    help="allow --seq-len beyond the model's position count (recorded in the run row)")
    pr.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    pr.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32",
                    help="weights and activations (default: fp32); the statistics are float64 either way")
    pr.add_argument("--force", action="store_true", help="replace an earlier probe in the output folder")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    from .dist import MirroredError, from_env

    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        if from_env().active and args.command != "train":
            raise UserError(f"only `rankprobe train` runs under torchrun; run `rankprobe {args.command}` "
                            "as one process (a sweep spreads over GPUs with --gpus N)")
        if args.command == "probe":
            if rest:
                raise UserError(f"unexpected arguments: {' '.join(rest)}")
            return _probe(args)
        if args.command == "report":
            if rest:
                raise UserError(f"unexpected arguments: {' '.join(rest)}")
            return _report(args)
        if args.command == "export":
            if rest:
                raise UserError(f"unexpected arguments: {' '.join(rest)}")
            return _export(args)
        if args.command == "_arm":  # the worker of a parallel sweep: its resolved config on stdin
            from .config import from_dict
            from .sweep import die_with_parent

            die_with_parent()
            try:
                data = json.loads(sys.stdin.read() if args.config == "-" else Path(args.config).read_text())
            except ValueError as e:  # UnicodeDecodeError too: the sweep writes JSON, not whatever was given
                raise ConfigError(f"_arm: {args.config} is not a resolved config in JSON ({e})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"_arm: {args.config} is not a resolved config (a JSON table)")
            return _train(from_dict(data), args)
        overrides = parse_overrides(rest)
        if args.command == "scan":  # each value a run of the preset's arm, as `train` makes it
            return _scan(_arm_settings(load(args.config, overrides), overrides), args)
        if args.command == "demo":
            return _sweep(load("demo", overrides), Path(args.out), force=False)
        cfg = load(args.config, overrides)
        if args.command == "train":
            return _train(_arm_settings(cfg, overrides), args)
        return _sweep(cfg, Path(args.out or cfg.out), force=args.force, workers=args.workers, gpus=args.gpus,
                      per_gpu=args.per_gpu)
    except UserError as e:
        if rank == 0:
            print(f"rankprobe: error: {e}", file=sys.stderr)
        elif not isinstance(e, MirroredError):  # rank 0 printed the mirrored ones already
            print(f"rankprobe: error (rank {rank}): {e}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = " ".join(str(e).split())
        if not isinstance(e, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        print(f"rankprobe: error: out of memory ({text[:160]}); make the model, batch or sequence smaller",
              file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the machine refused a file operation: a read-only folder, a full disk, a bad path
        where = f" ({e.filename})" if e.filename else ""
        print(f"rankprobe: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("rankprobe: interrupted", file=sys.stderr)
        return 130


def _arm_settings(cfg, overrides: dict[str, str]):
    """The run `train` (or each run of a `scan`) makes of a preset with `sweep.settings` is its arm as a
    sweep makes it: the
    settings of its arm (by optimizer and label) apply, and the command line's own overrides win over
    them. Said in one line when they change something, so nobody trains a preset's arm at another rate
    unknowingly."""
    from .config import arm_label, flatten, to_dict
    from .sweep import with_settings

    label = cfg.arm or arm_label(cfg.optim.name, cfg.model.qk_norm, cfg.optim.qk_clip)
    armed = with_settings(cfg, label, keep=overrides)
    before, after = flatten(to_dict(cfg)), flatten(to_dict(armed))
    changed = [f"{k} = {after[k]!r}" for k in after if k in before and before[k] != after[k]]
    if changed:
        print(f"rankprobe: arm {label} takes the preset's sweep.settings: {', '.join(changed)}", file=sys.stderr)
    return armed


def _train(cfg, args) -> int:
    from . import dist
    from .runfolder import end_of, read_rows
    from .optim.hidden import check
    from .train import train

    check(cfg.optim)  # a bad optim.cls or optim.kwargs fails before the corpus is read
    run_dir = Path(args.out) if args.out else Path(cfg.out) / cfg.name
    t0 = time.perf_counter()
    d = dist.init(cfg.train.device)
    try:
        metrics = train(cfg, run_dir, force=args.force, resume=args.resume, dist=d)
    finally:
        dist.close(d)
    if not d.is_main:
        # Rank 0 wrote the run folder; this rank holds nothing left to write. Ending it here skips the
        # interpreter's finalization, where gloo's threads aborted a finished rank now and then
        # (SIGABRT, "terminate called without an active exception": torchrun then failed a finished run).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    end = end_of(read_rows(metrics)) or {}
    if end.get("status") == "diverged":
        print(f"rankprobe: {cfg.name} diverged at {end.get('tokens'):,} tokens (step {end.get('step')}); "
              f"metrics in {metrics}", file=sys.stderr)
        return EXIT_DIVERGED
    print(f"rankprobe: trained {cfg.name} in {time.perf_counter() - t0:.0f} s; metrics in {metrics}")
    return 0


def _check_parallel(workers: int, gpus: int, per_gpu: int = 1) -> None:
    if workers < 0 or gpus < 0:
        raise UserError("--workers and --gpus take a number of processes, 1 or more")
    if per_gpu < 1:
        raise UserError("--per-gpu takes a number of runs at a time on each GPU, 1 or more")
    if per_gpu > 1 and not gpus:
        raise UserError("--per-gpu needs --gpus N (without GPUs, --workers N runs N at a time)")
    if gpus:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < gpus:
            raise UserError(f"--gpus {gpus} but this machine has {found} CUDA device(s) visible; use --gpus "
                            f"{found} or --workers N for processes that share the devices (or the CPU)")


def _in_parallel(run, n: int, done: str) -> int:
    """Call `run()` (a sweep or scan of `n` runs); on ArmsFailed name each failed run and its log."""
    from .sweep import ArmsFailed

    t0 = time.perf_counter()
    try:
        run()
    except ArmsFailed as e:
        for name, code, log_path in e.failures:
            print(f"rankprobe: run {name} failed (exit {code}); log: {log_path}", file=sys.stderr)
        print(f"rankprobe: {n - len(e.failures)} of {n} runs ended in {time.perf_counter() - t0:.0f} s; {done}",
              file=sys.stderr)
        return EXIT_DIVERGED
    print(f"rankprobe: {n} runs in {time.perf_counter() - t0:.0f} s; {done}")
    return 0


def _sweep(cfg, out: Path, force: bool, workers: int = 0, gpus: int = 0, per_gpu: int = 1) -> int:
    from .sweep import arms, run_sweep

    _check_parallel(workers, gpus, per_gpu)
    return _in_parallel(lambda: run_sweep(dataclasses.replace(cfg, out=str(out)), out, force=force,
                                          workers=gpus * per_gpu or workers, gpus=gpus),
                        len(arms(cfg)), f"report: {out / 'report.md'}")


def _scan(cfg, args) -> int:
    from .sweep import run_scan

    _check_parallel(args.workers, args.gpus, args.per_gpu)
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    out = Path(args.out) if args.out else Path(cfg.out) / f"scan-{args.param}"
    return _in_parallel(lambda: run_scan(cfg, out, args.param, values, force=args.force,
                                         workers=args.gpus * args.per_gpu or args.workers, gpus=args.gpus),
                        len(values), f"table: {out / 'scan.md'}")


def _probe(args) -> int:
    from .probes.hf import probe_checkpoint

    path = probe_checkpoint(args.checkpoint, args.out, corpus=args.corpus, n_tokens=args.tokens,
                            seq_len=args.seq_len, batch_size=args.batch_size, device=args.device, force=args.force,
                            dtype=args.dtype, arm=args.arm, tokens_per_step=args.tokens_per_step,
                            allow_long_context=args.allow_long_context)
    what = args.checkpoint[0] if len(args.checkpoint) == 1 else f"{len(args.checkpoint)} checkpoint arguments"
    print(f"rankprobe: probed {what}; metrics in {path}")
    return 0


def _export(args) -> int:
    from .frame import export

    print(f"rankprobe: wrote {export(Path(args.dir), args.to, args.out)}")
    return 0


def _report(args) -> int:
    from .report import build_report

    path = build_report(Path(args.dir), tap=args.tap, metric=args.metric)
    print(f"rankprobe: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
