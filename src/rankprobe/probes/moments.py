"""The float64 sums a probe keeps of a tap's activations (`CovStats`): one pass over a batch.

`moment_sums` gives Σxxᵀ, Σx, Σx/‖x‖ (one GEMM of A = [x, 1, 1/‖x‖] per head) and Σx³, Σx⁴ of vectors x
(N, H, D), in float64 whatever x's dtype. Its operand A is formed either by eager passes
(`eager_operand`) or by kernels torch.compile generates from one expression (`operand_math`,
`fused_operand`): one read of x, A written once. `FUSED` picks the default: fused on CUDA, where it
halved the probe sums on an H200 (BENCHMARKS.md, "Probes"), eager on the CPU. `fused_operand` owns what
compiling costs and risks: how often a tap shape compiles, Dynamo's recompile limit, and a machine
where nothing compiles (docs/lenses.md, section 6).
"""

from __future__ import annotations

import functools
import warnings

import torch


CUDA_TOKEN_BLOCKS = 8  # moment_sums' default split of the tokens on CUDA (96 GEMM batches at seed-22l)
FUSED: bool | None = None
"""moment_sums' default form: False the eager passes, True the fused (compiled) ones, None fused on CUDA
only. On an H200 the fused form took the probe set's sums from 0.303 to 0.149 s (BENCHMARKS.md,
"Probes"); on the CPU it is 1.4–1.7× faster too but compiles each tap shape (seconds), more than a short
CPU run gains. benchmarks/monitor_overhead.py --fused-sums sets it to compare."""


def moment_sums(x: torch.Tensor, chunks: int | None = None,
                fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sum `CovStats` keeps, of vectors x (N, H, D) of any float dtype, in float64:
    (G (H, D+2, D+2), Σx³ (H, D), Σx⁴ (H, D)), sums over the N vectors of each head.

    G = AᵀA per head with A = [x, 1, 1/‖x‖] (N, D+2): its top-left D×D block is Σxxᵀ, column D is Σx
    and column D+1 is Σx/‖x‖ (a zero vector gets weight 0 and adds nothing), so one GEMM over one
    float64 copy of the activations gives the covariance sums and the unit-vector sum (D+2 columns cost
    ~6% more than D at D = 64). The powers reuse the squares the norms need: Σx⁴ as a column norm of
    x², Σx³ from x² multiplied in place. On a GPU, where these are bandwidth-bound, that is about 10
    reads and writes of float64 data of the size of x instead of 16–18 (separate passes for the sum,
    the squares, cubes, fourth powers, norms, unit vectors and each of their sums).

    `fused` forms A and the powers in kernels that torch.compile (Inductor) generates instead
    (`fused_operand`): they read x in its own dtype and keep the squares, norms and powers in
    registers, so the float64 traffic is A written once and read once by the GEMM, about 2 volumes
    instead of 10, plus a read of x (2 bytes an element in bf16) per kernel: one on the CPU (C++); on a
    GPU likely two or three (a row kernel for A, the column sums of x³ and x⁴). Equal to the eager
    passes up to float64 round-off (summation order). Default: `FUSED` (None: on CUDA only);
    a tap shape compiles (seconds) at its first call and, for any other N, once more (`fused_operand`).

    `chunks` C splits the N vectors into C blocks that the GEMM takes as C·H batches, summed after:
    for a long N (32,768 at seed-22l) and few heads the GEMM otherwise runs on too few thread blocks
    (H of them per output tile) to fill a GPU. Default: `CUDA_TOKEN_BLOCKS` on CUDA when it divides N,
    else 1 (on the CPU the split gains nothing).
    """
    N, H, D = x.shape
    if chunks is None:
        chunks = CUDA_TOKEN_BLOCKS if x.is_cuda and N % CUDA_TOKEN_BLOCKS == 0 else 1
    C, M, W = chunks, N // chunks, D + 2
    if C * M != N:
        raise ValueError(f"chunks={C} does not divide N={N}")
    if fused is None:
        fused = x.is_cuda if FUSED is None else FUSED
    a, pow3, pow4 = fused_operand(x, C) if fused else eager_operand(x, C)
    flat = a.view(C * H, M, W)
    g = torch.bmm(flat.transpose(1, 2), flat).view(C, H, W, W).sum(0)  # (H, W, W)
    return g, pow3, pow4


def eager_operand(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GEMM operand A (C, H, M, D+2) of `moment_sums` and Σx³, Σx⁴ (H, D), by separate float64 passes."""
    N, H, D = x.shape
    C, M = chunks, N // chunks
    a = torch.empty(C, H, M, D + 2, dtype=torch.float64, device=x.device)
    xs = a[..., :D]
    xs.copy_(x.view(C, M, H, D).transpose(1, 2))  # the one read of the activations, e.g. bf16 -> float64
    sq = xs * xs  # (C, H, M, D)
    r2 = sq.sum(-1)  # (C, H, M): squared norms
    a[..., D] = 1
    a[..., D + 1] = torch.where(r2 > 0, r2.rsqrt(), 0)
    pow4 = sum_squares(sq, (0, 2))
    pow3 = sq.mul_(xs).sum((0, 2))  # sq now holds x³
    return a, pow3, pow4


def operand_math(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`eager_operand`'s results written as one expression, for Inductor to fuse: the row kernel reads x
    once and writes A; the column sums of x³ and x⁴ are reductions over the same read of x."""
    N, H, D = x.shape
    xs = x.view(chunks, N // chunks, H, D).transpose(1, 2).to(torch.float64)  # (C, H, M, D)
    sq = xs * xs
    r2 = sq.sum(-1, keepdim=True)  # (C, H, M, 1)
    a = torch.cat([xs, torch.ones_like(r2), torch.where(r2 > 0, r2.rsqrt(), 0)], -1)  # (C, H, M, D+2)
    return a, (sq * xs).sum((0, 2)), (sq * sq).sum((0, 2))


@functools.cache
def _compiled_operand():
    # Compiled on first use, never at import; static shapes: kernels Inductor specializes to one N.
    return torch.compile(operand_math, dynamic=False, fullgraph=True)


def _operand_any_rows(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`operand_math` under a code object of its own, so that Dynamo keeps its graphs (compiled for any
    number of rows N) apart from the static ones."""
    return operand_math(x, chunks)


@functools.cache
def _compiled_any_rows():
    return torch.compile(_operand_any_rows, fullgraph=True)


# Per family of tap shapes (H, D, dtype, device, chunks): the N its static graph was compiled for, and
# the families that met a second N and have a graph for any N too. A probe pass meets one N per family
# (two with a short last batch); a training forward of padded or variable-length batches a new N at
# nearly every measured step, which would compile every time and soon pass Dynamo's recompile limit.
_fused_rows: dict[tuple, int] = {}
_fused_any_rows: set[tuple] = set()
_fused_compiled: set[tuple] = set()  # (family, static) of the graphs that ran: a later error is not the compiler's
_fused_eager: set[tuple] = set()  # families that hit Dynamo's recompile limit all the same: eager from then on
_fused_failure: str | None = None  # why compiling the fused operand failed here; then every call runs eagerly


def _recompile_limit(e: BaseException | None) -> bool:
    """`e`, or an exception it was raised from, is Dynamo refusing to compile once more (fullgraph)."""
    while e is not None:
        if isinstance(e, torch._dynamo.exc.FailOnRecompileLimitHit):
            return True
        e = e.__cause__ or e.__context__
    return False


def fused_operand(x: torch.Tensor, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`eager_operand` by the compiled `operand_math`: the first N of each family of tap shapes
    (`_fused_rows`) by a graph for that N, any other N by one graph for any N (compiled at the family's
    second N), so a family compiles twice, not once per N (Dynamo specializes N = 0 and 1 on its own).
    Called with grad mode and autocast fixed, so that those settings of the caller (a training forward's
    hooks, a probe pass under no_grad) do not make Dynamo compile each shape again. Past `torch._dynamo.config.recompile_limit` families, a new one
    runs `eager_operand` (Dynamo would run it uncompiled, with a warning). The Monitor's measured
    steps run under `set_stance("force_eager")`, which would silently run the compiled operand eagerly
    too, so it is called under the default stance. Inside a region Dynamo is tracing (a hook on a model
    compiled whole), the eager passes are traced into that region's graph instead.

    Where the kernels cannot be compiled (a GPU Triton does not support, no working C or C++ compiler,
    no Triton), the first failure warns once and this process runs `eager_operand` from then on: the
    same sums, slower. Running out of memory is not such a failure and is raised."""
    global _fused_failure
    if torch.compiler.is_compiling() or _fused_failure is not None:
        return eager_operand(x, chunks)
    x = x.detach().contiguous()  # Dynamo guards on requires_grad and on strides (a fused QKV's slices)
    family, limit = (*x.shape[1:], x.dtype, x.device, chunks), torch._dynamo.config.recompile_limit
    if family not in _fused_rows and len(_fused_rows) < limit:
        _fused_rows[family] = x.size(0)
    static = _fused_rows.get(family) == x.size(0)
    if family not in _fused_rows or family in _fused_eager \
            or not static and family not in _fused_any_rows and len(_fused_any_rows) >= limit:
        return eager_operand(x, chunks)
    if not static:
        _fused_any_rows.add(family)
        torch._dynamo.maybe_mark_dynamic(x, 0)
    graph = (family, static)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False), torch.compiler.set_stance("default"):
        try:
            out = (_compiled_operand() if static else _compiled_any_rows())(x, chunks)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            if _recompile_limit(e):  # guards beyond the family's (a tensor's dispatch keys) used up the compiles
                _fused_eager.add(family)
                return eager_operand(x, chunks)
            if graph in _fused_compiled:  # a graph that ran before: not a compiler problem
                raise
            _fused_failure = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        else:
            _fused_compiled.add(graph)
            return out
    warnings.warn(f"rankprobe: the fused moment sums could not be compiled ({_fused_failure}); the eager "
                  "passes run instead: the same sums, slower (rankprobe.probes.moments.FUSED = False "
                  "skips the attempt)", RuntimeWarning, stacklevel=2)
    return eager_operand(x, chunks)


def sum_squares(t: torch.Tensor, dims: tuple[int, ...], fused: bool | None = None) -> torch.Tensor:
    """Σ t² over `dims`. `fused` (default: on CUDA) as the square of a vector norm, one read of t and
    no intermediate; otherwise a square and a sum, which was 3.5× faster than the norm on the CPU
    (docs/lenses.md, section 6)."""
    if fused if fused is not None else t.is_cuda:
        return torch.linalg.vector_norm(t, dim=dims).square_()
    return t.square().sum(dims)
