"""Denoising diffusion implicit models (Song, Meng & Ermon 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import split_output
from difflab.errors import ConfigError
from difflab.sampling.common import (
    EpsModel,
    StepCallback,
    check_eta,
    progress,
    randn,
    sampling_mode,
    timestep_list,
)


def ddim_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    t: int,
    t_prev: int | None,
    x_t: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_x0: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update ``x_t -> x_{t_prev}`` (Song et al. eq. 12); returns ``(x_prev, x0_pred)``.

    ``x_prev = sqrt(a_prev) x0_pred + sqrt(1 - a_prev - sigma^2) eps + sigma z`` with
    ``sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)`` and ``a = alpha_bar``.
    ``t_prev = None`` means the end of the chain, where ``alpha_bar_prev = 1``. ``x_t``, ``eps`` and ``noise``
    (the z of eta > 0; drawn when None) are (B, ...) alike, and so are both returned tensors.
    """
    device = x_t.device
    alpha_bar = schedule.alpha_bar[t].to(device)
    alpha_bar_prev = schedule.alpha_bar[t_prev].to(device) if t_prev is not None else torch.ones((), device=device)
    x0_pred = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
    if clip_x0 is not None:
        x0_pred = x0_pred.clamp(-clip_x0, clip_x0)
        # Re-derive eps from the clipped x0 so the step stays on the line through x_t and x0 (GLIDE's choice;
        # diffusers' use_clipped_model_output=True). Keeping the network's eps, diffusers' default, scored worse
        # on mnist-ddpm (README, "Why the eps model's ODE loses").
        eps = (x_t - alpha_bar.sqrt() * x0_pred) / (1 - alpha_bar).sqrt()
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    x_prev = alpha_bar_prev.sqrt() * x0_pred + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and t_prev is not None:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev, x0_pred


def per_step_etas(eta: float | Sequence[float], steps: int) -> list[float]:
    """DDIM's eta as one value per step: a scalar is repeated, a sequence must hold ``steps`` values.

    Raises :class:`~difflab.errors.ConfigError` for a wrong count or an eta that is negative or not finite
    (eta scales the posterior std, Song et al. eq. 16)."""
    etas = [float(value) for value in eta] if isinstance(eta, Sequence) else [float(eta)] * steps
    if len(etas) != steps:
        raise ConfigError(f"DDIM got {len(etas)} eta values for {steps} steps")
    for value in etas:
        check_eta(value, "DDIM's eta")
    return etas


def ddim_sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    eta: float | Sequence[float] = 0.0,
    spacing: str = "leading",
    timesteps: list[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    clip_x0: float | None = None,
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling over ``steps`` timesteps (or an explicit decreasing ``timesteps`` list).

    Each step's previous timestep is the next entry of the list (the chain ends at ``alpha_bar = 1``),
    never recomputed by formula, so any spacing works. ``eta = 0`` is deterministic given ``x_T``;
    ``eta = 1`` matches DDPM's posterior variance. A model returning ``[eps, v]`` (learned variance) is used for
    its eps only. ``eta`` may also be one value per step (``eta[k]`` for the update from ``timesteps[k]``), e.g.
    the probability-flow ODE at high noise and ancestral steps below (``benchmarks/ode_gap.py``); noise is drawn
    only at steps with ``eta > 0``, so a constant list draws exactly what the scalar does. A wrong count or a
    negative eta raises :class:`~difflab.errors.ConfigError`. Returns x_0 of ``shape``.
    """
    if timesteps is None:
        timesteps = timestep_list(schedule.num_timesteps, steps, spacing)
    etas = per_step_etas(eta, len(timesteps))
    with sampling_mode(model):
        x = randn(shape, generator, device) if x_T is None else x_T.to(device)
        for k in progress(list(range(len(timesteps))), show_progress, "DDIM"):
            t = timesteps[k]
            t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else None
            # A learned-variance model's extra channels are ignored: DDIM's sigma comes from eta.
            eps, _ = split_output(model(x, torch.full((shape[0],), t, device=device, dtype=torch.long)), x)
            noise = randn(shape, generator, device) if etas[k] > 0 and t_prev is not None else None
            x_next, x0_pred = ddim_step(schedule, eps, t, t_prev, x, etas[k], noise, clip_x0)
            if callback is not None:
                callback(k, t, x, x0_pred)
            x = x_next
    return x
