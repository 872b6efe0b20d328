"""RankProbe: does an optimizer or a normalisation make attention keys collapse into few dimensions?

The public API (docs/api.md): `Monitor` (rankprobe.monitor), `Patterns` and `AttentionSpec` (where a
model's taps sit and what its attention computes), and `load` (a run folder as a pandas DataFrame).
They are imported on first use, so `import rankprobe.runfolder` and the report need no torch.
"""

__version__ = "0.1.0"

_LAZY = {"Monitor": "monitor", "Patterns": "monitor", "AttentionSpec": "monitor", "flat_scalars": "monitor",
         "scalars_by_step": "monitor",
         "load": "frame", "export": "frame"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rankprobe' has no attribute {name!r}")
