"""Shared test set-up: quiet warnings from the diffusers oracle, fixed threads, small helpers."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*deprecated.*")
# Threads: torch's default (all cores, or OMP_NUM_THREADS when set). On a machine busy with other work,
# OMP_NUM_THREADS=1 avoids OpenMP threads spinning against each other.


class FixedEps(torch.nn.Module):
    """A deterministic stand-in for a trained eps network: ``tanh(x W + 0.01 t)``, any (B, D) input."""

    def __init__(self, dim: int = 2, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(dim, dim, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        return torch.tanh(flat @ self.weight + 0.001 * t[:, None].float()).reshape(x.shape)


@pytest.fixture
def fixed_eps() -> FixedEps:
    return FixedEps()
