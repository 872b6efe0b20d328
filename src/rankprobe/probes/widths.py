"""Head counts and head width of a model tapped through `Patterns`, read from its weights.

The Monitor is told `heads` (and maybe `kv_heads`, `head_dim`); the projections' weights say how wide
q, k, v and the output projection's input are. A count that does not fit them would reshape the
activations into other heads, silently, or fail in the middle of a training step, so what can be
read is read (the key heads of a separate k projection, the key heads of a fused QKV from the output
projection's width) and what disagrees is refused at once, in one line.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..errors import UserError
from .adapters import ModuleAdapter, Patterns


def whole_count(n) -> bool:
    """`n` is a whole number >= 1 (not a bool, a float or a string)."""
    return isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1


def head_shape(layer: nn.Module, patterns: Patterns, heads, kv_heads, head_dim) -> tuple[int, int | None]:
    """(head_dim, kv_heads) of the attention layer `layer` (the first one) under `patterns`."""
    for name, n in (("heads", heads),) + ((("kv_heads", kv_heads),) if kv_heads is not None else ()):
        if not whole_count(n):
            raise UserError(f"Monitor({name}={n!r}): a number of heads, 1 or more")
    if head_dim is not None and not whole_count(head_dim):
        raise UserError(f"Monitor(head_dim={head_dim!r}): the width of one head, a whole number >= 1")
    if kv_heads is not None and heads % kv_heads:
        raise UserError(f"Monitor(heads={heads}, kv_heads={kv_heads}): heads must be a multiple of kv_heads")
    o = _o_width(layer, patterns)
    if patterns.qkv and kv_heads is None and o is not None and o % heads == 0:
        kv_heads = _fused_kv_heads(layer, patterns, heads, o // heads)
    head_dim = _head_dim(layer, patterns, heads, kv_heads or heads, head_dim)
    if o is not None and o != heads * head_dim:  # W_o reads the H heads side by side
        raise UserError(f"Monitor(heads={heads}, kv_heads={kv_heads}): {patterns.o!r} reads {o} features, not "
                        f"{heads} heads × {head_dim}; give the model's own head counts (kv_heads= under "
                        "grouped-query or multi-query attention)")
    return head_dim, _kv_heads(layer, patterns, heads, kv_heads, head_dim)


def _weight(layer: nn.Module, name: str | None) -> torch.Tensor | None:
    weight = getattr(ModuleAdapter.sub(layer, name), "weight", None) if name else None
    return weight if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def _projection(layer: nn.Module, patterns: Patterns, i: int) -> tuple[str, torch.Tensor | None]:
    """The name and (out, in) weight of the q (i = 0) or k (i = 1) projection (the fused QKV's for a
    fused one), through `patterns.w` when the tap is an identity module; None when neither has one."""
    name = patterns.qkv or (patterns.q, patterns.k)[i]
    weight = _weight(layer, name)
    if weight is None and patterns.w and not patterns.qkv:
        name = patterns.w[i]
        weight = _weight(layer, name)
    if weight is None:
        return name, None
    return name, weight.t() if patterns.conv1d else weight  # Conv1D stores (in, out)


def _o_width(layer: nn.Module, patterns: Patterns) -> int | None:
    """The input features of the output projection: H·D."""
    weight = _weight(layer, patterns.o)
    return None if weight is None else weight.shape[0 if patterns.conv1d else 1]


def _fused_kv_heads(layer: nn.Module, patterns: Patterns, heads: int, head_dim: int) -> int | None:
    """A fused QKV of (H + 2·Hkv)·D features with D = W_o's width / H: Hkv (None when that does not fit).
    Without it, multi-query [q | k | v] of 4 heads of 8 (48 features) read as 12 heads of 4."""
    _, weight = _projection(layer, patterns, 0)
    if weight is None or weight.shape[0] % head_dim:
        return None
    kv, odd = divmod(weight.shape[0] // head_dim - heads, 2)
    return kv if kv >= 1 and not odd and heads % kv == 0 else None


def _head_dim(layer: nn.Module, patterns: Patterns, heads: int, kv_heads: int, head_dim: int | None) -> int:
    """Head width from the q (or fused QKV) projection: q is H·D wide, a fused QKV (H + 2·Hkv)·D; a
    `head_dim` given must agree. Without a weight to read (an identity tap, no `w`), `head_dim` is needed."""
    name, weight = _projection(layer, patterns, 0)
    if weight is None:
        if head_dim is not None:
            return head_dim
        raise UserError(f"Monitor(patterns=...): {name!r} has no (out, in) weight to read the head width from; "
                        "give head_dim=")
    out = weight.shape[0]
    width = heads + 2 * kv_heads if patterns.qkv else heads
    if head_dim is not None and out != width * head_dim:
        raise UserError(f"Monitor(heads={heads}, kv_heads={kv_heads}, head_dim={head_dim}): {name!r} has {out} output "
                        f"features, not {width} heads × {head_dim}; give the model's own head counts and width")
    if out % width:
        raise UserError(f"Monitor(heads={heads}, kv_heads={kv_heads}): the projection's {out} output features do not "
                        f"split into {width} heads of one width; give the model's own head counts")
    return out // width


def _kv_heads(layer: nn.Module, patterns: Patterns, heads: int, kv_heads: int | None, head_dim: int) -> int | None:
    """Key heads from a separate k projection's width (a fused QKV's are `kv_heads`): without
    `kv_heads`, a grouped-query model's W_k and W_v were split into `heads` heads of the wrong width."""
    name, weight = (None, None) if patterns.qkv else _projection(layer, patterns, 1)
    if weight is None:
        return kv_heads
    out = weight.shape[0]
    if out % head_dim or heads % (out // head_dim):
        raise UserError(f"Monitor(heads={heads}, head_dim={head_dim}): {name!r} has {out} output features, not a "
                        f"number of key heads of width {head_dim} that divides {heads}")
    if kv_heads is not None and kv_heads != out // head_dim:
        raise UserError(f"Monitor(kv_heads={kv_heads}): {name!r} has {out} output features, {out // head_dim} key "
                        f"heads of width {head_dim}")
    return out // head_dim
