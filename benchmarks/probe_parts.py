"""A probe checkpoint's work, one component at a time: where `probe_lenses` spends its time.

benchmarks/throughput.py (section `probes`) calls `probe_parts` and writes its result to the JSON's
`probe.parts` and the Markdown. Each component is timed alone, on the same model and probe set:

- forward: the eager forward over the probe set with a hook on every tap that does nothing;
- moment_sums: `CovStats.add` on every tap's batches (random activations of each tap's shape and
  dtype), the float64 statistics of the spectra and the mechanism lenses; an upper bound, since the
  probe pass's sink computes the sums of a tensor that two taps share once (QK-Norm off);
- attention: `AttentionStats.add` on every layer's rope q and k (entropy and max logit);
- head_batch: the taps' sums to covariances, second moments and moments (`HeadBatch`), on the device;
- transfer: those to host memory;
- host_spectra: eigendecompositions and the spectra (PR, erank, stable rank, RankMe) on the host;
- mechanism: the mechanism lenses (`mechanism_of`) on the host;
- rows: `spectral_rows` whole (head_batch + transfer + host_spectra + mechanism + the nulls).
The components add up to about what `probe_lenses` costs; the rest is hooks and Python.

`token_blocks` times `moment_sums` by the GEMM's split of the tokens, and `fused_sums` its eager passes
against its fused form (torch.compile) on every tap's shape and dtype: what decides
`moments.CUDA_TOKEN_BLOCKS` and `moments.FUSED`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import torch

from rankprobe.probes.capture import adapter_for, covariance_sink, feed, head_groups
from rankprobe.probes.attention import AttentionStats
from rankprobe.probes.lenses import spectral_rows
from rankprobe.probes.mechanism import covariance_eigh, mechanism_of
from rankprobe.probes import moments
from rankprobe.probes.moments import moment_sums
from rankprobe.probes.spectra import CovStats, covariance_spectrum, spectra_from, to_host

PARTS = {
    "forward": "eager forward over the probe set, a no-op hook on every tap",
    "moment_sums": "CovStats.add on every tap's batches (float64 sums)",
    "attention": "AttentionStats.add on every layer (entropy, max logit)",
    "head_batch": "HeadBatch: covariances and moments of every tap, on the device",
    "transfer": "covariances and moments to host memory",
    "host_spectra": "eigendecompositions and spectra on the host",
    "mechanism": "mechanism lenses (mechanism_of) on the host",
    "rows": "spectral_rows whole",
}


def probe_parts(model, probe_set: torch.Tensor, batch_size: int, amp, measure: Callable[[Callable], float]) -> dict:
    """{component: seconds} for `PARTS`, each `measure(fn)` (the caller's median of timed calls) of a
    function doing that component's work for the whole probe set under `amp` (a context manager)."""
    adapter = adapter_for(model)
    shapes: dict = {}
    stats: dict = {}
    record = covariance_sink(stats)

    def capture(key, x):  # one real pass: each tap's shape and dtype, and real statistics for the host parts
        shapes.setdefault(key, (tuple(x.shape), x.dtype))
        record(key, x)

    with amp:
        feed(adapter, probe_set, batch_size, capture)
    device = next(iter(stats.values())).sum.device
    n_batches = -(-probe_set.size(0) // batch_size)
    g = torch.Generator(device=device).manual_seed(0)
    fakes = {s: torch.randn(*s[0], device=device, generator=g).to(s[1]) for s in set(shapes.values())}

    def forward():
        with amp:
            feed(adapter, probe_set, batch_size, lambda key, x: None)

    def moment_sums():  # under the autocast, as in the hooks (float64 inputs are never cast)
        fresh = {k: CovStats(shape[-2], shape[-1], device=device) for k, (shape, _) in shapes.items()}
        with amp:
            for _ in range(n_batches):
                for k, s in shapes.items():
                    fresh[k].add(fakes[s])

    def attention():
        attn = AttentionStats()
        for _ in range(n_batches):
            for layer in range(adapter.n_layer):
                q, k = (fakes[shapes[("rope", t, layer)]] for t in ("q", "k"))
                spec = adapter.attention(layer)
                attn.add(layer, q, k, spec.scale, spec.window, spec.softcap)
        attn.rows()  # the one transfer

    keys = sorted(stats)
    batches = [hb for _, hb in head_groups(stats, keys)]
    host = [[to_host(t) for t in (hb.cov, hb.second, hb.moments)] for hb in batches]
    eig = [covariance_eigh(cov) for cov, _, _ in host]

    def transfer():
        copies = [to_host(t, wait=False) for hb in batches for t in (hb.cov, hb.second, hb.moments)]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        return copies

    def host_spectra():
        for cov, second, _ in host:
            lam, _ = covariance_eigh(cov)
            spectra_from(cov, lam, covariance_spectrum(second))

    def mechanism():
        for (cov, second, raw), (lam, vec) in zip(host, eig):
            mechanism_of(cov, second, raw, lam, vec)

    work = {"forward": forward, "moment_sums": moment_sums, "attention": attention,
            "head_batch": lambda: head_groups(stats, keys), "transfer": transfer, "host_spectra": host_spectra,
            "mechanism": mechanism, "rows": lambda: spectral_rows(stats)}
    if not any(t == "rope" for t, _, _ in shapes):
        del work["attention"]  # a model without rope taps has no attention lenses
    return {name: measure(fn) for name, fn in work.items()}


def token_blocks(model, probe_set: torch.Tensor, batch_size: int, measure: Callable[[Callable], float],
                 blocks=(1, 2, 4, 8, 16, 32)) -> dict[int, float]:
    """{C: seconds} of `moment_sums(x, C)` on one batch of the key tap (rope k of layer 0) repeated
    once per tap of the pass: how the GEMM's split of the tokens into C batches pays (moments.CUDA_TOKEN_BLOCKS)."""
    adapter = adapter_for(model)
    first: dict = {}
    feed(adapter, probe_set[:batch_size], batch_size, lambda key, x: first.setdefault(key, x.detach().clone()))
    x = first[("rope", "k", 0)]
    x = x.reshape(-1, *x.shape[-2:])
    n_taps = len(first) * -(-probe_set.size(0) // batch_size)

    def run(c: int):
        for _ in range(n_taps):
            moment_sums(x, c)

    return {c: measure(lambda c=c: run(c)) for c in blocks if x.size(0) % c == 0}


def fused_sums(model, probe_set: torch.Tensor, batch_size: int, amp, measure: Callable[[Callable], float]) -> dict:
    """`moment_sums` eager against fused on the probe pass's taps: per distinct (shape, dtype) of a tap's
    batch, `calls` (its taps times the batches of the probe set), the seconds of those calls each way
    (`measure`, under `amp` as in the hooks), `compile_s` of the first fused call and one eager one
    (mostly the compile), and the largest difference of the fused sums from the eager ones relative to
    each sum's largest entry (float64 round-off, ~1e-15, is expected); then the totals over the pass,
    and `default_fused`, moment_sums' default (`moments.FUSED`) when measured."""
    adapter = adapter_for(model)
    seen: dict = {}
    with amp:
        feed(adapter, probe_set[:batch_size], batch_size,
             lambda key, x: seen.setdefault(key, (tuple(x.shape), x.dtype)))
    n_batches = -(-probe_set.size(0) // batch_size)
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for (shape, dtype), taps in sorted(Counter(seen.values()).items(), key=str):
        x = torch.randn(*shape, device=device, generator=g).to(dtype).reshape(-1, *shape[-2:])  # (N, H, D)
        calls = taps * n_batches

        def run(fused: bool, x=x, calls=calls):
            with amp:
                for _ in range(calls):
                    moment_sums(x, fused=fused)

        t0 = time.perf_counter()
        with amp:
            fused = moment_sums(x, fused=True)  # the first call of a shape compiles it
            eager = moment_sums(x, fused=False)
        diff = max(((f - e).abs().max() / e.abs().max()).item() for f, e in zip(fused, eager))  # .item() waits
        rows.append({"shape": list(x.shape), "dtype": str(dtype).removeprefix("torch."), "calls": calls,
                     "compile_s": time.perf_counter() - t0, "max_rel_diff": diff,
                     "eager_s": measure(lambda: run(False)), "fused_s": measure(lambda: run(True))})
    return {"shapes": rows, **{k: sum(r[k] for r in rows) for k in ("eager_s", "fused_s", "compile_s")},
            "default_fused": moments.FUSED}
