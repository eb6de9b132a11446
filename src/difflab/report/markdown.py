"""Building blocks of ``report.md``: tables, figures and an environment summary."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A number formatted for a table (``-`` for missing)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


def figure(path: Path, run_dir: Path, caption: str) -> str:
    """A Markdown image link relative to the run folder."""
    relative = Path(path).relative_to(run_dir)
    return f"![{caption}]({relative.as_posix()})\n\n*{caption}*"


def figure_lines(path: Path | None, run_dir: Path, caption: str) -> list[str]:
    """:func:`figure` and a blank line, or nothing when the figure was not drawn (``path`` is ``None``)."""
    return [] if path is None else [figure(path, run_dir, caption), ""]


def environment() -> dict[str, str]:
    """Versions, device and threads of the machine that made the run."""
    import numpy
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    try:
        from importlib.metadata import version

        info["difflab"] = version("difflab")
    except Exception:  # running from a source tree that is not installed
        info["difflab"] = "source"
    return info
