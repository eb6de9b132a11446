"""Timestep respacing (Nichol & Dhariwal 2021, sec. 4): sample a T-step model with K < T steps.

Keeping the timesteps ``S = (s_0 < s_1 < ... < s_{K-1})`` of the original schedule defines a K-step process with
the same marginals ``alpha_bar_{s_i}``; its betas are ``beta'_i = 1 - alpha_bar_{s_i} / alpha_bar_{s_{i-1}}``
(``alpha_bar_{s_{-1}} = 1``), and everything else (``beta_tilde``, the posterior coefficients, the learned
variance's interpolation range) follows from those betas. The network is still called with the original indices
``s_i``; :meth:`RespacedSchedule.wrap` does the translation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError

SPACINGS = ("linspace", "leading", "trailing")


def kept_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """``steps`` increasing indices out of ``num_timesteps`` (fewer where rounding makes two coincide), computed with
    numpy's arithmetic exactly as diffusers' schedulers' ``timestep_spacing`` (float ties included):
    ``linspace``: ``round(linspace(0, T - 1, K))``, first and last kept (improved DDPM's ``space_timesteps`` with one
    section, up to its rounding of ties); ``leading``: ``0, r, 2r, ...`` with ``r = T // K``; ``trailing``:
    ``round(arange(T, 0, -T / K)) - 1``, from T - 1 down."""
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"respacing needs 1 <= steps <= {num_timesteps}, got {steps}")
    if spacing == "linspace":
        kept = np.linspace(0, num_timesteps - 1, steps).round().astype(np.int64).tolist()
    elif spacing == "leading":
        kept = [i * (num_timesteps // steps) for i in range(steps)]
    elif spacing == "trailing":
        kept = (np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1).tolist()
    else:
        raise ConfigError(f"respacing spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    return sorted(set(kept))


@dataclass
class RespacedSchedule:
    """A K-step schedule made of the timesteps ``timesteps`` (increasing, original indices) of ``original``."""

    schedule: NoiseSchedule
    timesteps: list[int]
    original: NoiseSchedule

    def wrap(self, model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``model`` called with respaced indices ``i`` (B,) -> the original indices ``timesteps[i]``."""
        return _TimestepMapped(model, torch.tensor(self.timesteps, dtype=torch.long))


class _TimestepMapped:
    def __init__(self, model: Callable[..., torch.Tensor], mapping: torch.Tensor) -> None:
        self.model = model
        self.mapping = mapping
        self.needs_grad = bool(getattr(model, "needs_grad", False))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *args: object) -> torch.Tensor:
        """``model(x, mapping[t], *args)``: x (B, ...), t (B,) int64 respaced indices -> the model's output (B, ...)."""
        return self.model(x, self.mapping.to(t.device)[t], *args)


def respace(schedule: NoiseSchedule, timesteps: Sequence[int]) -> RespacedSchedule:
    """The schedule that visits only ``timesteps`` (any order; duplicates dropped) of ``schedule``:
    ``beta'_i = 1 - alpha_bar_{s_i} / alpha_bar_{s_{i-1}}`` computed in float64."""
    kept = sorted(set(int(t) for t in timesteps))
    if not kept or kept[0] < 0 or kept[-1] >= schedule.num_timesteps:
        raise ConfigError(f"respaced timesteps must lie in 0..{schedule.num_timesteps - 1}")
    alpha_bar = schedule.precise_alpha_bar()[0][kept]
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    betas = 1 - alpha_bar / previous
    device = schedule.betas.device
    return RespacedSchedule(NoiseSchedule(betas).to(device), kept, schedule)


def respaced(schedule: NoiseSchedule, steps: int, spacing: str = "linspace") -> RespacedSchedule:
    """:func:`respace` to ``steps`` timesteps chosen by :func:`kept_timesteps`."""
    return respace(schedule, kept_timesteps(schedule.num_timesteps, steps, spacing))
