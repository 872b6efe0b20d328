"""Data parallelism across processes: who this process is, and the few collectives RankProbe needs.

`torchrun` (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT) starts one
process per GPU; `init()` joins them into a process group only when WORLD_SIZE > 1 (nccl on CUDA,
gloo on CPU). A single process gets `Dist()` (rank 0 of 1) and never touches torch.distributed:
every collective here returns at once when world_size == 1 (STYLE.md habit 4).

Nothing assumes one host: the device comes from LOCAL_RANK, the writer of files is global RANK 0.

What is exact across ranks: each rank takes its slice of the same (seed, step) global batch, and
DDP averages the gradients of per-rank mean losses, which is the global-batch gradient; probe
statistics are sums (CovStats, attention sums) and maxima, which merge exactly. What is not bitwise:
the order of the all-reduce additions, so losses agree with a single-process run to float rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .config import UserError

R = TypeVar("R")


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: global rank, world size, rank on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The one process that writes files and logs progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def from_env() -> Dist:
    """The process's rank as the launcher set it in the environment; rank 0 of 1 without a launcher."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    return Dist(rank, world, local)


def init(device_name: str = "auto") -> Dist:
    """Join the process group if WORLD_SIZE > 1, pinning this process to GPU LOCAL_RANK when CUDA is
    used. Returns the process's Dist; a single process returns Dist() and initialises nothing."""
    d = from_env()
    if not d.active:
        return d
    import torch.distributed as td

    if not td.is_available():
        raise UserError(f"WORLD_SIZE={d.world_size} but this torch build has no torch.distributed")
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(d.local_rank)
    if not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo")
    return d


def close(d: Dist) -> None:
    """Leave the process group, after collecting what the run left in reference cycles (its DDP
    model, work handles) while the group and the interpreter are still alive rather than during the
    interpreter's finalization, where gloo's threads can abort a rank. The CLI also ends the other
    ranks without finalization (cli._train)."""
    if d.active:
        import gc

        import torch.distributed as td

        gc.collect()
        if td.is_initialized():
            td.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """The rank's own GPU (cuda:LOCAL_RANK) when training on CUDA under a launcher."""
    if d.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", d.local_rank)
    return device


# ---------------------------------------------------------------------------------------------
# agreement: rank 0 decides, every rank acts on the same answer


class MirroredError(UserError):
    """A UserError raised on rank 0, raised again on the other ranks so that all of them stop."""


def on_main(d: Dist, fn: Callable[[], R]) -> R:
    """Run `fn` on rank 0 alone and hand every rank its (picklable) result; a single process just
    calls fn(). An exception on rank 0 is raised again on every rank, as a MirroredError on the
    others, so a refused input stops the whole group instead of leaving it waiting in a collective."""
    if not d.active:
        return fn()
    import torch.distributed as td

    box: list = [None]
    if d.is_main:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("user", str(e))
            td.broadcast_object_list(box, src=0)
            raise
        except BaseException as e:
            box[0] = ("error", f"{type(e).__name__}: {e}")
            td.broadcast_object_list(box, src=0)
            raise
        td.broadcast_object_list(box, src=0)
        return box[0][1]
    td.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    if kind == "user":
        raise MirroredError(value)
    raise RuntimeError(f"rank 0 failed: {value}")


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as td

        td.barrier()


# ---------------------------------------------------------------------------------------------
# reductions


def all_reduce_(d: Dist, tensors: list[torch.Tensor], op: str = "sum") -> None:
    """In place, SUM or MAX over ranks of every tensor in `tensors`, packed into one collective per
    dtype (a probe has hundreds of small statistics). No-op on a single process."""
    if not d.active or not tensors:
        return
    import torch.distributed as td

    red = {"sum": td.ReduceOp.SUM, "max": td.ReduceOp.MAX}[op]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        td.all_reduce(flat, op=red)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t))


def mean_(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a scalar tensor (a copy; gloo has no AVG, so SUM / world)."""
    if not d.active:
        return t
    out = t.detach().float().clone().reshape(1)
    all_reduce_(d, [out])
    return (out / d.world_size).reshape(())


def shard_rows(d: Dist, x: torch.Tensor, what: str) -> torch.Tensor:
    """This rank's contiguous slice of the rows of `x` (all of it on a single process)."""
    if not d.active:
        return x
    n = x.size(0)
    if n < d.world_size:
        raise UserError(f"{what} has {n} sequences, fewer than the {d.world_size} processes; raise it")
    return x[d.rank * n // d.world_size : (d.rank + 1) * n // d.world_size]


def reduce_probe_stats(d: Dist, cov: dict, attn) -> None:
    """Merge every rank's probe statistics into the whole probe set's, in place: CovStats n and every
    field of `CovStats.sums()` and the attention entropy sums, log-key sums and row counts by SUM, the
    max logits and sequence lengths by MAX. The keys are walked in sorted order, the same on every rank."""
    if not d.active:
        return
    keys = sorted(cov)
    n = torch.tensor([cov[k].n for k in keys], dtype=torch.float64,
                     device=cov[keys[0]].sum.device if keys else "cpu")
    layers = sorted(attn.layers)
    stats = [attn.layers[i] for i in layers]
    rows = torch.tensor([s["rows"] for s in stats], dtype=torch.float64, device=n.device)
    lengths = torch.tensor([s["T"] for s in stats], dtype=torch.float64, device=n.device)
    sums = [t for k in keys for t in cov[k].sums()]
    sums += [s[f] for s in stats for f in ("entropy", "entropy_norm", "log_keys")]
    all_reduce_(d, [n, rows, *sums], "sum")
    all_reduce_(d, [lengths, *(s["max_logit"] for s in stats)], "max")
    for k, v in zip(keys, n.tolist()):
        cov[k].n = int(v)
    for s, v, t in zip(stats, rows.tolist(), lengths.tolist()):
        s["rows"], s["T"] = int(v), int(t)
