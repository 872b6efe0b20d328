"""Text helpers shared by every Markdown section: the one table writer, the one ± formatter, token
and seed counts in words, and the report's fixed prose, which lives in `prose.toml` next to this module."""

from __future__ import annotations

import math
import tomllib
from functools import cache
from importlib.resources import files

from rankprobe.report.series import ArmSeries, Estimate


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table as lines."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def block(*parts: str | list[str]) -> list[str]:
    """Markdown lines: each part (a title or paragraph, or lines such as a table or a list) followed by
    one blank line."""
    return [line for part in parts for line in ([part] if isinstance(part, str) else part) + [""]]


def section(title: str, text: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled paragraph and its table as lines; [] without rows."""
    return block(title, text, table(header, rows)) if rows else []


def arm_cell(arm: str, reference: bool = False) -> str:
    """An arm as a table cell or in prose: '`muon`', or '`hf:qwen3` (pretrained)' for a reference."""
    return f"`{arm}`" + (" (pretrained)" if reference else "")


ARM_COLUMNS = ["arm", "seeds", "tokens"]
"""the headers of `arm_cells`"""


def arm_cells(s: ArmSeries, seeds: str | None = None) -> list[str]:
    """An arm's first cells in a table: the arm, its seeds (`seeds`, default the count) and the tokens of
    its final checkpoint; a pretrained reference has no seeds and no training tokens."""
    if s.reference:
        return [arm_cell(s.arm, True), "—", "—"]
    return [arm_cell(s.arm), seeds or str(s.n_seeds), f"{int(s.tokens[-1]):,}"]


def pm(e: Estimate, digits: int = 2, sep: str = "", style: str = "f") -> str:
    """'mean ± half' to `digits` decimals (sep="," groups thousands; style="e" for scientific notation);
    no ± where the half-width is NaN (one seed), 'n/a' where the mean is."""
    if not math.isfinite(e.mean):
        return "n/a"
    spec = f"{sep}.{digits}{style}"
    return f"{e.mean:{spec}}" + (f" ± {e.half:{spec}}" if math.isfinite(e.half) else "")


def n_seeds(n: int) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} seed{'s' if n != 1 else ''}"


def fmt_tokens(n: float) -> str:
    """16384 -> '16k', 1_000_000 -> '1M', 2.5e9 -> '2.5B'."""
    n = float(n)
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


@cache
def _prose() -> dict:
    return tomllib.loads(files("rankprobe.report").joinpath("prose.toml").read_text(encoding="utf-8"))


def prose(section: str, key: str | None = None, **fields) -> str:
    """A paragraph of prose.toml (`[section] key`, or the top-level `section`), its {fields} filled in."""
    text = _prose()[section] if key is None else _prose()[section][key]
    return text.format(**fields) if fields else text
