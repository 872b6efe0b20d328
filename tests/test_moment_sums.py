"""The fast path of the probe statistics (`moments.moment_sums`, what `CovStats.add` runs) against a
straightforward float64 computation in numpy, sample by sample, on random and structured data; its
fused form (torch.compile, Inductor's C++ kernels on the CPU) against the eager passes and the same
reference."""

import warnings

import numpy as np
import pytest
import torch

from rankprobe.probes.capture import stats_to_rows
from rankprobe.probes.lenses import spectral_rows, spectral_rows_start
from rankprobe.probes import moments
from rankprobe.probes.moments import moment_sums, sum_squares
from rankprobe.probes.spectra import CovStats


def reference(x: np.ndarray) -> dict[str, np.ndarray]:
    """Every CovStats sum of (N, H, D) float64 samples, the plain way: per head, per sample."""
    n, h, d = x.shape
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return {"sum": x.sum(0), "outer": np.einsum("nhd,nhe->hde", x, x), "pow3": (x**3).sum(0),
            "pow4": (x**4).sum(0), "unit_sum": unit.sum(0)}


def structured(rng) -> list[np.ndarray]:
    """(N, H, D) data where a shortcut would show: a far offset (collapsed keys: mean ≫ sd), zero
    vectors, a heavy-tailed coordinate, rank one, one-hot vectors, mixed scales across heads."""
    n, d = 2048, 16
    offset = rng.standard_normal((n, 2, d)) * 1e-3 + 50.0
    zeros = rng.standard_normal((n, 2, d))
    zeros[::7] = 0.0
    heavy = rng.standard_normal((n, 2, d))
    heavy[:, :, 0] += 40.0 * rng.choice([-1.0, 0.0, 1.0], size=(n, 2), p=[0.01, 0.98, 0.01])
    rank1 = rng.standard_normal((n, 2, 1)) * rng.standard_normal((1, 2, d))
    onehot = np.zeros((n, 2, d))
    onehot[np.arange(n), :, rng.integers(0, d, n)] = rng.choice([-2.0, 3.0], size=(n, 1))
    scales = rng.standard_normal((n, 2, d)) * np.array([1e-4, 1e4])[None, :, None]
    return [offset, zeros, heavy, rank1, onehot, scales]


def check(got: dict[str, torch.Tensor], ref: dict[str, np.ndarray], rtol: float = 1e-12) -> None:
    for key, want in ref.items():
        # relative to each head's largest entry: sums of signed terms may cancel to near 0
        scale = np.abs(want).reshape(want.shape[0], -1).max(1).reshape(-1, *[1] * (want.ndim - 1))
        np.testing.assert_allclose(got[key].numpy() / scale, want / scale, rtol=0, atol=rtol, err_msg=key)


def fields(s: CovStats) -> dict[str, torch.Tensor]:
    return {"sum": s.sum, "outer": s.outer, "pow3": s.pow3, "pow4": s.pow4, "unit_sum": s.unit_sum}


@pytest.mark.parametrize("chunks", [1, 4])
def test_fast_sums_equal_float64_reference_on_random_data(chunks):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 3, 32)) @ rng.standard_normal((32, 32)) + rng.standard_normal(32)
    g, pow3, pow4 = moment_sums(torch.from_numpy(x), chunks)
    ref = reference(x)
    d = 32
    check({"sum": g[:, :d, d], "outer": g[:, :d, :d], "pow3": pow3, "pow4": pow4, "unit_sum": g[:, :d, d + 1]}, ref)
    np.testing.assert_array_equal(g[:, d, d].numpy(), 1024)  # Σ1·1: the count, a check on the layout


def test_covstats_equals_float64_reference_on_structured_data():
    rng = np.random.default_rng(1)
    for x in structured(rng):
        s = CovStats(x.shape[1], x.shape[2])
        for part in np.array_split(x, 3):  # batches of unequal size, one of them not a multiple of 8
            s.add(torch.from_numpy(part))
        assert s.n == len(x)
        check(fields(s), reference(x))


def test_bf16_input_equals_float64_reference_of_its_values():
    """The taps are bf16 under autocast: the sums are those of the bf16 values, exactly up to float64
    round-off (the one copy converts; nothing is computed in low precision)."""
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((4096, 2, 64)) * 3 + 1).to(torch.bfloat16)
    s = CovStats(2, 64)
    s.add(x.view(2, 2048, 2, 64))  # (B, T, H, D) as a tap hands it over
    check(fields(s), reference(x.double().numpy()))


def test_non_finite_values_stay_in_their_head():
    """A head whose activations overflowed gets non-finite sums; the other heads are untouched."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 2, 8))
    bad = x.copy()
    bad[10, 1, 3] = np.inf
    g, pow3, pow4 = moment_sums(torch.from_numpy(bad))
    want_g, want3, want4 = moment_sums(torch.from_numpy(x))
    torch.testing.assert_close(g[0], want_g[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(pow3[0], want3[0], rtol=1e-14, atol=0)
    assert not torch.isfinite(g[1]).all() and not torch.isfinite(pow4[1]).all()


def as_fields(sums, d: int) -> dict[str, torch.Tensor]:
    g, pow3, pow4 = sums
    return {"sum": g[:, :d, d], "outer": g[:, :d, :d], "pow3": pow3, "pow4": pow4, "unit_sum": g[:, :d, d + 1]}


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# Odd shapes (N not a multiple of 8, D not of the vector width) with zero vectors (the 1/‖x‖ guard) and
# a far offset in one head; one compile each. bf16 is what the taps hand over under autocast.
FUSED_CASES = [(torch.bfloat16, (1001, 3, 17), 7), (torch.float32, (389, 2, 13), 1)]


@pytest.mark.parametrize("dtype, shape, chunks", FUSED_CASES)
def test_fused_sums_equal_eager_and_float64_reference(dtype, shape, chunks):
    rng = np.random.default_rng(8)
    n, h, d = shape
    x = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, d) + rng.standard_normal(d)
    x[:, -1] += 20.0
    x[::5] = 0.0
    x[3, 0] = 0.0
    x = torch.from_numpy(x).to(dtype)
    fused = moment_sums(x, chunks, fused=True)
    eager = moment_sums(x, chunks, fused=False)
    assert all(t.dtype == torch.float64 for t in fused)
    ref = reference(x.double().numpy())  # the sums of the values x holds, exactly
    check(as_fields(fused, d), ref)
    check(as_fields(fused, d), {k: v.numpy() for k, v in as_fields(eager, d).items()}, rtol=1e-13)
    np.testing.assert_array_equal(fused[0][:, d, d].numpy(), n)  # Σ1·1: the count, a check on the layout


def test_fused_sums_compile_each_shape_once_whatever_the_caller_state():
    """A probe pass calls under no_grad and autocast, a training forward's hooks with grad on and
    tensors that require grad: neither may compile the shape again."""
    dtype, shape, chunks = FUSED_CASES[0]
    x = torch.randn(shape).to(dtype)
    want = moment_sums(x, chunks, fused=True)
    before = compiled_graphs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = moment_sums(x, chunks, fused=True)
    with torch.enable_grad():
        grad = moment_sums(x.clone().requires_grad_(), chunks, fused=True)
    assert compiled_graphs() == before
    for a, b, c in zip(want, inside, grad):
        assert torch.equal(a, b) and torch.equal(a, c) and not c.requires_grad


def test_fused_sums_compile_inside_the_monitors_eager_steps():
    """The Monitor's measured step sets `force_eager`, under which a compiled function silently runs
    eagerly: the fused sums must still run their compiled kernels there (a new shape compiles)."""
    x = torch.randn(80, 2, 6)
    before = compiled_graphs()
    with torch.compiler.set_stance("force_eager"):
        got = moment_sums(x, 2, fused=True)
    assert compiled_graphs() == before + 1
    for a, b in zip(got, moment_sums(x, 2, fused=False)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_fused_sums_traced_into_a_compiled_caller():
    """A hook inside a region Dynamo compiles (a model compiled whole) traces the eager passes into
    that region's graph: same sums."""
    x = torch.randn(64, 2, 4)
    got = torch.compile(lambda t: moment_sums(t, 2, fused=True), fullgraph=True)(x)
    for a, b in zip(got, moment_sums(x, 2, fused=False)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0)


def test_fused_sums_past_the_recompile_limit_run_eagerly():
    """A shape beyond Dynamo's recompile limit runs the eager passes: no compile, no Dynamo warning,
    the same sums. (torch's own `config.patch`: pytest's monkeypatch deletes a torch config entry on
    undo, which broke every later compile in the worker.)"""
    moment_sums(torch.randn(80, 2, 6), 1, fused=True)  # at least one family compiled in this worker
    x = torch.randn(96, 2, 5)
    before = compiled_graphs()
    with torch._dynamo.config.patch(recompile_limit=len(moments._fused_rows)):
        got = moment_sums(x, 2, fused=True)
    assert compiled_graphs() == before and torch._dynamo.config.recompile_limit > 0
    for a, b in zip(got, moment_sums(x, 2, fused=False)):
        assert torch.equal(a, b)


def test_fused_sums_compile_each_family_at_most_twice_whatever_the_rows(monkeypatch):
    """A training forward of padded or variable-length batches hands over a new number of rows N at
    nearly every measured step: the first N of a family of tap shapes gets a graph for it, the second
    one graph for any N, and no later N compiles again; every N gives the eager passes' sums."""
    monkeypatch.setattr(moments, "_fused_rows", {})  # this module's state, restored after the test
    monkeypatch.setattr(moments, "_fused_any_rows", set())
    before = compiled_graphs()
    for i, n in enumerate((40, 56, 72, 88, 41, 7)):
        x = torch.randn(n, 3, 5).to(torch.bfloat16)
        fused = moment_sums(x, 1, fused=True)
        if i == 1:
            settled = compiled_graphs()
            assert settled - before <= 2
        check(as_fields(fused, 5), {k: v.numpy() for k, v in as_fields(moment_sums(x, 1, fused=False), 5).items()},
              rtol=1e-13)
    assert compiled_graphs() == settled and moments._fused_any_rows == set(moments._fused_rows)


def test_fused_sums_of_strided_views_reuse_the_graph_and_a_spent_recompile_limit_runs_eagerly(monkeypatch):
    """A fused QKV's q, k and v are strided views of one tensor: each layout would be another graph to
    Dynamo, and past its recompile limit a fullgraph compile raises in the middle of a training step.
    Views reuse the contiguous graph; a family Dynamo refuses to compile runs the eager passes."""
    monkeypatch.setattr(moments, "_fused_rows", {})  # this module's state, restored after the test
    monkeypatch.setattr(moments, "_fused_eager", set())
    fused = torch.randn(64, 2, 3 * 7)
    moment_sums(fused[..., :7].contiguous(), 1, fused=True)
    before = compiled_graphs()
    for part in (fused[..., 7:14], fused[..., 14:]):  # the same family, other strides
        check(as_fields(moment_sums(part, 1, fused=True), 7),
              {k: v.numpy() for k, v in as_fields(moment_sums(part, 1, fused=False), 7).items()}, rtol=1e-13)
    assert compiled_graphs() == before
    # a new family that the bookkeeping admits (it forgets the graph above, as guards beyond the
    # family's would add graphs it does not count), while Dynamo has compiled the code object as often
    # as the limit allows
    monkeypatch.setattr(moments, "_fused_rows", {})
    x = torch.randn(48, 3, 9)
    with torch._dynamo.config.patch(recompile_limit=1):
        got = moment_sums(x, 1, fused=True)
    assert moments._fused_eager == {(3, 9, torch.float32, x.device, 1)} and moments._fused_failure is None
    for a, b in zip(got, moment_sums(x, 1, fused=False)):
        assert torch.equal(a, b)


def test_fused_sums_run_eagerly_where_they_cannot_compile(monkeypatch):
    """Where Inductor cannot build its kernels (here a C++ compiler that does not exist, as on a node
    without one; on a GPU, one Triton does not support), the sums are the eager passes' with one warning
    naming the cause, and later calls do not try again: no compile, no warning."""
    monkeypatch.setattr(moments, "_fused_failure", None)  # this module's state, restored after the test
    x = torch.randn(97, 3, 5, dtype=torch.float64)  # a shape no other test compiles
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.warns(RuntimeWarning, match=r"fused moment sums could not be compiled .*C\+\+ compiler"):
            got = moment_sums(x, 1, fused=True)
    for a, b in zip(got, moment_sums(x, 1, fused=False)):
        assert torch.equal(a, b)
    before = compiled_graphs()
    y = torch.randn(53, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = moment_sums(y, 1, fused=True)
    assert compiled_graphs() == before
    for a, b in zip(again, moment_sums(y, 1, fused=False)):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_sums_on_cuda_equal_eager_and_float64_reference():
    """Triton's kernels, not the CPU's C++ ones: a seed-22l tap's batch shape in bf16, the default
    token blocks, zero vectors; the sums equal the eager passes' and the reference's."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4096, 12, 64)) * rng.uniform(0.1, 3.0, 64) + rng.standard_normal(64)
    x[::9] = 0.0
    x = torch.from_numpy(x).to(torch.bfloat16)
    fused = [t.cpu() for t in moment_sums(x.cuda(), fused=True)]
    eager = [t.cpu() for t in moment_sums(x.cuda(), fused=False)]
    check(as_fields(fused, 64), reference(x.double().numpy()))
    check(as_fields(fused, 64), {k: v.numpy() for k, v in as_fields(eager, 64).items()}, rtol=1e-13)


@pytest.mark.parametrize("fused", [True, False])
def test_sum_squares_both_forms(fused):
    t = torch.from_numpy(np.random.default_rng(4).standard_normal((300, 5, 7)))
    want = (t.numpy() ** 2).sum((0, 2))
    np.testing.assert_allclose(sum_squares(t, (0, 2), fused).numpy(), want, rtol=1e-14)


def test_chunks_must_divide_the_batch():
    with pytest.raises(ValueError, match="chunks"):
        moment_sums(torch.zeros(10, 1, 4), 4)


def test_rows_of_many_taps_batched_equal_each_tap_alone():
    """`spectral_rows` stacks the heads of every tap (GQA head counts, two widths, different counts n)
    into one batch per width; each row must be what its tap gives alone, and its PR numpy's."""
    rng = np.random.default_rng(5)
    shapes = {("norm", "q", 0): (300, 4, 8), ("norm", "k", 0): (300, 2, 8), ("proj", "v", 1): (200, 2, 16),
              ("rope", "k", 1): (250, 2, 8)}
    stats, data = {}, {}
    for key, (n, h, d) in shapes.items():
        data[key] = rng.standard_normal((n, h, d)) * rng.uniform(0.1, 3.0, d) + rng.standard_normal(d)
        stats[key] = CovStats(h, d)
        stats[key].add(torch.from_numpy(data[key]))
    rows = spectral_rows(stats)
    assert [(r["tap"], r["tensor"], r["layer"]) for r in rows] == sorted(shapes)
    for row in rows:
        key = (row["tap"], row["tensor"], row["layer"])
        alone = spectral_rows({key: stats[key]})[0]
        assert row.keys() == alone.keys()
        for m, v in alone.items():
            if isinstance(v, str):
                assert row[m] == v
            else:
                np.testing.assert_allclose(row[m], v, rtol=1e-12, err_msg=m)
        x = data[key]
        for h in range(x.shape[1]):
            lam = np.linalg.eigvalsh(np.cov(x[:, h], rowvar=False, bias=True))
            assert row["pr_heads"][h] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-10)
            assert row["mean_norm"][h] == pytest.approx(np.linalg.norm(x[:, h].mean(0)), rel=1e-12)
        assert stats_to_rows({key: stats[key]})[0] == {m: row[m] for m in stats_to_rows({key: stats[key]})[0]}


def test_spectral_rows_in_two_halves_read_the_statistics_at_the_start():
    """The host half may run later (a worker thread): what the statistics hold after the start must
    not reach the rows."""
    rng = np.random.default_rng(6)
    s = CovStats(2, 8)
    s.add(torch.from_numpy(rng.standard_normal((400, 2, 8))))
    want = spectral_rows({("proj", "k", 0): s})
    finish = spectral_rows_start({("proj", "k", 0): s})
    s.add(torch.from_numpy(rng.standard_normal((400, 2, 8)) * 5))
    assert finish() == want
    assert spectral_rows_start({})() == []


def test_sums_under_a_bf16_autocast_stay_float64():
    """The hooks run inside the training autocast, which must not recast the float64 GEMM."""
    x = torch.from_numpy(np.random.default_rng(7).standard_normal((256, 2, 16))).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = moment_sums(x)
    for a, b in zip(inside, moment_sums(x)):
        assert a.dtype == torch.float64 and torch.equal(a, b)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_taps_that_see_the_same_tensor_share_its_sums(monkeypatch, qk_norm):
    """With QK-Norm off the norm taps see the proj taps' very tensors: their sums are computed once
    per batch and reused, and every tap's statistics equal a sample-by-sample reference of what it saw."""
    from rankprobe.config import ModelConfig
    from rankprobe.model import Transformer
    from rankprobe.probes import capture

    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, d_model=32, n_head=2, head_dim=16, seq_len=8, vocab_size=50,
                                    qk_norm=qk_norm))
    tokens = torch.randint(0, 50, (6, 8))
    calls = []
    monkeypatch.setattr(capture, "moment_sums", lambda x: calls.append(1) or moment_sums(x))
    seen: dict = {}

    def keep(key, x):
        seen.setdefault(key, []).append(x.detach().double().reshape(-1, *x.shape[-2:]).clone())

    stats: dict = {}
    sink = capture.covariance_sink(stats)
    capture.feed(model, tokens, 3, lambda key, x: (keep(key, x), sink(key, x)))
    batches, layers = 2, 2
    assert len(calls) == batches * layers * (7 if qk_norm else 5)
    for key, parts in seen.items():
        check(fields(stats[key]), reference(torch.cat(parts).numpy()))
        assert stats[key].n == 6 * 8
    if not qk_norm:
        assert torch.equal(stats[("norm", "q", 1)].pow3, stats[("proj", "q", 1)].pow3)
