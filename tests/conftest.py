"""Shared test set-up: quiet warnings from the diffusers oracle, one thread, small helpers."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*deprecated.*")
# One intra-op thread: the test models are tiny, and on a 2-core machine shared with other jobs two OpenMP
# threads made a 64-unit MLP's training step ~100x slower (30 s vs 0.25 s for 160 backward passes, measured
# with load average ~9): each op waits for the partner thread the scheduler has parked. DIFFLAB_TEST_THREADS
# overrides it.
torch.set_num_threads(int(os.environ.get("DIFFLAB_TEST_THREADS", "1")))


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


@pytest.fixture
def unet_labels():
    """The class labels every ``UNet`` forward call gets while the test runs (a list of (B,) tensors)."""
    from difflab.models.unet import UNet

    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, UNet):
            seen.append(args[2].clone())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield seen
    hook.remove()
