"""Padded batches in the training forward: which tokens the Monitor measures.

A Hugging Face model trained on padded batches (a collator that pads each batch to its longest
sequence) is called with `attention_mask` (B, T), 1 for a token and 0 for padding. The padding's
q, k and v are computed like any token's but never attended to: folded into the key statistics they
would bias every spectrum, and in the attention lens a left-padded query would "see" pad keys the
model masks. So the Monitor reads the mask of every forward it measures (`forward_mask`, a forward
pre-hook on the model) and measures the tokens alone: the spectra over the unpadded positions
(`select`), the attention lens over each sequence's tokens as a sequence of its own
(`AttentionStats.add_padded`), exactly what the model's padding and causal masks let each query see.

What cannot be measured this way is refused in one line rather than measured wrong: a mask that is
not a (B, T) 0/1 padding mask (4-D or additive masks), a row whose tokens are not one contiguous run
(padding inside a sequence), and, for the attention lens, packed sequences whose `position_ids`
restart inside a row (the model attends within each document; the lens would attend across them).
"""

from __future__ import annotations

import inspect

import torch

from ..errors import UserError


def mask_argument(model) -> int | None:
    """The position of `attention_mask` among `model.forward`'s positional parameters, or None."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index("attention_mask") if "attention_mask" in positional else None


def forward_mask(args: tuple, kwargs: dict, position: int | None, attention: bool) -> torch.Tensor | None:
    """The padding mask (B, T) bool of one forward call, or None when every token counts (no mask, or
    one of all ones). UserError for what the Monitor cannot measure (module docstring)."""
    mask = kwargs.get("attention_mask")
    if mask is None and position is not None and len(args) > position:
        mask = args[position]
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or bool(((mask != 0) & (mask != 1)).any()):
            what = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise UserError(f"Monitor: the model was called with an attention_mask of {what} that is not a "
                            "(batch, sequence) mask of 0s and 1s; from the training forward only padding can "
                            "be measured (use Monitor.probe(tokens) for other masks)")
        keep = mask != 0
        starts = keep[:, :1].sum(1) + (keep[:, 1:] & ~keep[:, :-1]).sum(1)  # runs of tokens per row
        if bool((starts > 1).any()):
            raise UserError("Monitor: a row of the attention_mask has padding between its tokens; only left "
                            "or right padding (one run of tokens per row) can be measured")
        if bool(keep.all()):
            keep = None
    if attention and _restarts(kwargs.get("position_ids"), keep):
        raise UserError("Monitor: position_ids restart inside a row (packed sequences): the attention lens "
                        "would attend across documents the model keeps apart; Monitor(attention=False) "
                        "measures the spectra alone")
    return keep


def _restarts(positions, keep: torch.Tensor | None) -> bool:
    """Whether `position_ids` (B, T) step by anything but 1 between neighbouring tokens of a row."""
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or positions.size(1) < 2:
        return False
    steps = positions[:, 1:] - positions[:, :-1]
    pairs = torch.ones_like(steps, dtype=torch.bool) if keep is None else keep[:, 1:] & keep[:, :-1]
    return bool(((steps != 1) & pairs).any())


def select(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The tokens of a tap's (B, T, H, D) activations that `keep` (B, T) marks, as (N, H, D)."""
    if tuple(x.shape[:2]) != tuple(keep.shape):
        raise UserError(f"Monitor: a tap's activations of shape {tuple(x.shape)} do not match the "
                        f"attention_mask's {tuple(keep.shape)} (batch, sequence)")
    return x[keep]
