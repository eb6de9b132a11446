"""DDIM inversion: run the deterministic DDIM update backwards, from x_0 to x_t (Song et al. 2021, sec. 4.3;
Dhariwal & Nichol 2021, appendix F), then DDIM forwards again to reconstruct.

DDIM with eta = 0 is an Euler step of the probability-flow ODE in the variables
``x / sqrt(alpha_bar)`` and ``sqrt(1 / alpha_bar - 1)``; integrating the same ODE the other way,

    x_next = sqrt(alpha_bar_next) * x0_pred + sqrt(1 - alpha_bar_next) * eps_theta(x_cur, t_cur),
    x0_pred = (x_cur - sqrt(1 - alpha_bar_cur) * eps_theta(x_cur, t_cur)) / sqrt(alpha_bar_cur),

encodes an image into the noise that DDIM maps back onto it. The only approximation is that each step uses
eps at its start (at x_0 itself, where no noise level exists, eps is taken at the first timestep), so the
round trip becomes exact as the number of steps grows.

``fixed_point_iterations = K`` removes that approximation step by step: the DDIM step down from ``x_next``
lands exactly on ``x_cur`` when the update above uses ``eps_theta(x_next, t_next)`` instead, an implicit
equation solved by K fixed-point iterations ``x_next <- update(eps_theta(x_next, t_next))`` started from the
explicit step (Pan et al. 2023, "Effective real image editing with accelerated iterative diffusion inversion";
Garibi et al. 2024, "ReNoise"). Each iteration costs one more network evaluation per step.

Where the steps lie matters as much as how many there are: ``spacing="logsnr"`` places them evenly in log-SNR
between the same end points as the uniform spacing (:func:`logsnr_inversion_timesteps`), which shortens the
steps at both ends of the chain at no extra cost.
"""

from __future__ import annotations

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.sampling.common import EpsModel, StepCallback, sampling_mode, timestep_list
from difflab.sampling.ddim import ddim_sample


def default_inversion_end(schedule: NoiseSchedule, min_alpha_bar: float = 1e-3) -> int:
    """The last timestep with ``alpha_bar >= min_alpha_bar`` (x_t is then 99.9% noise by variance).

    Inverting further is ill-conditioned: reconstructing starts with ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``,
    which multiplies the gap between the eps used going up and the eps used coming down by ``1 / sqrt(a)``
    (~2,000 at the cosine schedule's last step, where beta is clipped to 0.999)."""
    above = (schedule.alpha_bar >= min_alpha_bar).nonzero()
    return int(above.max()) if len(above) else schedule.num_timesteps - 1


def inversion_timesteps(num_timesteps: int, steps: int, t_end: int | None = None) -> list[int]:
    """The increasing timesteps of an inversion with ``steps`` steps ending at ``t_end`` (default T - 1).

    Evenly spaced from ``t_end / steps`` to ``t_end`` (so that DDIM over the reversed list undoes it)."""
    end = num_timesteps - 1 if t_end is None else t_end
    if not 0 <= end < num_timesteps:
        raise ValueError(f"t_end must be in [0, {num_timesteps - 1}], got {t_end}")
    if end + 1 < steps:
        return timestep_list(num_timesteps, steps)[::-1]
    return sorted({round(end * (i + 1) / steps) for i in range(steps)})


INVERSION_SPACINGS = ("uniform", "logsnr")


def logsnr_inversion_timesteps(schedule: NoiseSchedule, steps: int, t_end: int | None = None) -> list[int]:
    """``steps`` increasing timesteps from the uniform spacing's first one, ``round(t_end / steps)``, to ``t_end``,
    evenly spaced in log-SNR ``lambda_t = log(alpha_bar_t / (1 - alpha_bar_t))`` (the spacing of Lu et al.'s
    DPM-Solver) instead of in t: after the first step, smaller steps at both ends of the chain (near t_end the
    reconstruction divides the eps mismatch by ``sqrt(alpha_bar)``). The first step stays the uniform one: on the
    MNIST model, round trips that started finer (t = 1 to 5) came back worse, not better."""
    uniform = inversion_timesteps(schedule.num_timesteps, steps, t_end)
    if len(uniform) < 3:
        return uniform
    first, end = uniform[0], uniform[-1]
    alpha_bar = schedule.alpha_bar.double().cpu()
    log_snr = torch.log(alpha_bar / (1 - alpha_bar))  # strictly decreasing in t
    targets = torch.linspace(float(log_snr[first]), float(log_snr[end]), len(uniform))
    # the fractional t of each target by linear interpolation of lambda between neighbouring timesteps
    upper = torch.searchsorted(-log_snr, -targets).clamp(1, len(log_snr) - 1)
    lower = upper - 1
    fraction = (log_snr[lower] - targets) / (log_snr[lower] - log_snr[upper])
    timesteps = (lower + fraction.clamp(0, 1)).round().long().tolist()
    # strictly increasing (every step at least one timestep long) between the fixed end points
    timesteps[0] = first
    for i in range(1, len(timesteps)):
        timesteps[i] = max(timesteps[i], timesteps[i - 1] + 1)
    timesteps[-1] = end
    for i in range(len(timesteps) - 2, 0, -1):
        timesteps[i] = min(timesteps[i], timesteps[i + 1] - 1)
    return timesteps


def _inversion_step(
    x: torch.Tensor, eps: torch.Tensor, alpha_bar_cur: torch.Tensor, alpha_bar_next: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_next, x0_pred)``: ``x0_pred = (x - sqrt(1 - a_cur) eps) / sqrt(a_cur)``,
    ``x_next = sqrt(a_next) x0_pred + sqrt(1 - a_next) eps``."""
    x0_pred = (x - (1 - alpha_bar_cur).sqrt() * eps) / alpha_bar_cur.sqrt()
    return alpha_bar_next.sqrt() * x0_pred + (1 - alpha_bar_next).sqrt() * eps, x0_pred


def ddim_invert(
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    timesteps: list[int],
    callback: StepCallback | None = None,
    fixed_point_iterations: int = 0,
) -> torch.Tensor:
    """Map ``x0`` (B, ...) to ``x_t`` at ``timesteps[-1]`` along the increasing ``timesteps``; with
    ``fixed_point_iterations`` K > 0 each step is refined K times towards the exact inverse of the DDIM step
    (module docstring), at K extra network evaluations per step."""
    if fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations must be >= 0, got {fixed_point_iterations}")
    device = x0.device

    def at(t: int) -> torch.Tensor:
        return torch.full((x0.shape[0],), t, device=device, dtype=torch.long)

    with sampling_mode(model):
        x = x0
        previous: int | None = None
        for k, t in enumerate(timesteps):
            t_eval = previous if previous is not None else t
            eps = model(x, at(t_eval))
            alpha_bar_cur = (
                schedule.alpha_bar[previous].to(device) if previous is not None else torch.ones((), device=device)
            )
            alpha_bar_next = schedule.alpha_bar[t].to(device)
            x_next, x0_pred = _inversion_step(x, eps, alpha_bar_cur, alpha_bar_next)
            for _ in range(fixed_point_iterations):
                # x_next = step(x, eps_theta(x_next, t_next)) makes the DDIM step down from x_next land on x
                x_next, x0_pred = _inversion_step(x, model(x_next, at(t)), alpha_bar_cur, alpha_bar_next)
            if callback is not None:
                callback(k, t, x, x0_pred)
            x = x_next
            previous = t
    return x


def round_trip_timesteps(schedule: NoiseSchedule, steps: int, t_end: int | None, spacing: str = "uniform") -> list[int]:
    """The increasing timesteps of an inversion by ``spacing`` (one of :data:`INVERSION_SPACINGS`)."""
    if spacing not in INVERSION_SPACINGS:
        raise ConfigError(f"inversion spacing must be one of {', '.join(INVERSION_SPACINGS)}, got {spacing!r}")
    if spacing == "logsnr":
        return logsnr_inversion_timesteps(schedule, steps, t_end)
    return inversion_timesteps(schedule.num_timesteps, steps, t_end)


def ddim_round_trip(
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    steps: int,
    t_end: int | None = None,
    fixed_point_iterations: int = 0,
    spacing: str = "uniform",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``x0`` with ``steps`` DDIM steps to ``t_end`` (default :func:`default_inversion_end`), each refined by
    ``fixed_point_iterations``, and reconstruct it with the same steps of plain DDIM; returns
    ``(x_t, reconstruction)``, both shaped like ``x0``. ``spacing``: ``uniform`` in t
    (:func:`inversion_timesteps`) or ``logsnr`` (:func:`logsnr_inversion_timesteps`)."""
    if t_end is None:
        t_end = default_inversion_end(schedule)
    timesteps = round_trip_timesteps(schedule, steps, t_end, spacing)
    latent = ddim_invert(model, schedule, x0, timesteps, fixed_point_iterations=fixed_point_iterations)
    reconstruction = ddim_sample(
        model, schedule, tuple(x0.shape), timesteps=timesteps[::-1], x_T=latent, device=x0.device
    )
    return latent, reconstruction
