"""What the public Monitor costs inside a training loop (issue 16, item 4): the numbers for BENCHMARKS.md.

Two loops, each timed step by step (a device sync after every step), without and with the Monitor:
  hf    a transformers `Trainer.train()` of LlamaForCausalLM at the shape, bf16 on CUDA, without the
        callback, with `RankProbeCallback(every=K)` (from the training forward), and with the
        fixed-batch mode (`probe_tokens`, the probe set of seed-22l: 64 × 1024 tokens);
  loop  RankProbe's own TrainStep (compile mode auto: regional on one GPU), without the Monitor and
        with `Monitor.start` / `finish` around every step (what `watch` does), due every K-th step.
For each: the median unmonitored step, the extra time of a measured step (its time minus that median;
the weight spectra included unless --no-weights), and the overhead at cadence K = extra / (K · median),
the share of wall time the monitor adds. Data are fixed random tokens (loading is not measured).

Measured steps are the steps in which the monitor measured (`Monitor.measurements`; `measured_at`,
0-based step indices): the Trainer's `on_step_end` sees `global_step` already advanced, so the fixed-batch mode
probes at the end of steps K-1, 2K-1, …, and its step-0 probe runs in `on_train_begin` (timed apart,
`train_begin_s`). Each measured step is split (`split`) at a sync between the training work and the
monitor's work after it:
  capture_s     the step's training work minus the median step: the hooks copying q/k/v into the
                float64 sums and the attention lens's scores; in the loop also the eager run of the
                compiled regions (`eager_step_s` is a hook-free eager step, for comparison);
  statistics_s  `finish` (or, fixed-batch, the whole probe: its forward passes and statistics), with
                the Monitor's own parts (`Monitor.cost`: spectra_s, attention_s, weights_s; or
                lenses_s, weights_s).
With the Monitor's `background` (`--background`; auto: on with CUDA, as the Monitor's default; each
arm records `background`), a measured step pays only the device halves and the host halves run on a
worker thread while training goes on; what the user pays is then the measured step's extra time, which
includes any wait for the previous measurement's host half (`wait_s` in the split), plus the wait for
the last one at the end (`flush_s`: the loop's `flush`; `train_end_s`: the callback's `on_train_end`).
`next_step_extra_s` is the step after a measured one minus the median, where the worker is busiest.

    PYTHONPATH=src python benchmarks/monitor_overhead.py --json monitor.json          # H200: a few minutes
    PYTHONPATH=src python benchmarks/monitor_overhead.py --smoke --json smoke.json    # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from rankprobe.probes import moments

SHAPES = {  # seed-22l (presets/seed-22l.toml), and a tiny one for the CPU
    "seed-22l": dict(n_layer=22, d_model=768, n_head=12, head_dim=64, seq_len=1024, vocab=8192, batch=32, probe=64),
    "tiny": dict(n_layer=2, d_model=64, n_head=2, head_dim=32, seq_len=32, vocab=256, batch=4, probe=4),
}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float], measured: set[int], every: int, warmup: int, work: list[float] | None = None,
              costs: dict[int, dict] | None = None) -> dict:
    """Median unmonitored step, mean extra of a measured step, overhead at the cadence (after warm-up),
    and the measured steps' split: `work` is each step's time up to the monitor's closing work,
    `costs` the Monitor's own parts of each measured step."""
    plain = [t for i, t in enumerate(times) if i >= warmup and i not in measured]
    med = statistics.median(plain)
    at = [i for i in sorted(measured) if i >= warmup]
    out = {"median_step_s": med, "steps": len(times), "measured_steps": len(at), "measured_at": sorted(measured)}
    if at:
        extra = statistics.mean(times[i] - med for i in at)
        out |= {"extra_per_measured_step_s": extra, "overhead_at_cadence": extra / (every * med)}
        after = [times[i + 1] - med for i in at if i + 1 < len(times) and i + 1 not in measured]
        if after:
            out["next_step_extra_s"] = statistics.mean(after)
    if at and work is not None:
        split = {"capture_s": statistics.mean(work[i] - med for i in at),
                 "statistics_s": statistics.mean(times[i] - work[i] for i in at)}
        for key in (costs or {}).get(at[0], {}):
            split[key] = statistics.mean(costs[i][key] for i in at)
        out["split"] = split
    return out


# ---------------------------------------------------------------------------------------------
# the transformers Trainer


def _hf_clock(device, monitor_cb):
    """Callbacks around the monitor's (callbacks run in list order): the first starts each step's
    clock and marks the end of its training work, the last stops the clock after the monitor's
    `on_step_end` and notes whether the monitor measured in that step."""
    import transformers

    rec = {"times": [], "work": [], "measured": set(), "costs": {}, "train_begin_s": 0.0, "train_end_s": 0.0}

    def measurements() -> int:
        return monitor_cb.monitor.measurements if monitor_cb else 0

    def now() -> float:
        _sync(device)
        return time.perf_counter()

    class Before(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["t0"] = now()

        def on_step_begin(self, args, state, control, **kw):
            rec["t0"], rec["n"] = now(), measurements()

        def on_step_end(self, args, state, control, **kw):
            rec["mid"] = now()

        def on_train_end(self, args, state, control, **kw):
            rec["t0"] = now()

    class After(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            rec["train_begin_s"] = now() - rec["t0"]  # the monitor's set-up and, fixed-batch, its step-0 probe

        def on_step_end(self, args, state, control, **kw):
            end, i = now(), len(rec["times"])
            rec["times"].append(end - rec["t0"])
            rec["work"].append(rec["mid"] - rec["t0"])
            if measurements() > rec["n"]:
                rec["measured"].add(i)
                rec["costs"][i] = dict(monitor_cb.monitor.cost)

        def on_train_end(self, args, state, control, **kw):
            rec["train_end_s"] = now() - rec["t0"]  # the monitor's flush (the last host half) and close

    return rec, [Before(), *([monitor_cb] if monitor_cb else []), After()]


def hf_section(shape: dict, steps: int, every: int, warmup: int, device, weights: bool, background) -> dict:
    import transformers

    from rankprobe.integrations.hf_callback import RankProbeCallback

    s = shape
    cfg = transformers.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["d_model"], num_hidden_layers=s["n_layer"],
                                   num_attention_heads=s["n_head"], num_key_value_heads=s["n_head"],
                                   head_dim=s["head_dim"], intermediate_size=64 * -(-8 * s["d_model"] // 192),
                                   max_position_embeddings=s["seq_len"], attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, s["vocab"], (s["batch"] * steps, s["seq_len"]), generator=g)
    dataset = [{"input_ids": x, "labels": x} for x in data]
    probe = torch.randint(0, s["vocab"], (s["probe"], s["seq_len"]), generator=g)
    out = {}
    for name, kw in (("without", None), ("train_forward", dict(every=every)),
                     ("fixed_batch", dict(every=every, probe_tokens=probe))):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        cb = RankProbeCallback(weights=weights, batch_size=8, background=background, **kw) if kw else None
        rec, callbacks = _hf_clock(device, cb)
        with tempfile.TemporaryDirectory() as tmp:
            args = transformers.TrainingArguments(
                output_dir=tmp, max_steps=steps, per_device_train_batch_size=s["batch"], learning_rate=3e-4,
                bf16=device.type == "cuda", use_cpu=device.type != "cuda", report_to=[], save_strategy="no",
                logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0)
            transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks).train()
        out[name] = summarize(rec["times"], rec["measured"], every, warmup, rec["work"], rec["costs"])
        out[name] |= {"train_begin_s": rec["train_begin_s"], "train_end_s": rec["train_end_s"]}
        if cb is not None:
            out[name]["background"] = cb.monitor.background
        del model
    return out


# ---------------------------------------------------------------------------------------------
# RankProbe's own loop


def loop_section(shape: dict, steps: int, every: int, warmup: int, device, weights: bool, background) -> dict:
    from rankprobe.config import load
    from rankprobe.dist import Dist
    from rankprobe.loop import TrainStep, autocast
    from rankprobe.monitor import Monitor

    s = shape
    cfg = load("seed-22l", {"model.n_layer": str(s["n_layer"]), "model.d_model": str(s["d_model"]),
                            "model.n_head": str(s["n_head"]), "model.head_dim": str(s["head_dim"]),
                            "model.seq_len": str(s["seq_len"]), "model.vocab_size": str(s["vocab"]),
                            "train.batch_size": str(s["batch"]), "train.device": device.type})
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"] + 1), generator=g).to(device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def now() -> float:
        _sync(device)
        return time.perf_counter()

    out = {}
    for name in ("without", "train_forward"):
        step_fn = TrainStep(cfg, device, Dist())
        monitor = Monitor(step_fn.model, every=every, weights=weights, background=background) \
            if name != "without" else None
        times, work, measured, costs = [], [], set(), {}
        for i in range(steps):
            t0 = now()
            opened = monitor is not None and monitor.start(i)  # `watch(i)` is start, the block, finish
            step_fn(x, y, 1.0)
            t1 = now()
            if opened:
                monitor.finish()  # with background: the previous measurement's rows
                measured.add(i)
                costs[i] = dict(monitor.cost)
            times.append(now() - t0)
            work.append(t1 - t0)
        out[name] = summarize(times, measured, every, warmup, work, costs)
        if monitor is not None:
            t0 = now()
            monitor.flush()  # the last measurement's host half, under background
            out[name] |= {"flush_s": now() - t0, "background": monitor.background}
            with torch.compiler.set_stance("force_eager"):  # what a measured step runs, without the hooks
                eager = []
                for _ in range(3):
                    t0 = now()
                    step_fn(x, y, 1.0)
                    eager.append(now() - t0)
            out["eager_step_s"] = statistics.median(eager)
            probe = torch.randint(0, s["vocab"], (s["probe"], s["seq_len"]), generator=g).to(device)
            for key in ("fixed_batch_probe_first_s", "fixed_batch_probe_s"):  # the first one warms up
                t0 = now()
                with autocast(device, step_fn.amp):  # as the trainer's probes (and accelerate's wrapped forward)
                    monitor.probe(probe)
                out[key] = now() - t0
            out["fixed_batch_probe_split"] = dict(monitor.cost)
            t0 = now()
            monitor.close()  # flushes: the second probe's host half, under background
            out["fixed_batch_flush_s"] = now() - t0
        step_fn.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, few steps")
    p.add_argument("--steps", type=int, default=0, help="steps per arm (default 310; smoke 5)")
    p.add_argument("--every", type=int, default=0, help="the monitor's cadence (default 100; smoke 2)")
    p.add_argument("--sections", default="hf,loop")
    p.add_argument("--no-weights", action="store_true", help="leave the weight spectra out of the measured steps")
    p.add_argument("--background", choices=("auto", "on", "off"), default="auto",
                   help="the Monitor's host halves on a worker thread (auto: on with CUDA, its default)")
    p.add_argument("--fused-sums", choices=("default", "on", "off"), default="default",
                   help="the hooks' moment sums eager or fused (moments.FUSED; default: as the package sets it)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    shape = SHAPES["tiny" if args.smoke else "seed-22l"]
    steps = args.steps or (5 if args.smoke else 310)
    every = args.every or (2 if args.smoke else 100)
    warmup = 1 if args.smoke else 10
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.fused_sums != "default":
        moments.FUSED = args.fused_sums == "on"
    R = {"shape": shape, "steps": steps, "every": every, "device": str(device), "torch": torch.__version__,
         "weights": not args.no_weights, "background": args.background, "fused_sums": moments.FUSED}
    for sec in args.sections.split(","):
        fn = {"hf": hf_section, "loop": loop_section}[sec]
        R[sec] = fn(shape, steps, every, warmup, device, not args.no_weights,
                    {"auto": None, "on": True, "off": False}[args.background])
        print(sec, json.dumps(R[sec], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
