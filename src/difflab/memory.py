"""How much memory the machine can still give this process, for refusing sizes that cannot fit before any work."""

from __future__ import annotations


def available_memory_bytes() -> int | None:
    """The memory the OS can give this process now (``MemAvailable`` of ``/proc/meminfo``), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_bytes(size: int) -> str:
    """``size`` in GiB (from 1 GiB) or MiB, one decimal."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def refuse_unless_fits(needed: int, what: str, advice: str, error: type[Exception]) -> None:
    """Raise ``error`` (one line: ``what``, the bytes needed and available, ``advice``) when ``needed`` bytes exceed
    the memory available; where that is unknown, nothing is refused."""
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise error(
            f"{what} need at least {format_bytes(needed)} of memory, and {format_bytes(available)} is available: "
            f"{advice}"
        )
