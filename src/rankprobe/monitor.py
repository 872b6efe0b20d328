"""`Monitor`: RankProbe's lenses on any model, inside anyone's training loop (docs/api.md).

It finds the attention layers once (`probes.capture.adapter_for`: RankProbe's Transformer, the
Hugging Face families of probes/families.py, or any nn.Module from `Patterns`), through DDP and
torch.compile wrappers, and measures in one of two ways:

- **fixed probe batch** (`probe(tokens)`): a no-grad pass over the same tokens every time, exactly
  what `rankprobe train`'s probe checkpoints do (the trainer calls this very method);
- **from the training forward** (`watch(step)`, or `start` / `finish`): at every `every`-th step,
  hooks fold the training forward's own q/k/v into the same float64 statistics; no extra forward.
  Hooks exist only while a measured step is open, and that step runs with torch.compile set aside
  (`torch.compiler.set_stance("force_eager")`): compiled graphs never see the hooks, so they are
  traced once without them, never fragmented by graph breaks at the taps nor recompiled, and the
  steps in between run exactly the code they would run without the monitor.

Rows come back in the metrics.jsonl schema (docs/metrics.md; `probe`, `attn`, `weights`), and as
flat scalars (`sinks.scalars`); with `out` they are also written to out/metrics.jsonl and its sinks.
With `background` (the default on CUDA) a measurement pays only its device half in the step; the host
half (eigendecompositions on the CPU) runs on a worker thread (`deferred.Deferred`, as the trainer's
Prober does) and its rows are emitted by the next measurement or by `flush` / `close`.
Under torch.distributed every statistic is all-reduced (dist.reduce_probe_stats) so that each rank
holds the rows a single process would compute on all ranks' tokens; rank 0 alone writes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from .deferred import Deferred
from .dist import Dist, reduce_probe_stats, shard_rows
from .errors import FolderError, UserError
from .probes.adapters import TAPS, AttentionSpec, ModuleAdapter, Patterns, TapAdapter, in_backward, match_layers
from .probes import padding
from .probes.agreement import AttentionCheck
from .probes.widths import head_shape, whole_count as _count
from .probes.capture import Key, adapter_for, covariance_sink
from .probes.attention import AttentionStats, attention_sink
from .probes.lenses import probe_lenses_start, spectral_rows_start, weight_lenses_start
from .probes.spectra import CovStats
from .runfolder import METRICS, SCHEMA_VERSION, MetricsWriter, NullWriter, ensure_writable, header, run_rows
from .sinks import open_sinks, scalars

__all__ = ["Monitor", "Patterns", "AttentionSpec", "unwrap", "current_dist", "flat_scalars", "scalars_by_step"]


def unwrap(model):
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, in any nesting.
    FSDP2's `fully_shard` keeps the module itself, with its names."""
    while hasattr(model, "_orig_mod") or type(model).__name__ == "DistributedDataParallel":
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def current_dist() -> Dist:
    """This process's place in the torch.distributed group when one is initialised, else Dist()."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def flat_scalars(rows: list[dict]) -> dict[str, float]:
    """Rows (each with its `kind`) -> one dict of flat scalar names (`rankprobe/k_pr/L03`) -> values."""
    out: dict[str, float] = {}
    for row in rows:
        out.update(scalars(row["kind"], row))
    return out


def scalars_by_step(rows: list[dict]) -> dict[int, dict[str, float]]:
    """`flat_scalars` of each measured step in `rows`, by the step the rows carry (what a background
    Monitor emits belongs to an earlier step than the one that emitted it)."""
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        by_step.setdefault(row["step"], []).append(row)
    return {step: flat_scalars(group) for step, group in sorted(by_step.items())}


class _EagerSteps:
    """`torch.compiler.set_stance("force_eager")` while any monitor has a measured step open.

    The stance is one global of the process: two monitors (two callbacks, say) may open the same step
    and close it in either order, so the first to open sets it and the last to close restores what
    was there before, instead of each restoring what it found."""

    def __init__(self):
        self.open, self.stance = 0, None

    def enter(self) -> None:
        if self.open == 0:
            self.stance = torch.compiler.set_stance("force_eager")  # raises inside a compiled region
        self.open += 1

    def exit(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.stance.__exit__(None, None, None)
            self.stance = None


_EAGER = _EagerSteps()


def _fsdp_sharded(model) -> bool:
    """True when FSDP2's `fully_shard` holds some of `model`'s parameters as DTensor shards."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _same_forward_count(d: Dist, n: int, batch_size: int) -> None:
    """FSDP2 all-gathers the weights in every forward, so every rank must run as many forwards over its
    share of the probe set (`shard_rows`) as the others; refuse in one line, the same on every rank."""
    shares = [(r + 1) * n // d.world_size - r * n // d.world_size for r in range(d.world_size)]
    if len({-(-s // batch_size) for s in shares}) > 1:
        raise UserError(f"under FSDP every rank must run as many probe forwards as the others: {n} probe "
                        f"sequences over {d.world_size} ranks in batches of {batch_size} do not; make the "
                        f"sequences a multiple of {d.world_size * batch_size}")


def _check_tokens(tokens, model) -> None:
    """Probe tokens are a non-empty (N, T) integer tensor of ids the model embeds: an empty one measured
    nothing and said so nowhere, an id past the vocabulary is a device-side assert on CUDA."""
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.numel() == 0 \
            or tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        what = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise UserError(f"Monitor.probe(tokens): a non-empty (N, T) tensor of integer token ids; got {what}")
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else getattr(model, "tok_emb", None)
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise UserError(f"Monitor.probe(tokens): ids must lie in [0, {vocab}), the model's vocabulary; got "
                        f"{int(tokens.min())}..{int(tokens.max())}")


def _check_arguments(every, taps, batch_size) -> set[str] | None:
    """Monitor's cadence, taps and batch size, refused in one line (a NaN `every` was never due, a tap
    name misspelt or a string's letters matched no row: each measured nothing, silently); the taps as a set."""
    if not _count(every):
        raise UserError(f"Monitor(every={every!r}): the cadence must be a whole number of steps, at least 1")
    if not _count(batch_size):
        raise UserError(f"Monitor(batch_size={batch_size!r}): sequences per forward, a whole number >= 1")
    if taps is None:
        return None
    taps = {taps} if isinstance(taps, str) else taps
    try:
        taps = set(taps)
    except TypeError:
        raise UserError(f"Monitor(taps={taps!r}): a list of tap names ({', '.join(TAPS)})") from None
    if not taps <= set(TAPS):
        raise UserError(f"Monitor(taps=...): unknown tap(s) {', '.join(sorted(map(str, taps - set(TAPS))))} "
                        f"(one of {', '.join(TAPS)})")
    return taps


class Monitor:
    """Key spectra, attention entropy / max logit and weight spectra of `model`'s attention layers.

    model      RankProbe's Transformer, a supported Hugging Face causal LM, or any nn.Module with
               `patterns` (and `heads`); wrapped in DDP, FSDP2's fully_shard or torch.compile or not.
    patterns   `Patterns` for a model without a built-in adapter (module names; fused QKV allowed);
               with `heads`, `kv_heads` (default heads), `head_dim` (default: from the projection)
               and `attention_spec` (an AttentionSpec; default causal, scale 1/sqrt(head_dim)).
    every      the cadence of `watch` / `start`: steps 0, every, 2·every, …
    taps       tap names to report ("proj", "norm", "rope", one or a list; default all). Attention uses rope.
    attention  the attention lens (entropy, max logit); weights: the weight spectra (rank 0's).
    out        a folder: rows go to out/metrics.jsonl (rank 0) and to `sinks` there ("tensorboard",
               "wandb", "csv", or callables (kind, row)). `name`, `arm`, `seed` fill its run row.
    batch_size sequences per forward of the fixed-batch mode.
    train_forward  False: the fixed-batch mode only (`start` refuses; the trainer's probes).
    background the host half of each measurement (eigendecompositions, rows) on a worker thread, its
               rows emitted by the next `finish` / `probe` or by `flush`; None: on when the model's
               parameters are on CUDA (on a CPU the worker would only take cores from training).

    `cost` holds the seconds of the last measurement's parts (the statistics after the forward; see
    `finish` and `probe`) and `measurements` counts them, for benchmarks/monitor_overhead.py.
    """

    def __init__(self, model, *, patterns: Patterns | None = None, heads: int | None = None,
                 kv_heads: int | None = None, head_dim: int | None = None, attention_spec: AttentionSpec | None = None,
                 every: int = 100, taps=None, attention: bool = True, weights: bool = True,
                 out: str | Path | None = None, sinks=(), name: str | None = None, arm: str = "monitor",
                 seed: int = 0, batch_size: int = 8, dist: Dist | None = None, train_forward: bool = True,
                 background: bool | None = None):
        taps = _check_arguments(every, taps, batch_size)
        if patterns is not None:
            if heads is None:
                raise UserError("Monitor(patterns=...) needs heads= (and kv_heads= under grouped-query attention)")
            inner = unwrap(model)
            layer0 = match_layers(inner, patterns.layers)[0]
            head_dim, kv_heads = head_shape(layer0, patterns, heads, kv_heads, head_dim)
            self.adapter: TapAdapter = ModuleAdapter(inner, patterns, heads, head_dim, kv_heads,
                                                     attention=attention_spec)
            # the lens's q·k is only as right as the patterns: checked against the model's attention output
            self._check: AttentionCheck | None = AttentionCheck(self.adapter, lambda: self._padding)
        else:
            self.adapter, self._check = adapter_for(model), None
        self.train_forward = train_forward
        self.every, self.attention, self.weights, self.batch_size = every, attention, weights, batch_size
        self.taps = taps
        self.dist = dist or current_dist()
        self.writer = self._open(out, sinks, name, arm, seed)
        self._handles: list = []
        self._padding: torch.Tensor | None = None  # the measured forward's padding mask (probes/padding.py)
        self._mask_position = padding.mask_argument(self.adapter.model)
        self._eager = False  # this monitor holds torch.compile aside (_EAGER) for its open step
        self._step: int | None = None
        if background is None:
            background = any(p.device.type == "cuda" for p in self.adapter.model.parameters())
        self._pending = Deferred(background, "Monitor", "measure before close(), or make a new Monitor")
        self.last: list[dict] = []
        self.cost: dict[str, float] = {}
        self.measurements = 0

    @property
    def background(self) -> bool:
        return self._pending.offload

    @property
    def closed(self) -> bool:
        """`close` was called: this Monitor measures no more."""
        return self._pending.closed

    def _open(self, out, sinks, name, arm, seed):
        if out is None:
            if sinks:  # they would be dropped unopened: no TensorBoard, no CSV, no callable ever called
                raise UserError(f"Monitor(sinks={tuple(sinks)!r}) needs out=FOLDER: the rows reach sinks only "
                                "when they are written there")
            return None
        if not self.dist.is_main:
            return NullWriter()
        folder = Path(out)
        rows = run_rows(folder)
        if rows and ((header(rows) or {}).get("source") or {}).get("kind") != "monitor":
            # a trained or probed run's file: this model's rows would read as that run's, after its end
            raise FolderError(f"Monitor(out={str(folder)!r}): the folder holds a run a Monitor did not write "
                              f"({METRICS}); give out= a folder of its own")
        ensure_writable(folder)
        run = name or folder.name
        a = self.adapter
        writer = MetricsWriter(folder / METRICS, tuple(open_sinks(sinks, folder, run, {"arm": arm, "seed": seed})))
        writer.write("run", schema=SCHEMA_VERSION, run=run, arm=arm, seed=seed, n_layer=a.n_layer,
                     head_dim=a.head_dim, source={"kind": "monitor", "model": type(a.model).__name__})
        return writer

    # ------------------------------------------------------------------------------------------
    # fixed probe batch

    def probe(self, tokens: torch.Tensor, step: int = 0, tokens_seen: int | None = None) -> list[dict]:
        """Every lens on `tokens` (N, T), the whole probe set (the same on every rank: each rank feeds
        its share and the statistics are merged). Runs in eval mode under no_grad, the caller's
        autocast included. Returns the rows it emits (each with `kind`, `step`, `tokens`): this
        measurement's, or with `background` the previous measurement's (`finish`).
        `cost`: `lenses_s` (forward and statistics), `weights_s`; with `background` only their device
        halves, and `wait_s` for the previous measurement's host half."""
        self._pending.check_open()
        earlier, t0 = self._begin(), time.perf_counter()  # entries pending before this one
        probe_rows, attn = self.lenses_start(tokens)
        self._queue(step, tokens_seen, "probe", probe_rows)
        self._queue(step, tokens_seen, "attn", attn)
        t1 = time.perf_counter()  # attn is host numbers: the forward and its statistics are done
        self._queue_weights(step, tokens_seen)
        self.cost = {"lenses_s": t1 - t0, "weights_s": time.perf_counter() - t1}
        return self._emit(earlier)

    def lenses(self, tokens: torch.Tensor, sharded: bool = False) -> tuple[list[dict], list[dict]]:
        """The `probe` and `attn` rows of `tokens` (N, T) without step fields, writing nothing.
        `sharded`: `tokens` is this rank's share already (the trainer's probe set)."""
        probe_rows, attn = self.lenses_start(tokens, sharded)
        return probe_rows(), attn

    def lenses_start(self, tokens: torch.Tensor, sharded: bool = False) -> tuple[Callable[[], list[dict]], list[dict]]:
        """`lenses` with the `probe` rows' host half left to the caller: the forward and the statistics
        run here (collectives included); the returned function decomposes them on the CPU, on any thread."""
        if self._eager:  # the open step's hooks would add this pass to that step's statistics
            raise RuntimeError(f"Monitor.probe while step {self._step} is still open; call finish first")
        if not sharded:  # the user's tokens (the trainer's are its own probe set, sharded already)
            _check_tokens(tokens, self.adapter.model)
        shard = tokens if sharded else shard_rows(self.dist, tokens, "the probe tokens")
        if self.dist.active and not sharded and _fsdp_sharded(self.adapter.model):
            _same_forward_count(self.dist, tokens.size(0), self.batch_size)
        merge = (lambda cov, attn: reduce_probe_stats(self.dist, cov, attn)) if self.dist.active else None
        probe_rows, attn = probe_lenses_start(self.adapter, shard, self.batch_size, attention=self.attention,
                                              merge=merge)
        return lambda: self._keep(probe_rows()), attn

    def _keep(self, rows: list[dict]) -> list[dict]:
        return rows if self.taps is None else [r for r in rows if r["tap"] in self.taps]

    def _queue_weights(self, step: int, tokens_seen: int | None) -> None:
        """The weight rows' device half here, on every rank (FSDP2's all-gathers, in the same order),
        and rank 0's host half queued."""
        if self.weights and not self.dist.is_main and _fsdp_sharded(self.adapter.model):
            with torch.no_grad():
                self.adapter.weights()  # FSDP2: join rank 0's all-gathers of the whole matrices (adapters.whole)
        if self.weights and self.dist.is_main:
            self._queue(step, tokens_seen, "weights", weight_lenses_start(self.adapter))

    # ------------------------------------------------------------------------------------------
    # from the training forward

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def start(self, step: int) -> bool:
        """Attach the hooks when `step` is due (True), so the training forward passes until `finish`
        fill the statistics; nothing otherwise (False: no hooks, no device work, no host sync).

        Until `finish`, torch.compile is set aside (`torch.compiler.set_stance("force_eager")`, for
        the whole process): the measured step runs its compiled modules eagerly, hooks included.
        A compiled graph that met the hooks could ignore them (Dynamo skips hook guards by default)
        or, compiled with them, keep the graph breaks of their eager sinks on every later step
        (a graph that stays correct without the hooks is never recompiled; BENCHMARKS.md). Eager,
        the measured step pays the difference between an eager and a compiled forward and
        backward, and no graph is ever compiled with hooks."""
        self._pending.check_open()
        if self._eager:
            raise RuntimeError(f"Monitor.start({step}) while step {self._step} is still open; call finish first")
        if not self.train_forward:
            raise RuntimeError("this Monitor was made with train_forward=False: use probe(tokens)")
        if not self.due(step):
            return False
        self._step, self._cov, self._attn = step, {}, AttentionStats()
        cov = covariance_sink(self._cov, lambda x: x if self._padding is None else padding.select(x, self._padding))
        att = attention_sink(self.adapter, self._attn, lambda: self._padding) if self.attention else None
        check = self._check if self.attention and self._check is not None else None
        wanted = self.taps

        def sink(key: Key, x: torch.Tensor) -> None:
            if in_backward():
                return  # activation checkpointing's second forward: counted once already
            if wanted is None or key[0] in wanted:
                cov(key, x)
            if att is not None:
                att(key, x)
            if check is not None:
                check.sink(key, x)

        _EAGER.enter()
        self._eager = True  # the step is open from here until _close
        try:
            self._handles = self.adapter.attach(sink) + (check.attach() if check is not None else [])
            self._handles.append(self.adapter.model.register_forward_pre_hook(self._read_padding, with_kwargs=True))
            self.adapter.padding = lambda: self._padding
        except BaseException:
            self._close()
            raise
        return True

    def _read_padding(self, module, args, kwargs) -> None:
        """Before each forward of a measured step: its padding mask (probes/padding.py)."""
        self._padding = padding.forward_mask(args, kwargs, self._mask_position, self.attention)

    def _close(self) -> None:
        """Remove the hooks and give torch.compile its previous stance back."""
        for h in self._handles:
            h.remove()
        self._handles, self.adapter.padding, self._padding = [], None, None
        if self._check is not None:
            self._check.got.clear()  # a forward cut short leaves taps no `o` hook took
        if self._eager:
            _EAGER.exit()
            self._eager = False

    def finish(self, tokens_seen: int | None = None) -> list[dict]:
        """Remove the hooks, merge the statistics across ranks and emit rows (return them, write them,
        keep them in `last`): the rows of the step `start` opened, or with `background` those of the
        measurement before it (this one's host half goes to the worker). [] and nothing else when
        `start` opened no step. Every rank must call it (a collective).
        `cost` then holds the seconds of the statistics: `spectra_s` (the merge across ranks
        and the key spectra), `attention_s`, `weights_s`; with `background` only their device halves,
        and `wait_s` for the previous measurement's host half."""
        if not self._eager:
            return []
        self._close()
        cov: dict[Key, CovStats] = self._cov
        earlier, t0 = self._begin(), time.perf_counter()  # entries pending before this one
        if self.dist.active:
            reduce_probe_stats(self.dist, cov, self._attn)
        self._queue(self._step, tokens_seen, "probe", spectral_rows_start(cov))
        t1 = time.perf_counter()  # with `background` its device work may still run: attention_s waits for it
        self._queue(self._step, tokens_seen, "attn", self._attn.rows())  # host numbers: synced
        t2 = time.perf_counter()
        self._queue_weights(self._step, tokens_seen)
        t3 = time.perf_counter()
        self.cost = {"spectra_s": t1 - t0, "attention_s": t2 - t1, "weights_s": t3 - t2}
        self._cov, self._attn = {}, None
        return self._emit(earlier)

    @contextmanager
    def watch(self, step: int, tokens_seen: int | None = None):
        """`with monitor.watch(step): loss = model(x, y)`: `start` before the block, `finish` after it
        (the rows it emits are then in `monitor.last`)."""
        self.start(step)
        try:
            yield self
        except BaseException:
            self._close()
            raise
        self.finish(tokens_seen)

    # ------------------------------------------------------------------------------------------

    # emitting: every measurement's rows pass through `_pending` (deferred.Deferred), in both modes

    def _begin(self) -> int:
        """A measurement begins: how many entries earlier measurements left pending."""
        self.measurements += 1
        return len(self._pending.pending)

    def _queue(self, step: int, tokens_seen: int | None, kind: str, rows) -> None:
        """Queue rows of `kind` (a list, or a host half: a function) stamped with their step and tokens."""
        def stamp(made: list[dict]) -> list[dict]:
            return [{"step": step, "tokens": tokens_seen, **r} for r in made]

        self._pending.add(step, kind, (lambda: stamp(rows())) if callable(rows) else stamp(rows))

    @staticmethod
    def _rows(done: list[tuple[int, list[dict]]]) -> list[dict]:
        return [row for _, rows in done for row in rows]

    def _emit(self, earlier: int) -> list[dict]:
        """Write and return the rows a measurement releases once its device half is done: with
        `background` the `earlier` entries (the previous measurement's, waited for here:
        `cost["wait_s"]`), else all (its own, made by now)."""
        t0 = time.perf_counter()
        done = self._pending.take(earlier if self.background else None)
        if self.background:
            self.cost["wait_s"] = time.perf_counter() - t0
        self.last = self._write(self._rows(done))
        return self.last

    def _write(self, rows: list[dict]) -> list[dict]:
        if self.writer is not None:
            for row in rows:
                self.writer.write(**row)  # kind, step, tokens, the row's fields
        return rows

    def flush(self) -> list[dict]:
        """Wait for the host halves still pending and emit their rows (write them, return them, and
        keep them in `last` unless there are none); [] when nothing is pending (always, without
        `background`)."""
        rows = self._write(self._rows(self._pending.take()))
        self.last = rows or self.last
        return rows

    def scalars(self) -> dict[str, float]:
        """The last rows as flat scalars (`rankprobe/k_pr/L03`, `rankprobe/attn_entropy/L03`, …)."""
        return flat_scalars(self.last)

    def log(self, kind: str, step: int, tokens_seen: int | None = None, **row) -> None:
        """Write a row of the caller's (e.g. kind "train" with loss=...) beside the monitor's."""
        if self.writer is not None:
            self.writer.write(kind, step=step, tokens=tokens_seen, **row)

    def close(self) -> None:
        """Flush, then close the worker and out/metrics.jsonl; final: measuring after it is an error."""
        self._close()
        try:
            self.flush()
        finally:
            self._pending.close()
            if self.writer is not None:
                self.writer.close()
                self.writer = None

