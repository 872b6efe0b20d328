"""What a run records about the machine it ran on (`env_info`); the TensorBoard mirror of its rows (rankprobe.sinks).

The rows themselves, their writer and the folder's files belong to rankprobe.runfolder.
"""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__


def env_info(device: torch.device) -> dict:
    """git SHA of the source, versions, device and host: enough to say where a number came from."""
    src = Path(__file__).resolve().parent
    sha, dirty = _git(src, "rev-parse", "HEAD"), _git(src, "status", "--porcelain", "--", ".")
    dirty = None if sha is None or dirty is None else dirty != ""  # the package's files differ from HEAD
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "git_sha": sha, "git_dirty": dirty, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "device": f"{device.type}: {name}",
        "hostname": socket.gethostname(), "rankprobe": __version__, "transformers": _version("transformers"),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _git(cwd: Path, *args: str) -> str | None:
    """The stripped output of `git ARGS` in `cwd`; None outside a repository or without git."""
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None



def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
