"""Scores and noise predictions are two views of one model (Song et al. 2021; Vincent 2011).

For the VP forward process ``x_t = sqrt(alpha_bar_t) x_0 + sigma_t eps`` with ``sigma_t = sqrt(1 - alpha_bar_t)``
Tweedie's formula gives ``grad log p_t(x_t) = -E[eps | x_t] / sigma_t``, so an eps model is a score model:

    s(x_t, t) = -eps_theta(x_t, t) / sigma_t          eps(x_t, t) = -sigma_t s_theta(x_t, t)

A VE (NCSN) score model ``s(y, sigma)`` of ``y = x_0 + sigma z`` is a VP model after rescaling:
``x_t / sqrt(alpha_bar_t) = x_0 + sigma_ve z`` with ``sigma_ve = sigma_t / sqrt(alpha_bar_t)``, and
``eps(x_t, t) = -sigma_ve s(x_t / sqrt(alpha_bar_t), sigma_ve)``; it is only as good as the score model
at that sigma (an NCSN is trained on ``[sigma_min, sigma_max]``).

So a Langevin corrector can run on a DDPM eps model (:func:`score_from_eps` + :func:`langevin_corrector`)
and the eps samplers (DDIM with eta = 0 is the VP probability-flow ODE's discretisation) on a score model
(:func:`eps_from_score`, :func:`eps_from_ve_score`). Each adapter is a plain callable with the signature
its samplers expect.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.sampling.common import EpsModel, needs_grad, randn, sampling_mode

ScoreModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, ...), t (B,) int) -> score


def _broadcast(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-item ``values`` (B,) as (B, 1, ..., 1) in x's dtype, to broadcast over x (B, ...)."""
    return values.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


class _Adapter:
    """Base of the adapters: forwards ``needs_grad`` so the samplers keep autograd for guided models."""

    def __init__(self, model: Callable[..., torch.Tensor], schedule: NoiseSchedule) -> None:
        self.model = model
        self.schedule = schedule
        self.needs_grad = needs_grad(model)


class ScoreFromEps(_Adapter):
    """``s(x_t, t) = -eps(x_t, t) / sigma_t``: a VP score model of an eps model. x_t (B, ...), t (B,) int."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score ``-eps(x_t, t) / sigma_t``: x (B, ...), t (B,) int64 -> (B, ...)."""
        return -self.model(x, t) / _broadcast(self.schedule.sigma(t), x)


class EpsFromScore(_Adapter):
    """``eps(x_t, t) = -sigma_t s(x_t, t)``: an eps model of a VP score model. x_t (B, ...), t (B,) int."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eps ``-sigma_t s(x_t, t)``: x (B, ...), t (B,) int64 -> (B, ...)."""
        return -_broadcast(self.schedule.sigma(t), x) * self.model(x, t)


class EpsFromVEScore(_Adapter):
    """``eps(x_t, t) = -sigma_ve s(x_t / sqrt(alpha_bar_t), sigma_ve)``, ``sigma_ve = sigma_t / sqrt(alpha_bar_t)``:
    a VP eps model of a noise-conditional (VE) score model ``s(y, sigma (B,))``. x_t (B, ...), t (B,) int."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The eps ``-sigma_ve s(x_t / sqrt(alpha_bar_t), sigma_ve)``: x (B, ...), t (B,) int64 -> (B, ...)."""
        alpha_bar = self.schedule.alpha_bar.to(t.device)[t]
        sigma_ve = ((1 - alpha_bar) / alpha_bar).sqrt()
        return -_broadcast(sigma_ve, x) * self.model(x / _broadcast(alpha_bar.sqrt(), x), sigma_ve.to(x.dtype))


def score_from_eps(eps_model: EpsModel, schedule: NoiseSchedule) -> ScoreFromEps:
    """The score model ``s(x_t, t) = -eps(x_t, t) / sqrt(1 - alpha_bar_t)`` of an eps model."""
    return ScoreFromEps(eps_model, schedule)


def eps_from_score(score_model: ScoreModel, schedule: NoiseSchedule) -> EpsFromScore:
    """The eps model ``eps(x_t, t) = -sqrt(1 - alpha_bar_t) s(x_t, t)`` of a VP score model (usable by DDPM/DDIM)."""
    return EpsFromScore(score_model, schedule)


def eps_from_ve_score(
    score_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule
) -> EpsFromVEScore:
    """The VP eps model of a noise-conditional score model ``s(y, sigma)`` (see the module docstring)."""
    return EpsFromVEScore(score_model, schedule)


def langevin_corrector(
    score_model: ScoreModel,
    x: torch.Tensor,
    t: int,
    schedule: NoiseSchedule,
    *,
    c: float = 0.1,
    steps: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Langevin MCMC at a fixed VP timestep ``t`` (the corrector of Song et al. 2021's predictor-corrector):

    ``x <- x + (a / 2) s(x, t) + sqrt(a) z`` with ``a = c sigma_t^2`` (the step convention of
    :func:`difflab.sampling.langevin.annealed_langevin`), ``steps`` times; it leaves ``p_t`` invariant up to
    the discretisation bias. x: (B, ...); returns the corrected x, (B, ...).
    """
    if c <= 0 or steps < 0:
        raise ConfigError(f"the corrector needs c > 0 and steps >= 0, got c={c}, steps={steps}")
    if not 0 <= t < schedule.num_timesteps:
        raise ConfigError(f"t must be a timestep index in [0, {schedule.num_timesteps}), got {t}")
    step_size = c * float(schedule.sigma(torch.tensor([t]))[0]) ** 2
    index = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    with sampling_mode(score_model):
        for _ in range(steps):
            noise = randn(tuple(x.shape), generator, x.device)
            x = x + 0.5 * step_size * score_model(x, index) + step_size**0.5 * noise
    return x
