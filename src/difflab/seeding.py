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
