"""Ancestral sampling of DDPM (Ho et al. 2020, Algorithm 2), with a fixed or a learned reverse variance
(Nichol & Dhariwal 2021, eq. 15)."""

from __future__ import annotations

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import learned_log_variance, split_output
from difflab.errors import ConfigError
from difflab.sampling.common import EpsModel, StepCallback, progress, randn, sampling_mode

VARIANCES = ("beta", "posterior", "learned")


def ddpm_step(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    t: int,
    x_t: torch.Tensor,
    noise: torch.Tensor | None,
    variance: str = "beta",
    clip_x0: float | None = None,
    variance_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step ``x_t -> x_{t-1}``; returns ``(x_{t-1}, x0_pred)``, both (B, ...).

    ``x_{t-1} = mu_tilde(x0_pred, x_t) + sigma_t z`` with
    ``x0_pred = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``; without clipping this equals
    Ho et al.'s ``mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)``.
    ``sigma_t^2`` is ``beta_t`` (``variance="beta"``), ``beta_tilde_t`` (``"posterior"``) or the learned
    ``exp(v log beta_t + (1 - v) log beta_tilde_t)`` with ``v = (variance_values + 1) / 2`` (``"learned"``;
    variance_values: the network's extra output channels, shape of eps). No noise is added at the last step
    (t = 0). eps, x_t, noise: (B, ...).
    """
    index = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0_pred = schedule.predict_x0(x_t, index, eps)
    if clip_x0 is not None:
        x0_pred = x0_pred.clamp(-clip_x0, clip_x0)
    mean = schedule.posterior_mean(x0_pred, x_t, index)
    if t == 0:
        return mean, x0_pred
    if noise is None:
        raise ValueError("ddpm_step needs noise for t > 0")
    if variance == "learned":
        if variance_values is None:
            raise ValueError("ddpm_step with variance='learned' needs the network's variance_values")
        log_variance = learned_log_variance(schedule, variance_values, index)
        return mean + torch.exp(0.5 * log_variance) * noise, x0_pred
    var = schedule.betas[t] if variance == "beta" else schedule.posterior_variance[t]
    return mean + var.to(x_t.device).sqrt() * noise, x0_pred


def ddpm_sample(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    variance: str = "beta",
    clip_x0: float | None = None,
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Draw ``shape[0]`` samples by running all T ancestral steps from ``x_T ~ N(0, I)``.

    model: ``model(x_t, t) -> eps``, x_t (B, C, ...), t (B,); with ``variance="learned"`` the model returns
    ``[eps, v]`` (B, 2C, ...) (a fixed variance ignores v). To sample with K < T respaced steps, pass
    ``RespacedSchedule.schedule`` and ``RespacedSchedule.wrap(model)`` (:mod:`difflab.diffusion.respacing`).
    Returns x_0 of ``shape``. Noise comes from
    ``generator`` (the initial ``x_T`` first, then one draw per step), so a seeded generator makes the
    result reproducible.
    """
    if variance not in VARIANCES:
        raise ConfigError(f"DDPM variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    with sampling_mode(model):
        x = randn(shape, generator, device) if x_T is None else x_T.to(device)
        timesteps = list(range(schedule.num_timesteps - 1, -1, -1))
        for i in progress(timesteps, show_progress, "DDPM"):
            t_batch = torch.full((shape[0],), i, device=device, dtype=torch.long)
            eps, values = split_output(model(x, t_batch), x)
            if variance == "learned" and values is None:
                raise ConfigError("DDPM variance 'learned' needs a model that outputs [eps, v] (twice the channels)")
            noise = randn(shape, generator, device) if i > 0 else None
            x_next, x0_pred = ddpm_step(schedule, eps, i, x, noise, variance, clip_x0, values)
            if callback is not None:
                callback(schedule.num_timesteps - 1 - i, i, x, x0_pred)
            x = x_next
    return x
