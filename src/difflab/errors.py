"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a corrupt checkpoint) raises a
:class:`DifflabError` with a one-line message; the CLI prints it and exits non-zero instead of showing
a traceback.
"""

from __future__ import annotations


class DifflabError(Exception):
    """An error caused by user input, reported as one line without a traceback."""


class ConfigError(DifflabError):
    """An unknown key, a wrong type or an invalid value in a config or an override."""


class DataError(DifflabError):
    """Missing, unreadable or malformed data."""


class CheckpointError(DifflabError):
    """A missing, corrupt or incompatible checkpoint."""


class TrainingDiverged(DifflabError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``exc``'s message (its type's name when it has none), cut to ``limit`` characters
    when given: for one-line reports of errors raised by other libraries."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def torch_load_problem(exc: BaseException) -> str:
    """What went wrong when ``torch.load(..., weights_only=True)`` raised ``exc``, in a few words: torch's own
    message for a file that is not plain tensors advises loading it with ``weights_only=False``, which runs any code a
    pickle holds, and a file that is not a torch file at all raises whatever its first bytes lead to (a bare
    ``KeyError: 101`` for a text file)."""
    if isinstance(exc, OSError):  # the file system's reason (a permission, a folder) is the useful one
        return first_line(exc)
    if "Weights only load failed" in str(exc):
        return "it holds something other than tensors, or is damaged"
    return f"it is not a torch file, or is damaged: {type(exc).__name__}: {first_line(exc, 80)}"
