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
