"""Hugging Face causal-LM families: one table row each, and the adapter that reads the model's own rotary.

Every family's taps are `adapters.Patterns` on its attention module (`FAMILIES`). What differs
from a generic `ModuleAdapter` is the rope tap: it is the q and k the model hands its attention
kernel, so partial rotary (Phi, StableLM, GPT-NeoX), scaled rotary, Gemma 3's two rotary tables and
SmolLM3's layers without rotary are whatever the model itself did. Families whose attention calls
the `transformers` attention interface are intercepted there: while a probe runs, the layer's
`config._attn_implementation` names a function that records q and k, checks the call against the
layer's `AttentionSpec` (scale, soft-cap, sliding window, and the mask itself) and calls the
model's own kernel. Falcon, which calls SDPA itself, is rotated with its own
`apply_rotary_pos_emb` and the (cos, sin) the layer received. docs/probes.md lists every family.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..config import DataError
from .adapters import AttentionSpec, ModuleAdapter, Patterns, in_backward, match_layers, split_fused

LLAMA = Patterns(layers="model.layers.*.self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj")
QK_NORM = replace(LLAMA, q_norm="q_norm", k_norm="k_norm")  # per head, on (B, T, H, D)
PHI = replace(LLAMA, o="dense", q_norm="q_layernorm", k_norm="k_layernorm", norm_layout="bhtd")


@dataclass(frozen=True)
class Family:
    patterns: Patterns
    optional_norm: bool = False  # QK-Norm present only when the config turns it on
    rope: str = "interface"  # or "rotate": the family calls attention itself (Falcon)
    learned_positions: bool = False  # a table of position embeddings: nothing exists past its end (GPT-2)


FAMILIES: dict[str, Family] = {
    "llama": Family(LLAMA), "mistral": Family(LLAMA), "mixtral": Family(LLAMA), "qwen2": Family(LLAMA),
    "qwen2_moe": Family(LLAMA), "granite": Family(LLAMA), "granitemoe": Family(LLAMA), "smollm3": Family(LLAMA),
    "olmo": Family(LLAMA), "gemma": Family(LLAMA), "gemma2": Family(LLAMA), "starcoder2": Family(LLAMA),
    "qwen3": Family(QK_NORM), "qwen3_moe": Family(QK_NORM), "cohere": Family(QK_NORM, optional_norm=True),
    "gemma3_text": Family(replace(QK_NORM, norm_layout="bhtd")),
    "olmo2": Family(replace(QK_NORM, norm_layout="flat")),  # one RMSNorm over all heads, before the split
    "phi": Family(PHI, optional_norm=True),
    "stablelm": Family(replace(PHI, o="o_proj"), optional_norm=True),
    "phi3": Family(Patterns(layers="model.layers.*.self_attn", qkv="qkv_proj", fused="blocks", o="o_proj")),
    "gpt2": Family(Patterns(layers="transformer.h.*.attn", qkv="c_attn", fused="blocks", o="c_proj", conv1d=True),
                   learned_positions=True),
    "gpt_neox": Family(Patterns(layers="gpt_neox.layers.*.attention", qkv="query_key_value", fused="heads",
                                o="dense")),
    "falcon": Family(Patterns(layers="transformer.h.*.self_attention", qkv="query_key_value", o="dense"),
                     rope="rotate"),
}
SUPPORTED = tuple(sorted(FAMILIES))
_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
TAP_IMPL = "rankprobe_taps"  # the attention-interface name the interception registers under
_ACTIVE: dict[int, object] = {}  # id(attention module) -> its interceptor, while taps are attached


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    c = text_config(config)
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)


def hf_adapter(model: nn.Module) -> HFAdapter:
    """The adapter for a Hugging Face causal LM; DataError for a family outside FAMILIES."""
    mt = text_config(model.config).model_type
    if mt not in FAMILIES:
        raise DataError(f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
    return HFAdapter(model, mt, FAMILIES[mt])


def _heads(model_type: str, c, attn) -> tuple[int, int, int, str | None]:
    """(heads, key heads, head width, fused layout override) of one family's attention."""
    H = c.num_attention_heads
    D = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or c.hidden_size // H
    if model_type == "falcon":
        if c.alibi:
            raise DataError("Falcon with ALiBi position biases is not supported (the attention lens cannot "
                            "reproduce the bias); rotary Falcon models are")
        if c.new_decoder_architecture:
            return H, c.num_kv_heads, D, "groups"
        return (H, 1, D, "groups") if c.multi_query else (H, H, D, "heads")
    return H, getattr(c, "num_key_value_heads", None) or H, D, None


class HFAdapter(ModuleAdapter):
    """Taps of a Hugging Face family (`FAMILIES[model_type]`), its rope taps from the model's own rotary."""

    def __init__(self, model: nn.Module, model_type: str, family: Family):
        c = text_config(model.config)
        p = family.patterns
        attn0 = match_layers(model, p.layers)[0]  # DataError for a model of no layers (num_hidden_layers 0)
        H, Hkv, D, layout = _heads(model_type, c, attn0)
        if layout:
            p = replace(p, fused=layout)
        if family.optional_norm and getattr(attn0, p.q_norm, None) is None:
            p = replace(p, q_norm=None, k_norm=None)
        unknown = [n for n in _NORM_NAMES if getattr(attn0, n, None) is not None and n not in (p.q_norm, p.k_norm)]
        if unknown:  # a norm the table does not know would make the norm tap lie
            raise DataError(f"{model_type}: attention has {', '.join(unknown)}, which RankProbe does not tap")
        self.model_type, self.rope, self.config = model_type, family.rope, c
        specs = [self._spec(a, c, D) for a in match_layers(model, p.layers)]
        super().__init__(model, p, heads=H, kv_heads=Hkv, head_dim=D, attention=specs,
                         forward=lambda m, idx: m(input_ids=idx, use_cache=False), max_positions=max_positions(c))

    @staticmethod
    def _spec(attn: nn.Module, c, D: int) -> AttentionSpec:
        """What the layer computes, read from the module (Gemma's query_pre_attn_scalar and Granite's
        attention_multiplier are already in `scaling`) and, for families that slide every layer, the config."""
        scale = getattr(attn, "scaling", None) or getattr(attn, "inv_norm_factor", None) or D ** -0.5
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(c, "sliding_window", None)
        return AttentionSpec(scale=float(scale), window=window or None,
                             softcap=getattr(attn, "attn_logit_softcapping", None) or None)

    def rope_is_hooked(self) -> bool:
        return True

    def attach_rope(self, layer: int, attn: nn.Module, q, k) -> list:
        if self.rope == "rotate":
            return self._rotate_hooks(attn, q, k)
        return self._intercept_hooks(layer, attn, q, k)

    def _intercept_hooks(self, layer: int, attn: nn.Module, q, k) -> list:
        """Route the layer's attention call through `_intercept` while the taps are attached."""
        from transformers import AttentionInterface

        AttentionInterface.register(TAP_IMPL, _intercept)
        config, impl = attn.config, attn.config._attn_implementation
        if impl == TAP_IMPL or id(attn) in _ACTIVE:  # one interceptor per layer: a second would starve the first
            raise DataError(f"{self.model_type}: taps are already attached to this model (two Monitors measuring "
                            "the same step?); measure with one at a time")
        eager = sys.modules[type(attn).__module__].eager_attention_forward
        inner = eager if impl == "eager" else AttentionInterface()[impl]  # the model's own kernel
        spec, name = self.specs[layer], f"{self.model_type} layer {layer}"

        def call(module, query, key, value, attention_mask, **kwargs):  # query (B, H, T, D), key (B, Hkv, T, D)
            if not in_backward():  # checkpointing's recompute: checked in the forward, whose mask `keep` was
                keep = self.padding() if self.padding is not None else None
                _check_call(name, spec, module, query.size(-2), attention_mask, kwargs, impl, keep)
            q(query.transpose(1, 2))
            k(key.transpose(1, 2))
            return inner(module, query, key, value, attention_mask, **kwargs)

        def pre(_m, _args):
            _set_impl(config, TAP_IMPL)

        def post(_m, _args, _out):
            _set_impl(config, impl)

        _ACTIVE[id(attn)] = call
        return [attn.register_forward_pre_hook(pre), attn.register_forward_hook(post), _Restore(attn, config, impl)]

    def _rotate_hooks(self, attn: nn.Module, q, k) -> list:
        """Falcon: the fused projection's q and k rotated by the family's own apply_rotary_pos_emb with
        the (cos, sin) the layer was given, as its forward does next."""
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        seen = {}
        H, Hkv, D, layout = self.heads, self.kv_heads, self.head_dim, self.p.fused

        def pre(_m, _args, kwargs):
            seen["cos_sin"] = kwargs["position_embeddings"]

        def fused(_m, _i, out):
            qs, ks, _ = split_fused(out, layout, H, Hkv, D)  # (B, T, H, D), (B, T, G, D)
            qr, kr = rotate(qs.transpose(1, 2), ks.transpose(1, 2), *seen["cos_sin"])  # (B, H, T, D)
            q(qr.transpose(1, 2))
            k(kr.transpose(1, 2))

        return [attn.register_forward_pre_hook(pre, with_kwargs=True),
                self.sub(attn, self.p.qkv).register_forward_hook(fused)]


class _Restore:
    """A hook handle that, on removal, undoes the interception even after an exception mid-forward."""

    def __init__(self, attn, config, impl):
        self.attn, self.config, self.impl = attn, config, impl

    def remove(self) -> None:
        _ACTIVE.pop(id(self.attn), None)
        _set_impl(self.config, self.impl)


def _set_impl(config, impl: str) -> None:
    # the plain attribute behind the `_attn_implementation` property: no sub-config walk on every layer
    internal = "_attn_implementation_internal"
    setattr(config, internal if hasattr(config, internal) else "_attn_implementation", impl)


def _intercept(module, query, key, value, attention_mask, **kwargs):
    return _ACTIVE[id(module)](module, query, key, value, attention_mask, **kwargs)


def _check_call(name: str, spec: AttentionSpec, module, T: int, mask, kwargs, impl: str,
                keep: torch.Tensor | None = None) -> None:
    """Refuse, rather than measure something else, when the kernel call differs from `spec`: with
    `keep` (B, T), the Monitor's padding mask of a padded batch, the model must mask exactly the
    padding, on top of `spec`, for every query that is a token (probes/padding.py)."""
    scaling = kwargs.get("scaling")
    scaling = module.head_dim ** -0.5 if scaling is None and hasattr(module, "head_dim") else scaling
    if scaling is None or not math.isclose(scaling, spec.scale, rel_tol=1e-6):
        raise DataError(f"{name}: attention scales logits by {scaling}, expected {spec.scale}")
    if (kwargs.get("softcap") or None) != spec.softcap:
        raise DataError(f"{name}: attention soft-caps logits at {kwargs.get('softcap')}, expected {spec.softcap}")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise DataError(f"{name}: attention sinks are not supported by the attention lens")
    if "sliding_window" in kwargs and (kwargs["sliding_window"] or None) != spec.window:
        raise DataError(f"{name}: attention slides a window of {kwargs['sliding_window']}, expected {spec.window}")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise DataError(f"{name}: cannot check the {impl} attention mask; load the model with sdpa or eager")
    if mask is not None and mask.ndim == 2:  # flash attention's padding mask
        if not torch.equal(mask.bool(), keep if keep is not None else torch.ones_like(mask, dtype=torch.bool)):
            raise DataError(f"{name}: the model's padding mask is not the attention_mask it was called with "
                            "(padded sequences are measured from the training forward of a Monitor only)")
        mask = None
    elif mask is None and keep is not None:
        raise DataError(f"{name}: the model's attention ignores the padding of its attention_mask; the attention "
                        "lens would not measure what it computes")
    if mask is None and "flash" in impl:  # causal, and the window is the sliding_window checked above
        return
    if mask is None:  # SDPA's is_causal
        if not getattr(module, "is_causal", True) or (spec.window is not None and spec.window < T):
            raise DataError(f"{name}: the model attends causally without a window; expected {spec}")
        return
    want = spec.visible(T, device=mask.device)
    seen = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    seen = seen[..., -T:, -T:]
    if keep is not None:  # tokens see tokens only; what padding's own rows see does not matter
        want = want & keep[:, None, None, :]
        seen = seen | ~keep[:, None, :, None]
        want = want | ~keep[:, None, :, None]
    if not torch.equal(seen, want.expand_as(seen)):
        kind = "sliding-window causal" if spec.window else "causal"
        raise DataError(f"{name}: the model's attention mask is not the {kind} mask the attention lens assumes"
                        + (" for the padding of its attention_mask" if keep is not None else
                           " (padded sequences are measured from the training forward of a Monitor only)"))
