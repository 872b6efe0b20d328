"""Reading a file the user named, safely: only a regular file of a bounded size is read.

A path from the command line, a config or a folder may name anything: a FIFO (reading it blocks
until a writer comes, perhaps never), a socket (it cannot be opened), a device such as /dev/zero
(it never ends and fills the memory) or a folder. `read_regular` refuses each of them at once with
one line naming the file, raised as the error class its caller chose (ConfigError for a config,
DataError for a corpus, ...), so the CLI prints it and exits 2. No other rankprobe import, so every
module may use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

# what a path that is not a regular file names, in words a user knows
_KINDS = ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "pipe (FIFO)"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def memory_bound() -> int:
    """An eighth of the machine's memory: the default bound on a file read whole (what is read is held
    several times over while it is decoded, split and parsed)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8


def size_text(n: int) -> str:
    """A byte count as people say it: '512 bytes', '1.6 MiB', '31.2 GiB'."""
    if n < 2**20:
        return f"{n} bytes"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def read_regular(path: str | Path, what: str, error: type[Exception], *, expect: str = "a regular file",
                 limit: int | None = None, hint: str = "") -> bytes:
    """The whole contents of the regular file at `path`. Anything else raises `error(message)`, one
    line naming the file as `what` ('config file', 'corpus file'):

    - missing: "{what} not found: {path}";
    - a folder, pipe, socket or device: "{what} {path} is not {expect} but a folder";
    - over `limit` bytes (default `memory_bound()`): "{what} {path} is 2.0 GiB, more than ...";
    - any other failure: "cannot read {what} {path}: {the system's reason}".

    `hint` (what to give instead) is added in parentheses to the first three. The name is checked
    before it is opened (a socket cannot be opened at all), opened non-blocking (so even a FIFO with no
    writer returns at once), and what was opened is checked again (the name may have changed hands in
    between); then exactly the size it had is read, so a file still growing is cut where it stood.
    """
    path = Path(path)
    bound = (size_text(limit) if limit is not None
             else f"an eighth of this machine's memory ({size_text(memory_bound())})")
    limit = memory_bound() if limit is None else limit
    extra = f" ({hint})" if hint else ""

    def refuse(st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "special file")
            raise error(f"{what} {path} is not {expect} but a {kind}{extra}")
        if st.st_size > limit:
            raise error(f"{what} {path} is {size_text(st.st_size)}, more than {bound}{extra}")

    def unreadable(e: Exception) -> Exception:  # an OSError, or ValueError for a NUL in the name
        if isinstance(e, FileNotFoundError):
            return error(f"{what} not found: {path}{extra}")
        return error(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}")

    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        raise unreadable(e) from None
    refuse(st)  # a socket cannot even be opened
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise unreadable(e) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        refuse(st)  # what was opened: the name may have changed hands since the stat
        try:
            return f.read(st.st_size)
        except OSError as e:
            raise unreadable(e) from None
