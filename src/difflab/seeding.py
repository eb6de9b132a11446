"""Seeds derived from (seed, index, stream), so random streams are functions of a step, not of history."""

from __future__ import annotations

import random

import numpy as np
import torch


def mix_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for ``(seed, index, stream)`` (splitmix64-style mixing: neighbours are unrelated)."""
    value = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + stream * 0x94D049BB133111EB) & (2**64 - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (value ^ (value >> 32)) & (2**63 - 1)


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device).manual_seed(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (model initialisation uses torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RowGenerator(torch.Generator):
    """The random stream of rows ``[start, stop)`` of a global batch of ``total`` rows.

    Data-parallel ranks and gradient-accumulation micro-batches each train on a slice of the step's global
    batch. Per-example draws made through :func:`batch_randn` / :func:`batch_randint` take the whole
    batch's draw from ``shared`` (seeded like the single-process generator of the step) and keep this
    slice, so a loss is the same function of the global batch whatever the number of processes or
    micro-batches. Draws made directly from the generator itself use its own stream, seeded by the slice,
    so they are independent across slices. Build one with :meth:`for_rows`.
    """

    start: int
    stop: int
    total: int
    shared: torch.Generator

    @classmethod
    def for_rows(cls, seed: int, start: int, stop: int, total: int, device: torch.device | str = "cpu") -> RowGenerator:
        if not 0 <= start < stop <= total:
            raise ValueError(f"rows [{start}, {stop}) do not lie in a batch of {total}")
        generator = cls(device)
        generator.manual_seed(mix_seed(seed, start + 1, 13))
        generator.start, generator.stop, generator.total = start, stop, total
        generator.shared = torch.Generator(device).manual_seed(seed)
        return generator


def _rows_of(generator: torch.Generator, rows: int) -> RowGenerator | None:
    if not isinstance(generator, RowGenerator):
        return None
    if rows != generator.stop - generator.start:
        raise ValueError(
            f"a draw for {rows} rows from the generator of rows [{generator.start}, {generator.stop}): "
            "per-example draws must cover the whole micro-batch"
        )
    return generator


def batch_randn(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Standard normal per-example noise of ``shape`` (B, ...), drawn on the generator's device, moved to ``device``.

    With a :class:`RowGenerator` the whole batch's noise (total, ...) is drawn and rows ``[start, stop)`` kept.
    """
    rows = _rows_of(generator, shape[0])
    if rows is None:
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    full = torch.randn((rows.total, *shape[1:]), generator=rows.shared, device=rows.device)
    return full[rows.start : rows.stop].to(device)


def batch_randint(high: int, rows: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """``U{0, ..., high-1}`` per example, shape (rows,); like :func:`batch_randn` for a :class:`RowGenerator`."""
    sliced = _rows_of(generator, rows)
    if sliced is None:
        return torch.randint(0, high, (rows,), generator=generator, device=generator.device).to(device)
    full = torch.randint(0, high, (sliced.total,), generator=sliced.shared, device=sliced.device)
    return full[sliced.start : sliced.stop].to(device)
