"""What the public Monitor costs inside a training loop (issue 16, item 4): the numbers for BENCHMARKS.md.

Two loops, each timed step by step (a device sync after every step), without and with the Monitor:
  hf    a transformers `Trainer.train()` of LlamaForCausalLM at the shape, bf16 on CUDA, without the
        callback, with `RankProbeCallback(every=K)` (from the training forward), and with the
        fixed-batch mode (`probe_tokens`, the probe set of seed-22l: 64 × 1024 tokens);
  loop  RankProbe's own TrainStep (compile mode auto: regional on one GPU), without the Monitor and
        with `Monitor.watch` at every K-th step.
For each: the median unmonitored step, the extra time of a measured step (its time minus that median;
the weight spectra included unless --no-weights), and the overhead at cadence K = extra / (K · median),
the share of wall time the monitor adds. Data are fixed random tokens (loading is not measured).

    PYTHONPATH=src python benchmarks/monitor_overhead.py --json monitor.json          # H200: a few minutes
    PYTHONPATH=src python benchmarks/monitor_overhead.py --smoke --json smoke.json    # CPU, tiny shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

SHAPES = {  # seed-22l (presets/seed-22l.toml), and a tiny one for the CPU
    "seed-22l": dict(n_layer=22, d_model=768, n_head=12, head_dim=64, seq_len=1024, vocab=8192, batch=32, probe=64),
    "tiny": dict(n_layer=2, d_model=64, n_head=2, head_dim=32, seq_len=32, vocab=256, batch=4, probe=4),
}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float], measured: set[int], every: int, warmup: int) -> dict:
    """Median unmonitored step, mean extra of a measured step, overhead at the cadence (after warm-up)."""
    plain = [t for i, t in enumerate(times) if i >= warmup and i not in measured]
    extra = [times[i] - statistics.median(plain) for i in sorted(measured) if i >= warmup]
    med = statistics.median(plain)
    out = {"median_step_s": med, "steps": len(times), "measured_steps": len(extra)}
    if extra:
        out |= {"extra_per_measured_step_s": statistics.mean(extra),
                "overhead_at_cadence": statistics.mean(extra) / (every * med)}
    return out


# ---------------------------------------------------------------------------------------------
# the transformers Trainer


def hf_section(shape: dict, steps: int, every: int, warmup: int, device, weights: bool) -> dict:
    import transformers

    from rankprobe.integrations.hf_callback import RankProbeCallback

    class Clock(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync(device)  # after the monitor's on_step_end: callbacks run in list order
            self.times.append(time.perf_counter() - self.t0)

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
    for name, cb in (("without", None), ("train_forward", dict(every=every)),
                     ("fixed_batch", dict(every=every, probe_tokens=probe))):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg)
        clock = Clock()
        callbacks = ([RankProbeCallback(weights=weights, batch_size=8, **cb)] if cb else []) + [clock]
        with tempfile.TemporaryDirectory() as tmp:
            args = transformers.TrainingArguments(
                output_dir=tmp, max_steps=steps, per_device_train_batch_size=s["batch"], learning_rate=3e-4,
                bf16=device.type == "cuda", use_cpu=device.type != "cuda", report_to=[], save_strategy="no",
                logging_steps=10**9, disable_tqdm=True, dataloader_num_workers=0)
            transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks).train()
        measured = set() if cb is None else {i for i in range(steps) if i % every == 0}
        out[name] = summarize(clock.times, measured, every, warmup)
        del model
    return out


# ---------------------------------------------------------------------------------------------
# RankProbe's own loop


def loop_section(shape: dict, steps: int, every: int, warmup: int, device, weights: bool) -> dict:
    from rankprobe.config import load
    from rankprobe.dist import Dist
    from rankprobe.loop import TrainStep
    from rankprobe.monitor import Monitor

    s = shape
    cfg = load("seed-22l", {"model.n_layer": str(s["n_layer"]), "model.d_model": str(s["d_model"]),
                            "model.n_head": str(s["n_head"]), "model.head_dim": str(s["head_dim"]),
                            "model.seq_len": str(s["seq_len"]), "model.vocab_size": str(s["vocab"]),
                            "train.batch_size": str(s["batch"]), "train.device": device.type})
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, s["vocab"], (s["batch"], s["seq_len"] + 1), generator=g).to(device)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    out = {}
    for name in ("without", "train_forward"):
        step_fn = TrainStep(cfg, device, Dist())
        # made before the first (compiling) step, so the compiled regions guard on the monitor's hooks
        monitor = Monitor(step_fn.model, every=every, weights=weights) if name != "without" else None
        times = []
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            if monitor is None:
                step_fn(x, y, 1.0)
            else:
                with monitor.watch(i):  # a measured step ends with host numbers: it has synced
                    step_fn(x, y, 1.0)
            _sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = summarize(times, set() if monitor is None else {i for i in range(steps) if i % every == 0},
                              every, warmup)
        if monitor is not None:
            probe = torch.randint(0, s["vocab"], (s["probe"], s["seq_len"]), generator=g).to(device)
            _sync(device)
            t0 = time.perf_counter()
            monitor.probe(probe)
            out["fixed_batch_probe_s"] = time.perf_counter() - t0
            monitor.close()
        step_fn.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU, few steps")
    p.add_argument("--steps", type=int, default=0, help="steps per arm (default 310; smoke 5)")
    p.add_argument("--every", type=int, default=0, help="the monitor's cadence (default 100; smoke 2)")
    p.add_argument("--sections", default="hf,loop")
    p.add_argument("--no-weights", action="store_true", help="leave the weight spectra out of the measured steps")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    shape = SHAPES["tiny" if args.smoke else "seed-22l"]
    steps = args.steps or (5 if args.smoke else 310)
    every = args.every or (2 if args.smoke else 100)
    warmup = 1 if args.smoke else 10
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    R = {"shape": shape, "steps": steps, "every": every, "device": str(device), "torch": torch.__version__,
         "weights": not args.no_weights}
    for sec in args.sections.split(","):
        fn = {"hf": hf_section, "loop": loop_section}[sec]
        R[sec] = fn(shape, steps, every, warmup, device, not args.no_weights)
        print(sec, json.dumps(R[sec], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
