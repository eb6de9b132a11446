"""What a model that learned nothing beyond the data's first two moments scores: the bar "learning happened"
must clear."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.diffusion.schedule import NoiseSchedule


def gaussian_eps(data: torch.Tensor, schedule: NoiseSchedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact eps-prediction for data ``N(m, S)`` with the mean and covariance of ``data`` (N, ...): the best
    linear denoiser. With ``S = U diag(l) U^T`` and ``a = alpha_bar_t``,
    ``E[x_0 | x_t] = m + U diag(sqrt(a) l / (a l + 1 - a)) U^T (x_t - sqrt(a) m)`` and
    ``eps = (x_t - sqrt(a) E[x_0 | x_t]) / sqrt(1 - a)``. Returns ``eps(x_t, t)`` for x_t (B, ...), t (B,)."""
    flat = data.reshape(len(data), -1).double()
    mean = flat.mean(0)
    eigenvalues, basis = torch.linalg.eigh(torch.cov(flat.T))
    eigenvalues = eigenvalues.clamp(min=0)
    alpha_bar_table = schedule.alpha_bar.double()

    def eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = alpha_bar_table[t][:, None]
        centred = x_t.reshape(len(x_t), -1).double() - alpha_bar.sqrt() * mean
        gain = alpha_bar.sqrt() * eigenvalues / (alpha_bar * eigenvalues + 1 - alpha_bar)
        x0 = mean + ((centred @ basis) * gain) @ basis.T
        out = (x_t.reshape(len(x_t), -1).double() - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return out.to(x_t.dtype).reshape(x_t.shape)

    return eps


def gaussian_samples(points: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples (n, D) of the Gaussian with the mean and covariance of ``points`` (N, D)."""
    points = points.double()
    root = torch.linalg.cholesky(torch.cov(points.T))
    noise = torch.randn(n, points.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (points.mean(0) + noise @ root.T).float()


def gaussian_score(data: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact score of data ``N(m, S)`` (the mean and covariance of ``data`` (N, ...)) blurred by noise of std
    sigma: ``grad log p_sigma(x) = -(S + sigma^2 I)^-1 (x - m)``. Returns ``score(x, sigma)`` for x (B, ...),
    sigma (B,), as the NCSN models are called."""
    flat = data.reshape(len(data), -1).double()
    mean = flat.mean(0)
    eigenvalues, basis = torch.linalg.eigh(torch.cov(flat.T))
    eigenvalues = eigenvalues.clamp(min=0)

    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        centred = x.reshape(len(x), -1).double() - mean
        scaled = (centred @ basis) / (eigenvalues + sigma.double()[:, None] ** 2)
        return (-(scaled @ basis.T)).to(x.dtype).reshape(x.shape)

    return score
