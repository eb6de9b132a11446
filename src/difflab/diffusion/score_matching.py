"""Noise levels and the denoising score matching objective of noise-conditional score networks.

NCSN (Song & Ermon 2019) learns ``s_theta(x, sigma) ~ grad_x log p_sigma(x)``, the score of the data
convolved with ``N(0, sigma^2 I)``, at K noise levels ``sigma_1 > ... > sigma_K``. Denoising score
matching (Vincent 2011) gives the regression target: for ``x~ = x + sigma z`` the score of the
perturbation kernel is ``grad log q_sigma(x~ | x) = -(x~ - x) / sigma^2 = -z / sigma``, and

    l(theta; sigma) = 1/2 E || s_theta(x~, sigma) + (x~ - x) / sigma^2 ||^2             (Song & Ermon eq. 5)
    L(theta) = E_sigma [ lambda(sigma) l(theta; sigma) ],  lambda(sigma) = sigma^2     (eq. 6)

is minimised by the true score of the noised data. With ``lambda = sigma^2`` every level's term is
``1/2 E || sigma s_theta(x~, sigma) + z ||^2``, of the same order at every sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import ConfigError
from difflab.seeding import batch_randint, batch_randn


@dataclass(frozen=True)
class NoiseLevelsConfig:
    """K noise levels spaced geometrically from ``sigma_max`` down to ``sigma_min`` (Song & Ermon 2019)."""

    sigma_max: float = 1.0
    sigma_min: float = 0.01
    num_levels: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ConfigError(
                f"noise levels need 0 < sigma_min < sigma_max, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}"
            )
        if self.num_levels < 2:
            raise ConfigError(f"noise.num_levels must be >= 2, got {self.num_levels}")

    def sigmas(self) -> torch.Tensor:
        """The K levels of :func:`geometric_sigmas`: (K,) float32, decreasing."""
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.num_levels)


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """``sigma_i = sigma_max (sigma_min / sigma_max)^(i / (K - 1))``, i = 0 .. K-1: decreasing, shape (K,).

    Computed in float64 (so the ends are exact) and returned as float32.
    """
    if not 0 < sigma_min < sigma_max or num_levels < 2:
        raise ConfigError(
            f"need 0 < sigma_min < sigma_max and num_levels >= 2, got {sigma_min}, {sigma_max}, {num_levels}"
        )
    exponents = torch.linspace(0, 1, num_levels, dtype=torch.float64)
    return (math.log(sigma_max) + exponents * math.log(sigma_min / sigma_max)).exp().float()


def dsm_terms(score_model: nn.Module, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``sigma^2 / 2 || s_theta(x0 + sigma z, sigma) + z / sigma ||^2`` for each sample, shape (B,).

    x0, noise: (B, ...); sigma: (B,) the level of each sample; ``score_model(x, sigma (B,)) -> (B, ...)``.
    The squared norm is summed over all data dimensions (the paper's ``|| . ||^2``).
    """
    view = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    score = score_model(x0 + view * noise, sigma)
    # lambda(sigma) * 1/2 || s + (x~ - x) / sigma^2 ||^2 = 1/2 || sigma s + z ||^2
    return 0.5 * (view * score + noise).pow(2).flatten(1).sum(dim=1)


def dsm_loss(
    score_model: nn.Module, x0: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """The NCSN objective with ``lambda(sigma) = sigma^2``, one level per sample drawn uniformly from ``sigmas``.

    x0: (B, ...); sigmas: (K,). Returns the batch mean of :func:`dsm_terms` (a scalar).
    """
    index = batch_randint(len(sigmas), x0.shape[0], generator, x0.device)
    sigma = sigmas.to(x0.device)[index]
    noise = batch_randn(tuple(x0.shape), generator, x0.device)
    return dsm_terms(score_model, x0, sigma, noise).mean()


def dsm_validation(
    sigmas: torch.Tensor, x0: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed validation inputs: every point of ``x0`` (N, ...) at every level, with fixed noise.

    Returns ``(x0 repeated (K N, ...), sigma (K N,), noise (K N, ...))``, level-major (the first N rows
    are level 0).
    """
    count = x0.shape[0]
    repeated = x0.repeat((len(sigmas),) + (1,) * (x0.ndim - 1))
    sigma = sigmas.to(x0.device).repeat_interleave(count)
    noise = torch.randn(repeated.shape, generator=generator, device=generator.device).to(x0.device)
    return repeated, sigma, noise
