"""One tap interface for every kind of model: where q, k and v are read, and what attention computes.

A `TapAdapter` is chosen once per model (`capture.adapter_for`). It attaches forward hooks that hand
(B, T, H, D) activations to a sink at three points of every attention layer, keyed
(tap, tensor, layer) as RankProbe's own `Transformer.tap_modules`:
  proj  the q / k / v projection, split into heads (a fused QKV projection is sliced: `FUSED`)
  norm  after QK-Norm where the model has one; the proj values where it has none
  rope  after the model's own rotary embedding: what the attention kernel consumes; the norm values
        for a model without rotary
and it states what each layer computes from the rope taps (`AttentionSpec`: logit scale, sliding
window, logit soft-cap), so the attention lenses recompute exactly that, or refuse.

`ModuleAdapter` works on any `nn.Module` from module-name patterns (`Patterns`): RankProbe's
Transformer is one instance (its identity taps), nanoGPT another (a fused `c_attn`). Hugging Face
families add the model's own rotary on top of it (probes/families.py).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import DataError

Key = tuple[str, str, int]  # (tap, tensor, layer), as in Transformer.tap_modules
Sink = Callable[[Key, torch.Tensor], None]  # receives (B, T, H, D) activations
TAPS = ("proj", "norm", "rope")
LAYOUTS = ("bthd", "bhtd", "flat")  # of a norm or rotary module's output: (B, T, H, D), (B, H, T, D), (B, T, H·D)


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention layer computes from its rope-tap q and k (docs/lenses.md).

    Logits s_tj = scale · q_t·k_j, then `softcap` · tanh(s / softcap) when set (Gemma 2); query t
    sees keys j ≤ t, and only the last `window` of them (j > t − window) when window is set (the
    sliding windows of Mistral, Gemma 2/3, Qwen2 `sliding_attention` layers)."""

    scale: float
    window: int | None = None
    softcap: float | None = None

    def visible(self, T: int, device=None) -> torch.Tensor:
        """(T, T) bool: query t may attend to key j."""
        t = torch.arange(T, device=device)
        vis = t[None, :] <= t[:, None]
        if self.window is not None:
            vis &= t[None, :] > t[:, None] - self.window
        return vis


@dataclass(frozen=True)
class Patterns:
    """Where the taps of a model sit, as module names relative to each attention layer.

    `layers` is a glob over `model.named_modules()` with one `*` for the layer index
    ("transformer.h.*.attn"). Give q, k, v (projections whose output is (B, T, H·D) or (B, T, H, D))
    or `qkv` with its `fused` layout (a key of FUSED). q_norm / k_norm, when given, are modules whose
    output is the normed q / k in `norm_layout` ("bthd", "bhtd" or "flat" = (B, T, H·D)); q_rope /
    k_rope modules whose output is the post-rotary q / k in `rope_layout` (the same three). One module
    named for both q and k of a stage must return (q, k). `o` is the output projection (weight
    lenses), `w` the q, k, v projections for them where the taps are not the projections themselves.
    `conv1d`: weights are stored (in, out), as GPT-2's Conv1D."""

    layers: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    fused: str = "blocks"
    q_norm: str | None = None
    k_norm: str | None = None
    norm_layout: str = "bthd"
    q_rope: str | None = None
    k_rope: str | None = None
    rope_layout: str = "bthd"
    o: str | None = None
    w: tuple[str, str, str] | None = None
    conv1d: bool = False


def _fused_sizes(layout: str, H: int, Hkv: int, D: int) -> tuple:
    if layout == "blocks":  # [q of every head | k | v] (GPT-2's c_attn, Phi-3's qkv_proj, nanoGPT)
        return (H * D, Hkv * D, Hkv * D)
    if layout == "heads":  # per head [q | k | v] (GPT-NeoX / Pythia's query_key_value, Falcon-7B)
        return (H, 3, D)
    if layout == "groups":  # per key group [its H/G queries | k | v] (Falcon's new decoder, and MQA)
        return (Hkv, H // Hkv + 2, D)
    raise DataError(f"unknown fused QKV layout {layout!r} (one of {', '.join(FUSED)})")


FUSED = ("blocks", "heads", "groups")


def split_fused(x: torch.Tensor, layout: str, H: int, Hkv: int, D: int, dim: int = -1) -> tuple[torch.Tensor, ...]:
    """Slice a fused QKV tensor along `dim` into q (.., H, D, ..), k and v (.., Hkv, D, ..).

    On activations (B, T, 3·d) with dim=-1 this gives (B, T, H, D) each; on a weight (out, in) with
    dim=0 it gives (H, D, in), the head blocks of W_q, W_k, W_v."""
    sizes = _fused_sizes(layout, H, Hkv, D)
    dim = dim % x.ndim
    if layout == "blocks":
        return tuple(t.unflatten(dim, (-1, D)) for t in x.split(sizes, dim=dim))
    y = x.unflatten(dim, sizes)  # heads: (.., H, 3, D, ..); groups: (.., G, H/G + 2, D, ..)
    pick = lambda i: y.select(dim + 1, i)  # noqa: E731
    if layout == "heads":
        return pick(0), pick(1), pick(2)
    q = y.narrow(dim + 1, 0, H // Hkv).flatten(dim, dim + 1)  # query head h reads key group h // (H / G)
    return q, pick(-2 % sizes[1]), pick(-1 % sizes[1])


class TapAdapter:
    """The interface the probes use. Subclasses say where the taps are (`attach`), what attention
    computes (`attention`), where the attention weights are (`weights`) and how to run the model."""

    model: nn.Module
    n_layer: int
    heads: int
    kv_heads: int
    head_dim: int
    has_qk_norm: bool = False
    max_positions: int | None = None
    padding: Callable[[], torch.Tensor | None] | None = None  # the Monitor's padding mask of the current forward

    def attach(self, sink: Sink, taps=None) -> list:
        raise NotImplementedError

    def attention(self, layer: int) -> AttentionSpec:
        raise NotImplementedError

    def weights(self) -> list[dict[str, tuple[torch.Tensor, int]]]:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor):
        raise NotImplementedError


def in_backward() -> bool:
    """Whether autograd's backward is running on this thread: activation checkpointing runs a layer's
    forward again there, hooks included, after the forward that was measured already."""
    return torch._C._current_graph_task_id() != -1


def match_layers(model: nn.Module, pattern: str) -> list[nn.Module]:
    """The modules whose names match `pattern` (one `*` standing for the layer index), by index."""
    if pattern.count("*") != 1:
        raise DataError(f"layer pattern {pattern!r} needs exactly one '*' for the layer index")
    rx = re.compile(fnmatch.translate(pattern).replace(".*", r"(\d+)", 1))
    found = {}
    for name, module in model.named_modules(remove_duplicate=False):  # a shared module under each of its names
        m = rx.fullmatch(name)
        if m:
            found[int(m.group(1))] = module
    if not found or sorted(found) != list(range(len(found))):
        raise DataError(f"no attention layers 0..L-1 match {pattern!r} in {type(model).__name__}")
    first: dict[int, int] = {}
    for i in range(len(found)):
        j = first.setdefault(id(found[i]), i)
        if j != i:  # its hooks would fire once per use, every use counted as one layer
            raise DataError(f"{pattern!r}: layers {j} and {i} are one module (shared weights), whose activations "
                            "the taps cannot tell apart; RankProbe measures models whose layers are distinct modules")
    return [found[i] for i in range(len(found))]


def _heads(x: torch.Tensor, D: int, layout: str = "bthd") -> torch.Tensor:
    """An activation in `layout` -> (B, T, H, D)."""
    if layout == "bhtd":
        return x.transpose(1, 2)
    return x if x.ndim == 4 else x.unflatten(-1, (-1, D))  # (B, T, H·D) -> (B, T, H, D)


class ModuleAdapter(TapAdapter):
    """Taps on any nn.Module from `Patterns`: hooks on the named modules of every attention layer.

    Heads, key heads and head width are given, and so is what attention computes: one AttentionSpec
    for every layer or a list of them (default: causal, scale 1/sqrt(D))."""

    def __init__(self, model: nn.Module, patterns: Patterns, heads: int, head_dim: int, kv_heads: int | None = None,
                 attention: AttentionSpec | list[AttentionSpec] | None = None,
                 forward: Callable[[nn.Module, torch.Tensor], object] | None = None,
                 max_positions: int | None = None):
        self.model, self.p = model, patterns
        self.layers = match_layers(model, patterns.layers)
        self.n_layer, self.heads, self.head_dim = len(self.layers), heads, head_dim
        self.kv_heads = kv_heads or heads
        if (patterns.qkv is None) == (patterns.q is None or patterns.k is None or patterns.v is None):
            raise DataError("give either q, k and v or one fused qkv module")
        if any((a is None) != (b is None) for a, b in ((patterns.q_rope, patterns.k_rope),
                                                       (patterns.q_norm, patterns.k_norm))):
            raise DataError("q_norm / k_norm and q_rope / k_rope come in pairs")
        spec = attention or AttentionSpec(scale=head_dim ** -0.5)
        self.specs = list(spec) if isinstance(spec, list) else [spec] * self.n_layer
        if len(self.specs) != self.n_layer:
            raise DataError(f"{len(self.specs)} attention specs for {self.n_layer} layers")
        for field in ("norm_layout", "rope_layout"):  # any other string would read as bthd
            if getattr(patterns, field) not in LAYOUTS:
                raise DataError(f"Patterns({field}={getattr(patterns, field)!r}): one of {', '.join(LAYOUTS)}")
        if patterns.qkv is not None and patterns.fused == "heads" and self.kv_heads != heads:
            raise DataError(f"Patterns(fused='heads') holds [q k v] per head, so kv_heads = heads; got heads={heads}, "
                            f"kv_heads={self.kv_heads} (fused='groups' is [queries | k | v] per key group)")
        self.has_qk_norm = patterns.q_norm is not None
        self._check_distinct()
        self.max_positions = max_positions
        self._forward = forward
        for attn in self.layers:  # every named module must exist: fail now, not in the middle of a probe
            for name in (patterns.q, patterns.k, patterns.v, patterns.qkv, patterns.q_norm, patterns.k_norm,
                         patterns.q_rope, patterns.k_rope, patterns.o):
                if name is not None:
                    self.sub(attn, name)

    @staticmethod
    def sub(attn: nn.Module, name: str) -> nn.Module:
        try:
            return attn.get_submodule(name)
        except AttributeError:
            raise DataError(f"{type(attn).__name__} has no module {name!r}") from None

    def attention(self, layer: int) -> AttentionSpec:
        return self.specs[layer]

    def forward(self, idx: torch.Tensor):
        return self._forward(self.model, idx) if self._forward else self.model(idx)

    def rope_is_hooked(self) -> bool:
        """True when something other than the norm values feeds the rope taps (rotary modules here;
        the model's own rotary in probes/families.py)."""
        return self.p.q_rope is not None

    def attach(self, sink: Sink, taps=None) -> list:
        """Hooks that call `sink((tap, tensor, layer), x)` with x (B, T, H, D) at every tap (or only
        the keys in `taps`); returns the handles to remove."""
        def emit_for(layer: int, tensor: str, stages: tuple[str, ...], where: str = "its projection"):
            heads = self.heads if tensor == "q" else self.kv_heads

            def emit(x: torch.Tensor) -> None:
                if tuple(x.shape[-2:]) != (heads, self.head_dim):  # e.g. (B, H, T, D) read as (B, T, H, D)
                    raise DataError(f"layer {layer}: {tensor} from {where} reads as {x.size(-2)} heads of "
                                    f"{x.size(-1)}, not {heads} heads of {self.head_dim}; check heads, kv_heads "
                                    "and head_dim, and Patterns' norm_layout / rope_layout (bthd, bhtd or flat)")
                for tap in stages:
                    if taps is None or (tap, tensor, layer) in taps:
                        sink((tap, tensor, layer), x)
            return emit

        p = self.p
        # a tap without a module of its own shows the values of the stage before it
        after_proj = ("proj",) + (() if p.q_norm else ("norm",) + (() if self.rope_is_hooked() else ("rope",)))
        after_norm = ("norm",) + (() if self.rope_is_hooked() else ("rope",))
        handles = []
        try:
            self._attach_layers(handles, emit_for, after_proj, after_norm)
        except BaseException:  # a refusal half-way (families.py: taps already attached) leaves no hook behind
            for h in handles:
                h.remove()
            raise
        return handles

    def _attach_layers(self, handles: list, emit_for: Callable, after_proj: tuple, after_norm: tuple) -> None:
        p, D = self.p, self.head_dim
        for i, attn in enumerate(self.layers):
            q, k, v = (emit_for(i, t, after_proj if t != "v" else ("proj",), repr(p.qkv or getattr(p, t)))
                       for t in "qkv")
            if p.qkv:
                H, Hkv = self.heads, self.kv_heads

                def fused(_m, _i, out, q=q, k=k, v=v, layout=p.fused):  # bound now: the loop below rebinds names
                    qs, ks, vs = split_fused(out, layout, H, Hkv, D)
                    q(qs), k(ks), v(vs)
                handles.append(self.sub(attn, p.qkv).register_forward_hook(fused))
            else:
                for name, emit in ((p.q, q), (p.k, k), (p.v, v)):
                    handles.append(self.sub(attn, name).register_forward_hook(
                        lambda _m, _i, out, emit=emit: emit(_heads(out, D))))
            stages = [("norm", p.q_norm, p.k_norm, after_norm, p.norm_layout)] if p.q_norm else []
            stages += [("rope", p.q_rope, p.k_rope, ("rope",), p.rope_layout)] if p.q_rope else []
            for stage, qn, kn, at, layout in stages:
                eq, ek = (emit_for(i, t, at, f"{t}_{stage} {n!r}") for t, n in (("q", qn), ("k", kn)))
                if self.sub(attn, qn) is self.sub(attn, kn):  # one module for both: it must return (q, k)
                    handles.append(self.sub(attn, qn).register_forward_hook(_pair_hook(eq, ek, D, layout, stage, qn)))
                    continue
                for name, emit in ((qn, eq), (kn, ek)):
                    handles.append(self.sub(attn, name).register_forward_hook(
                        lambda _m, _i, out, emit=emit, layout=layout: emit(_heads(out, D, layout))))
            handles += self.attach_rope(i, attn, emit_for(i, "q", ("rope",)), emit_for(i, "k", ("rope",)))

    def _check_distinct(self) -> None:
        """No tapped module serves two layers (a rotary module shared by all layers, say): each call's
        hooks would hand its activations to every layer's taps. Within a layer one module may serve
        several taps: a shared q/k projection called once, or q_norm / k_norm (q_rope / k_rope) naming one
        module, which must return (q, k) (`_pair_hook` refuses one called once for q and once for k)."""
        p, seen = self.p, {}
        for i, attn in enumerate(self.layers):
            for role in ("qkv", "q", "k", "v", "q_norm", "k_norm", "q_rope", "k_rope"):
                name = getattr(p, role)
                if name is None:
                    continue
                where = (i, f"layer {i}'s {role}={name!r}")
                j, there = seen.setdefault(id(self.sub(attn, name)), where)
                if j != i:
                    raise DataError(f"{where[1]} is the module already tapped as {there}: its hooks would hand "
                                    "every layer's activations to both; give each layer a module of its own (an "
                                    "identity module after each call will do)")

    def attach_rope(self, layer: int, attn: nn.Module, q: Callable, k: Callable) -> list:
        """Hooks for rope taps that no module outputs (probes/families.py); none here."""
        return []

    def weights(self) -> list[dict[str, tuple[torch.Tensor, int]]]:
        """Per layer {"q" | "k" | "v" | "o": (W as (out, in), heads)}: live parameters or views
        (slices of a fused projection; a copy only where a head-interleaved layout forces one)."""
        p, H, Hkv, D = self.p, self.heads, self.kv_heads, self.head_dim
        if p.o is None:
            raise DataError("the weight lenses need the output projection (Patterns.o)")
        w = lambda m: whole(m.weight).t() if p.conv1d else whole(m.weight)  # noqa: E731  (out, in)
        out = []
        for attn in self.layers:
            if p.qkv:
                qs, ks, vs = (t.flatten(0, 1) for t in split_fused(w(self.sub(attn, p.qkv)), p.fused, H, Hkv, D, dim=0))
            else:
                qs, ks, vs = (w(self.sub(attn, n)) for n in (p.w or (p.q, p.k, p.v)))
            out.append({"q": (qs, H), "k": (ks, Hkv), "v": (vs, Hkv), "o": (w(self.sub(attn, p.o)), H)})
        return out


def _pair_hook(q: Callable, k: Callable, D: int, layout: str, stage: str, name: str) -> Callable:
    """The forward hook of one module named as both q_{stage} and k_{stage}: its output must be (q, k)."""
    def hook(_m, _i, out) -> None:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise DataError(f"q_{stage} and k_{stage} are one module {name!r}, which returned one tensor: called "
                            "once for q and once for k, its hooks cannot tell them apart; give each its own "
                            "module (an identity module after each call will do), or have it return (q, k)")
        q(_heads(out[0], D, layout))
        k(_heads(out[1], D, layout))
    return hook


def whole(w: torch.Tensor) -> torch.Tensor:
    """The whole matrix of a parameter that FSDP2's `fully_shard` holds as a DTensor shard (all-gathered:
    a collective, so every rank must read the same weights in the same order); any other tensor as it is.
    Spectra of a shard would be those of another matrix."""
    return w.full_tensor() if hasattr(w, "full_tensor") else w


def rankprobe_adapter(model) -> ModuleAdapter:
    """RankProbe's Transformer: its named identity taps (model.py), SDPA's causal attention."""
    c = model.cfg
    taps = Patterns(layers="blocks.*.attn", q="hook_q_proj", k="hook_k_proj", v="hook_v_proj",
                    q_norm="hook_q_norm", k_norm="hook_k_norm", q_rope="hook_q_rope", k_rope="hook_k_rope",
                    o="wo", w=("wq", "wk", "wv"))
    adapter = ModuleAdapter(model, taps, heads=c.n_head, kv_heads=c.n_kv_head or c.n_head, head_dim=c.head_dim,
                            attention=AttentionSpec(scale=c.head_dim ** -0.5), max_positions=c.seq_len)
    adapter.has_qk_norm = bool(c.qk_norm)
    return adapter
