"""What a model that learned nothing beyond the data's first two moments scores: the bar "learning happened"
must clear (the closed forms of :mod:`difflab.diffusion.gaussian`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.diffusion.gaussian import GaussianData
from difflab.diffusion.schedule import NoiseSchedule


def agnostic_eps(schedule: NoiseSchedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(x_t, t) = sqrt(1 - alpha_bar_t) x_t``, the optimum for data at 0: a model that ignores the data."""
    return lambda x_t, t: (1 - schedule.alpha_bar[t]).sqrt().reshape((-1,) + (1,) * (x_t.ndim - 1)) * x_t


def gaussian_eps(data: torch.Tensor, schedule: NoiseSchedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``eps(x_t, t)`` (x_t (B, ...), t (B,)) of a Gaussian with the mean and covariance of ``data`` (N, ...): the
    best linear denoiser."""
    gaussian = GaussianData.fit(data)
    return lambda x_t, t: gaussian.eps(x_t, schedule.alpha_bar.double()[t])


def gaussian_score(data: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``score(x, sigma)`` (x (B, ...), sigma (B,), as the NCSN models are called) of a Gaussian with the mean and
    covariance of ``data`` (N, ...), blurred by noise of std sigma."""
    return GaussianData.fit(data).score


def gaussian_samples(points: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples (n, D) of the Gaussian with the mean and covariance of ``points`` (N, D)."""
    points = points.double()
    root = torch.linalg.cholesky(torch.cov(points.T))
    noise = torch.randn(n, points.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (points.mean(0) + noise @ root.T).float()
