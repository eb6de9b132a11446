"""Discrete variance-preserving noise schedules (Ho et al. 2020; Nichol & Dhariwal 2021).

Timesteps are 0-based indices ``t = 0 .. T-1`` (diffusers' convention): index ``t`` is DDPM's step
``t + 1``, so ``alpha_bar[0] = 1 - beta[0]`` and ``x_T`` is reached at index ``T - 1``.
All buffers are computed in float64 and stored in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflab.errors import ConfigError

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear")


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. (2020): ``beta_t`` evenly spaced from ``beta_start`` to ``beta_end``. Shape (T,)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule: ``sqrt(beta_t)`` evenly spaced. Shape (T,)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: ``alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)``.

    ``beta_t = 1 - alpha_bar(t+1) / alpha_bar(t)``, clipped at ``max_beta`` to avoid the singularity
    at ``t = T``. Shape (T,).
    """
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


@dataclass(frozen=True)
class ScheduleConfig:
    """How to build a :class:`NoiseSchedule`."""

    kind: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    cosine_s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ConfigError(f"schedule.kind must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if self.num_timesteps < 1:
            raise ConfigError(f"schedule.num_timesteps must be >= 1, got {self.num_timesteps}")
        if self.kind != "cosine" and not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(
                f"schedule needs 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}"
            )
        if self.kind == "cosine" and not (0 < self.max_beta < 1 and 0 <= self.cosine_s < 1):
            # beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), max_beta) must lie in (0, 1)
            raise ConfigError(
                f"schedule needs 0 < max_beta < 1 and 0 <= cosine_s < 1, got {self.max_beta} and {self.cosine_s}"
            )


class NoiseSchedule:
    """A discrete VP forward process ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``.

    Attributes (all shape (T,), float32): ``betas``, ``alphas = 1 - betas``,
    ``alpha_bar = prod_{s<=t} alphas``, ``alpha_bar_prev`` (with ``alpha_bar_prev[0] = 1``),
    ``posterior_variance`` (``beta_tilde_t``, eq. 7 of Ho et al.), ``posterior_log_variance_clipped``,
    ``posterior_mean_coef1`` / ``posterior_mean_coef2`` (the weights of ``x_0`` and ``x_t`` in
    ``mu_tilde``).
    """

    def __init__(self, betas: torch.Tensor) -> None:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ConfigError("a noise schedule needs a non-empty 1-D tensor of betas")
        if not ((betas > 0) & (betas < 1)).all():
            raise ConfigError("every beta must lie in (0, 1)")
        alphas = 1 - betas
        alpha_bar = torch.cumprod(alphas, dim=0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        # Ho et al. eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
        posterior_variance = betas * (1 - alpha_bar_prev) / (1 - alpha_bar)
        self.num_timesteps = len(betas)
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alpha_bar = alpha_bar.float()
        self.alpha_bar_prev = alpha_bar_prev.float()
        self.posterior_variance = posterior_variance.float()
        # beta_tilde_0 = 0: use beta_tilde_1 in its place for the log (improved-DDPM convention).
        clipped = torch.cat([posterior_variance[1:2], posterior_variance[1:]]) if len(betas) > 1 else betas
        self.posterior_log_variance_clipped = torch.log(clipped).float()
        self.posterior_mean_coef1 = (betas * alpha_bar_prev.sqrt() / (1 - alpha_bar)).float()
        self.posterior_mean_coef2 = ((1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar)).float()

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        if config.kind == "linear":
            betas = linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
        elif config.kind == "scaled_linear":
            betas = scaled_linear_betas(config.num_timesteps, config.beta_start, config.beta_end)
        else:
            betas = cosine_betas(config.num_timesteps, config.cosine_s, config.max_beta)
        return cls(betas)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        return cls(linear_betas(num_timesteps, beta_start, beta_end))

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        return cls(cosine_betas(num_timesteps, s, max_beta))

    def __len__(self) -> int:
        return self.num_timesteps

    def precise_alpha_bar(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_bar, 1 - alpha_bar)`` in float64 from the betas, (T,) each, on the CPU.

        The stored float32 ``alpha_bar`` keeps only ~3 significant digits of ``1 - alpha_bar`` near t = 0
        (about 1e-4); ``1 - alpha_bar = -expm1(sum_s log(1 - beta_s))`` keeps them all.
        """
        log_alpha_bar = torch.cumsum(torch.log1p(-self.betas.double().cpu()), 0)
        return log_alpha_bar.exp(), -torch.expm1(log_alpha_bar)

    def precise_log_sigmas(self) -> torch.Tensor:
        """float64 VE noise levels ``log sigma_t = log sqrt((1 - alpha_bar_t) / alpha_bar_t)``, (T,), increasing in t,
        on the CPU (from :meth:`precise_alpha_bar`)."""
        alpha_bar, one_minus_alpha_bar = self.precise_alpha_bar()
        return 0.5 * (one_minus_alpha_bar.log() - alpha_bar.log())

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move every buffer to ``device`` (in place); returns ``self``."""
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.to(device))
        return self

    @staticmethod
    def gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """``values[t]`` reshaped to (B, 1, ..., 1) to broadcast over a batch with ``ndim`` dims; values (T,), t (B,)
        int64; on t's device."""
        out = values.to(t.device)[t]
        return out.reshape(out.shape + (1,) * (ndim - out.ndim))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Closed-form forward process: ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.

        x0, noise: (B, ...); t: (B,) int64 indices -> x_t (B, ...).
        """
        alpha_bar = self.gather(self.alpha_bar, t, x0.ndim)
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process: ``x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``.
        x_t, eps: (B, ...), t: (B,) -> (B, ...)."""
        alpha_bar = self.gather(self.alpha_bar, t, x_t.ndim)
        return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``eps = (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t)``. x_t, x0: (B, ...), t: (B,) -> (B, ...)."""
        alpha_bar = self.gather(self.alpha_bar, t, x_t.ndim)
        return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. eq. 7). x0, x_t: (B, ...), t: (B,) -> (B, ...)."""
        coef1 = self.gather(self.posterior_mean_coef1, t, x_t.ndim)
        coef2 = self.gather(self.posterior_mean_coef2, t, x_t.ndim)
        return coef1 * x0 + coef2 * x_t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise level of the VP marginal, ``sigma_t = sqrt(1 - alpha_bar_t)``. Shape of ``t``."""
        return (1 - self.alpha_bar.to(t.device)[t]).sqrt()
