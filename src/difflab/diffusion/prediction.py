"""What the denoising network predicts: eps (Ho et al. 2020) or v (Salimans & Ho 2022).

With ``x_t = sqrt(a) x_0 + sqrt(1 - a) eps`` (``a = alpha_bar_t``) the velocity is
``v = sqrt(a) eps - sqrt(1 - a) x_0``, and ``eps = sqrt(1 - a) x_t + sqrt(a) v``. A v-network is wrapped in
:class:`VPrediction`, which answers as an eps model, so every sampler, guidance wrapper, inversion and the
likelihood use it unchanged; the training loss asks it for its raw v (``raw=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.diffusion.schedule import NoiseSchedule

PREDICTIONS = ("eps", "v")


# Conversions between the four targets. ``alpha_bar`` broadcasts against ``x_t`` (a tensor of shape
# (B, 1, ..., 1) or a scalar); every identity follows from x_t = sqrt(a) x_0 + sqrt(1 - a) eps.
def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``.
    x_t, eps: (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``eps = (x_t - sqrt(a) x_0) / sqrt(1 - a)``.
    x_t, x0: (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def v_to_eps(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``eps = sqrt(1 - a) x_t + sqrt(a) v`` (Salimans & Ho 2022, appendix D).
    x_t, v: (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return (1 - alpha_bar).sqrt() * x_t + alpha_bar.sqrt() * v


def eps_to_v(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``v = sqrt(a) eps - sqrt(1 - a) x_0 = (eps - sqrt(1 - a) x_t) / sqrt(a)``.
    x_t, eps: (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return (eps - (1 - alpha_bar).sqrt() * x_t) / alpha_bar.sqrt()


def score_to_eps(score: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``eps = -sqrt(1 - a) score``. score: (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return -(1 - alpha_bar).sqrt() * score


def eps_to_score(eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``score = -eps / sigma_t`` with ``sigma_t = sqrt(1 - a)`` (the VP marginal's std).
    eps: (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return -eps / (1 - alpha_bar).sqrt()


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``v = sqrt(a) eps - sqrt(1 - a) x_0``.
    x0, noise (the eps): (B, ...), alpha_bar: (B, 1, ..., 1) or a scalar -> (B, ...)."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def interpolated_log_sigma(log_sigmas: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``log sigma`` at fractional timesteps t, linear in t between the discrete steps' ``log_sigmas`` (T,);
    t (a float or a tensor of any shape) is clamped to [0, T-1]. float64, the shape of t, on ``log_sigmas``' device."""
    steps = len(log_sigmas)
    t = torch.as_tensor(t, dtype=torch.float64, device=log_sigmas.device).clamp(0, steps - 1)
    low = t.floor().long().clamp(max=max(steps - 2, 0))
    high = (low + 1).clamp(max=steps - 1)
    weight = t - low
    return (1 - weight) * log_sigmas[low] + weight * log_sigmas[high]


class VPrediction(nn.Module):
    """A network that predicts v, seen from outside as an eps model.

    net: called as ``net(x_t, t, *conditioning)``, returns v of the shape of x_t (B, C, ...).
    ``forward(x_t, t, *conditioning)`` returns ``eps = sqrt(1 - a_t) x_t + sqrt(a_t) v``; with ``raw=True`` the
    network's v itself. Integer t index the schedule; fractional t (the sigma-space solvers) take
    ``log sigma_t = log sqrt((1 - a_t) / a_t)`` linear between the neighbouring steps, as
    :class:`~difflab.sampling.wrappers.DiffusionModel` does. The schedule lives in non-persistent buffers, so
    the state dict holds only the network's weights (under ``net.``).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("log_sigmas", schedule.precise_log_sigmas(), persistent=False)

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """float64 ``alpha_bar`` at t, shaped (B, 1, ..., 1) to broadcast over ``like`` (B, ...)."""
        t = torch.as_tensor(t, device=like.device)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        log_sigma = interpolated_log_sigma(self.log_sigmas, t) if t.is_floating_point() else self.log_sigmas[t]
        # a = 1 / (1 + sigma^2) = sigmoid(-2 log sigma)
        return torch.sigmoid(-2 * log_sigma).reshape(log_sigma.shape + (1,) * (like.ndim - 1))

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, *conditioning: torch.Tensor, raw: bool = False
    ) -> torch.Tensor:
        """x_t: (B, C, ...), t: (B,) or scalar -> eps (B, C, ...), or v with ``raw=True``."""
        v = self.net(x_t, t, *conditioning)
        if raw:
            return v
        # the conversion in float64 (1 - a_t near t = 0 keeps its digits), returned in x_t's dtype
        return v_to_eps(x_t, v, self._alpha_bar(t, x_t)).to(x_t.dtype)


def wrap_prediction(net: nn.Module, prediction: str, schedule: NoiseSchedule) -> nn.Module:
    """``net`` as an eps model: itself for ``eps``, :class:`VPrediction` for ``v``."""
    if prediction == "eps":
        return net
    if prediction == "v":
        return VPrediction(net, schedule)
    raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
