"""One interface over eps-, x0-, v- and score-parameterised diffusion models.

A network trained on the discrete VP schedule ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``
predicts one of (Ho et al. 2020; Salimans & Ho 2022; Song et al. 2021)

- ``eps``:   the noise ``eps``;
- ``x0``:    the clean data ``x_0``;
- ``v``:     ``v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0``;
- ``score``: ``grad_x log p_t(x_t) = -eps / sqrt(1 - alpha_bar_t)``.

:class:`DiffusionModel` turns any of them into every other, counts network evaluations (NFE), and adds
the continuous-sigma view the sigma-space solvers work in (Karras et al. 2022, "EDM"; k-diffusion's
``DiscreteSchedule``): the VP variable maps to a variance-exploding one by
``x_ve = x_vp / sqrt(alpha_bar)``, whose noise level is ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, and
the denoiser is ``D(x_ve; sigma) = x_ve - sigma eps(x_ve / sqrt(1 + sigma^2), t(sigma))``. Sigmas between
the discrete ones map to fractional timesteps by interpolating ``log sigma`` linearly in ``t``; the network
receives the fractional ``t`` as a float (difflab's time encodings accept float t), or the rounded integer
when ``round_timesteps=True``.
"""

from __future__ import annotations

from typing import Any

import torch

from difflab.diffusion.prediction import (
    eps_to_score,
    eps_to_v,
    eps_to_x0,
    interpolated_log_sigma,
    score_to_eps,
    v_to_eps,
    x0_to_eps,
)
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError

PARAMETERIZATIONS = ("eps", "x0", "v", "score")


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () values reshaped to broadcast over ``like`` of shape (B, ...)."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).to(like.dtype)


class DiffusionModel:
    """A network of any parameterisation seen through one interface, with an NFE counter.

    model: called as ``model(x_t, t)`` with x_t (B, ...) and t (B,) timesteps (int or float); it returns
    the ``parameterization`` target, shape of x_t. schedule: the discrete schedule it was trained on.

    Calling the wrapper returns eps, so it is itself an ``EpsModel`` and works with every sampler and
    guidance wrapper. ``nfe`` counts calls of the network (a batched call is one evaluation).

    ``clip_x0 = c`` clips every clean-data prediction to [-c, c] and re-derives eps from it (Ho et al.'s
    ``clip_denoised``; diffusers' ``clip_sample``), for data known to lie in [-c, c]. It matters at the
    lowest signal-to-noise ratios: near t = T the prediction ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``
    multiplies any error of eps by ``1 / sqrt(a)`` (about 2,000 at the cosine schedule's last step), which
    any sampler starting at t = T - 1 then carries into its first step.
    """

    def __init__(
        self,
        model: Any,
        schedule: NoiseSchedule,
        parameterization: str = "eps",
        round_timesteps: bool = False,
        clip_x0: float | None = None,
    ) -> None:
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(
                f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {parameterization!r}"
            )
        self.model = model
        self.schedule = schedule
        self.parameterization = parameterization
        self.round_timesteps = round_timesteps
        self.clip_x0 = clip_x0
        self.nfe = 0
        self.alpha_bar64 = schedule.precise_alpha_bar()[0]
        self.num_timesteps = schedule.num_timesteps
        # VE noise levels of the discrete steps, sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), increasing in t.
        self.log_sigmas = schedule.precise_log_sigmas()
        self.sigmas = self.log_sigmas.exp()

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def needs_grad(self) -> bool:
        return bool(getattr(self.model, "needs_grad", False))

    def reset_nfe(self) -> None:
        self.nfe = 0

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- the continuous schedule -----------------------------------------------------------------------
    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """VE sigma at (fractional) timesteps ``t`` in [0, T-1]: ``log sigma`` linear between the steps. float64, the
        shape of ``t``."""
        return interpolated_log_sigma(self.log_sigmas, torch.as_tensor(t).cpu()).exp()

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The inverse of :meth:`t_to_sigma`; sigmas outside [sigma_min, sigma_max] clamp to 0 or T-1. float64, the
        shape of ``sigma``."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        if self.num_timesteps == 1:
            return torch.zeros_like(sigma)
        log_sigma = sigma.clamp(min=1e-300).log()
        # index of the last discrete log-sigma <= log_sigma, kept inside [0, T-2]
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_timesteps - 2)
        low_value, high_value = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((log_sigma - low_value) / (high_value - low_value)).clamp(0, 1)
        return low.double() + weight

    def alpha_bar_at(self, t: torch.Tensor | float) -> torch.Tensor:
        """``alpha_bar = 1 / (1 + sigma(t)^2)`` at (fractional) timesteps, the schedule's at integers. float64, the
        shape of ``t``."""
        return 1 / (1 + self.t_to_sigma(t) ** 2)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``alpha_bar`` at t (B,) or a scalar, int (the schedule's) or float (:meth:`alpha_bar_at`), as
        (B, 1, ..., 1) in the dtype and on the device of ``like`` (B, ...)."""
        t = torch.as_tensor(t)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        if not t.is_floating_point():
            values = self.alpha_bar64.to(like.device)[t.to(like.device)]
        else:
            values = self.alpha_bar_at(t).to(like.device)
        return _broadcast(values, like)

    def _network_t(self, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """The timesteps the network is given: t (B,) or a scalar -> (batch,) on ``device``, rounded to int64 when
        ``round_timesteps`` and t is fractional."""
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.is_floating_point() and self.round_timesteps:
            t = t.round().long()
        return t

    # -- the four targets ------------------------------------------------------------------------------
    def output(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's raw output at x (B, ...), t (B,) or scalar: its target, (B, ...); counts one evaluation."""
        self.nfe += 1
        return self.model(x, self._network_t(t, x.shape[0], x.device))

    def eps(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted noise at x_t (B, ...), timesteps t (B,) int or float (or a scalar): (B, ...)."""
        t = self._network_t(t, x.shape[0], x.device)  # rounded once, so conversions use the same t
        out = self.output(x, t)
        if self.parameterization == "eps" and self.clip_x0 is None:
            return out
        alpha_bar = self._alpha_bar(t, x)
        if self.parameterization == "eps":
            eps = out
        elif self.parameterization == "x0":
            eps = x0_to_eps(x, out, alpha_bar)
        elif self.parameterization == "v":
            eps = v_to_eps(x, out, alpha_bar)
        else:
            eps = score_to_eps(out, alpha_bar)
        if self.clip_x0 is not None:
            x0 = eps_to_x0(x, eps, alpha_bar).clamp(-self.clip_x0, self.clip_x0)
            eps = x0_to_eps(x, x0, alpha_bar)
        return eps

    def x0(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted clean data at x_t (B, ...), timesteps t (B,) or a scalar: (B, ...)."""
        t = self._network_t(t, x.shape[0], x.device)  # rounded once, so conversions use the same t
        if self.parameterization == "x0":
            return self.output(x, t)
        return eps_to_x0(x, self.eps(x, t), self._alpha_bar(t, x))

    def v(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predicted velocity ``v = sqrt(a) eps - sqrt(1 - a) x_0`` at x_t (B, ...), t (B,) or a scalar: (B, ...)."""
        t = self._network_t(t, x.shape[0], x.device)  # rounded once, so conversions use the same t
        if self.parameterization == "v":
            return self.output(x, t)
        return eps_to_v(x, self.eps(x, t), self._alpha_bar(t, x))

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``grad_x log p_t(x_t) = -eps / sqrt(1 - alpha_bar_t)`` at x_t (B, ...), t (B,) or a scalar: (B, ...)."""
        t = self._network_t(t, x.shape[0], x.device)  # rounded once, so conversions use the same t
        if self.parameterization == "score":
            return self.output(x, t)
        return eps_to_score(self.eps(x, t), self._alpha_bar(t, x))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """:meth:`eps`: x (B, ...), t (B,) or a scalar -> (B, ...), so the wrapper is an ``EpsModel``."""
        return self.eps(x, t)

    # -- the sigma (VE) view ---------------------------------------------------------------------------
    def denoise(self, x_ve: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``D(x; sigma)``: the clean-data prediction for the VE variable ``x_ve = x_vp / sqrt(alpha_bar)``.

        x_ve: (B, ...); sigma: scalar or (B,) VE noise levels. ``x_vp = x_ve / sqrt(1 + sigma^2)`` goes to
        the network at ``t(sigma)`` and ``D = x_ve - sigma eps`` (EDM Table 1, VP column).
        """
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if sigma.ndim == 0:
            sigma = sigma.expand(x_ve.shape[0])
        t = self.sigma_to_t(sigma).to(x_ve.device)
        scale = _broadcast((1 + sigma**2).rsqrt().to(x_ve.device), x_ve)
        eps = self.eps(x_ve * scale, t)
        return x_ve - _broadcast(sigma.to(x_ve.device), x_ve) * eps


def as_diffusion_model(model: Any, schedule: NoiseSchedule) -> DiffusionModel:
    """``model`` itself when it is a :class:`DiffusionModel`, else an eps-model wrapped in one."""
    if isinstance(model, DiffusionModel):
        return model
    return DiffusionModel(model, schedule, "eps")
