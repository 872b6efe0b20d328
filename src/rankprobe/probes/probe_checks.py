"""What `rankprobe probe` checks of its checkpoints, of what it measured and of the folder it writes into.

A series whose configs differ in shape, activations that are not finite only in a reduced dtype,
checkpoints that are copies of one another, and an `--out` holding a run the probe did not write
(which `--force` must never replace).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

from ..config import DataError, UserError
from ..runfolder import header, read_rows
from .families import text_config

log = logging.getLogger(__name__)


def say_copies(seen: list[dict]) -> None:
    """A warning for checkpoints holding the very same weights as an earlier one: a copy saved under two
    steps draws a flat stretch of trajectory that training never made."""
    first: dict[str, dict] = {}
    for c in seen:
        earlier = first.setdefault(c["weights_sha256"], c)
        if earlier is not c:
            log.warning("%s (step %d) holds the same weights as %s (step %d): a copy?", c["path"], c["step"],
                        earlier["path"], earlier["step"])


def holds_a_probe(metrics: Path) -> bool:
    """Whether `metrics` is a probe's (its run row lists the probed `checkpoints`): a training run's or a
    Monitor's rows, or a file that cannot be read, are not this command's to replace."""
    try:
        with warnings.catch_warnings(action="ignore"):
            run = header(read_rows(metrics))
    except UserError:
        return False
    return run is not None and isinstance(run.get("checkpoints"), list)


def check_finite(path: Path, probe_rows: list[dict], dtype: str) -> None:
    """DataError when the activations are not finite. A tap whose mean is not finite saw inf or NaN (a head
    of all-zero keys has a null PR but a finite mean of 0). In fp32 only a model that is nothing but
    NaN is refused (a diverged checkpoint's finite layers are still its answer); in bf16 or fp16 any
    layer is, since those numbers would be the dtype's range and not the model (fp16 ends at 65504)."""
    bad = sorted({r["layer"] for r in probe_rows if not all(
        isinstance(m, (int, float)) and math.isfinite(m) for m in _as_list(r.get("mean_norm")))})
    finite = [r.get("pr") is not None and math.isfinite(r["pr"]) for r in probe_rows]
    if probe_rows and not any(finite):  # else rows of nulls, and exit 0
        raise DataError(f"{path}: every key statistic is NaN or infinite: the model's activations are not "
                        "finite" + (" (try --dtype fp32)" if dtype != "fp32" else " (check its config.json)"))
    if bad and dtype != "fp32":
        raise DataError(f"{path}: the activations of layer {', '.join(map(str, bad))} are not finite in {dtype} "
                        "(beyond its range, or NaN); probe with --dtype fp32")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


SHAPE = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
         "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings")


def same_shape(first: Path, config, path: Path, other) -> None:
    """A series is one model: a checkpoint whose config differs in shape is refused before anything is
    probed (the full check, on the loaded model, follows in `probe_series_to_dir`)."""
    a, b = text_config(config), text_config(other)
    for key in SHAPE:
        if getattr(a, key, None) != getattr(b, key, None):
            raise DataError(f"{path} is another model than {first}: {key} {getattr(b, key, None)} against "
                            f"{getattr(a, key, None)}; a series is one model")
