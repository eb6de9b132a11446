"""tqdm progress bars that stay quiet in logs: on a terminal they refresh often, elsewhere (CI, files)
at most every 30 seconds."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm`` with ``mininterval`` chosen by whether stderr is a terminal; ``disable`` is respected. On a
    terminal a finished bar clears its line; in a log its final state stays, ended by a newline (a cleared bar
    would leave a carriage return that glues the next line, say an error, onto it)."""
    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.2 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", not interactive)
    return tqdm(iterable, **kwargs)
