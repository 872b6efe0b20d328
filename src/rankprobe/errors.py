"""The errors RankProbe raises for bad input, in one place (no torch import).

Every subclass of UserError is a problem with what the user gave (a config value, a file, a folder),
not a bug: `rankprobe.cli.main` prints it as one line and exits 2, with no traceback. Raise the most
specific class; the message names the key or file and says what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the CLI prints it as one line and exits 2, no traceback."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an out-of-range value in a config or override."""


class DataError(UserError):
    """A corpus, tokenizer file, model folder or checkpoint that cannot be used."""


class MetricsError(UserError, ValueError):
    """A metrics file that cannot be read: a corrupt line that is not a torn last line, or a row whose
    fields do not have the types docs/metrics.md gives them."""


class FolderError(UserError):
    """A run folder that cannot be used as asked: not a RankProbe run, not writable, full, locked."""
