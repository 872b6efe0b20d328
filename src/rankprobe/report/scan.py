"""`scan.md`: one row per value of a scanned setting (a learning-rate scan before a study), from the
runs' metrics files alone. The lowest final validation loss among runs that finished is marked."""

from __future__ import annotations

import math
from pathlib import Path

from rankprobe.report.fmt import prose, table
from rankprobe.runfolder import end_of, header, run_rows, status_of, write_atomic


def scan_rows(param: str, paths: list[Path]) -> list[dict]:
    """Per metrics file: the scanned value, status, tokens, final val loss, mean key PR at the
    headline tap and max attention logit at the last checkpoint, and W_k's mean relative step (None
    where absent, and for runs that did not finish)."""
    out = []
    for path in paths:
        rows = run_rows(path.parent)
        run = header(rows) or {}
        value = path.parent.name.split("=", 1)[-1]
        end, ev = end_of(rows), next((r for r in reversed(rows) if r.get("kind") == "eval"), None)
        tap = run.get("config", {}).get("probe", {}).get("tap", "norm")
        last_tokens = ev["tokens"] if ev else None
        keys = [r["pr"] for r in rows if r.get("kind") == "probe" and r.get("tensor") == "k"
                and r.get("tap") == tap and r.get("tokens") == last_tokens and r.get("pr") is not None]
        logits = [r["max_logit"] for r in rows if r.get("kind") == "attn" and r.get("tokens") == last_tokens
                  and r.get("max_logit") is not None]
        steps = [r["update_rel"] for r in rows if r.get("kind") == "update" and r.get("matrix") == "k"
                 and r.get("update_rel") is not None]
        status = status_of(rows)
        if status != "finished":  # numbers from before a run stopped are not its final ones
            ev, keys, logits, steps = None, [], [], []
        out.append({
            "value": value, "status": status,
            "tokens": end["tokens"] if end else (last_tokens or 0),
            "val_loss": ev["val_loss"] if ev else None,
            "key_pr": sum(keys) / len(keys) if keys else None,
            "max_logit": max(logits) if logits else None,
            "k_step": sum(steps) / len(steps) if steps else None,
            "arm": run.get("arm", "?"), "tap": tap,
        })
    return out


def _fmt(x, digits: int, style: str = "f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}{style}}"


def write_scan(out_dir: Path, param: str, paths: list[Path]) -> Path:
    rows = scan_rows(param, paths)
    done = [r for r in rows if r["status"] == "finished" and r["val_loss"] is not None]
    best = min(done, key=lambda r: r["val_loss"]) if done else None
    arms = sorted({r["arm"] for r in rows})
    lines = [
        f"# Scan of `{param}`", "",
        prose("scan", n=len(rows), arms=", ".join(f"`{a}`" for a in arms), tap=rows[0]["tap"] if rows else "norm"), "",
        *table([f"`{param}`", "status", "tokens", "final val loss", "key PR", "max attention logit", "W_k step"],
               [[r["value"] + (" **(best)**" if r is best else ""), r["status"], f"{r['tokens']:,}",
                 _fmt(r["val_loss"], 4), _fmt(r["key_pr"], 2), _fmt(r["max_logit"], 2),
                 _fmt(r["k_step"], 1, "e")] for r in rows]),
        "", f"Best: `{param} = {best['value']}`." if best else "No run finished: no best value.", ""]
    path = Path(out_dir) / "scan.md"
    write_atomic(path, "\n".join(lines))
    return path
