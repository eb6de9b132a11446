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

``order=2`` replaces both directions' Euler steps (DDIM) by the two-step Adams-Bashforth method on the same ODE
and timesteps (:func:`adams_bashforth_flow`): each step's error falls from O(h^2) to O(h^3) at the same one
network evaluation per step, so the round trip closes much faster with the number of steps.
"""

from __future__ import annotations

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import split_output
from difflab.errors import ConfigError
from difflab.sampling.common import EpsModel, StepCallback, sampling_mode
from difflab.sampling.ddim import ddim_sample

INVERSION_ORDERS = (1, 2)


def default_inversion_end(schedule: NoiseSchedule, min_alpha_bar: float = 1e-3) -> int:
    """The last timestep with ``alpha_bar >= min_alpha_bar`` (x_t is then 99.9% noise by variance).

    Inverting further is ill-conditioned: reconstructing starts with ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)``,
    which multiplies the gap between the eps used going up and the eps used coming down by ``1 / sqrt(a)``
    (~2,000 at the cosine schedule's last step, where beta is clipped to 0.999)."""
    above = (schedule.alpha_bar >= min_alpha_bar).nonzero()
    return int(above.max()) if len(above) else schedule.num_timesteps - 1


def inversion_timesteps(num_timesteps: int, steps: int, t_end: int | None = None) -> list[int]:
    """The increasing timesteps of an inversion with ``steps`` steps ending at ``t_end`` (default T - 1).

    Evenly spaced from ``t_end / steps`` to ``t_end`` (so that DDIM over the reversed list undoes it); at most
    ``t_end`` steps, each at least one timestep long."""
    end = num_timesteps - 1 if t_end is None else t_end
    if not 0 <= end < num_timesteps:
        raise ValueError(f"t_end must be in [0, {num_timesteps - 1}], got {t_end}")
    if not 1 <= steps <= end:
        raise ConfigError(f"{steps} inversion steps do not fit between t = 0 and t_end = {end}: use 1 to {end} steps")
    return [round(end * (i + 1) / steps) for i in range(steps)]


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
    ``x_next = sqrt(a_next) x0_pred + sqrt(1 - a_next) eps``. x, eps: (B, ...); alpha_bar_cur, alpha_bar_next: 0-d
    tensors (or broadcasting to x); both returned (B, ...)."""
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
    """Map ``x0`` (B, ...) to ``x_t`` (B, ...) at ``timesteps[-1]`` along the increasing ``timesteps``; with
    ``fixed_point_iterations`` K > 0 each step is refined K times towards the exact inverse of the DDIM step
    (module docstring), at K extra network evaluations per step."""
    if fixed_point_iterations < 0:
        raise ValueError(f"fixed_point_iterations must be >= 0, got {fixed_point_iterations}")
    device = x0.device

    def at(t: int) -> torch.Tensor:
        """The timestep ``t`` for every item: (B,) int64 on ``x0``'s device."""
        return torch.full((x0.shape[0],), t, device=device, dtype=torch.long)

    with sampling_mode(model):
        x = x0
        previous: int | None = None
        for k, t in enumerate(timesteps):
            t_eval = previous if previous is not None else t
            eps, _ = split_output(model(x, at(t_eval)), x)  # a learned-variance model's extra channels: unused
            alpha_bar_cur = (
                schedule.alpha_bar[previous].to(device) if previous is not None else torch.ones((), device=device)
            )
            alpha_bar_next = schedule.alpha_bar[t].to(device)
            x_next, x0_pred = _inversion_step(x, eps, alpha_bar_cur, alpha_bar_next)
            for _ in range(fixed_point_iterations):
                # x_next = step(x, eps_theta(x_next, t_next)) makes the DDIM step down from x_next land on x
                eps_next, _ = split_output(model(x_next, at(t)), x)
                x_next, x0_pred = _inversion_step(x, eps_next, alpha_bar_cur, alpha_bar_next)
            if callback is not None:
                callback(k, t, x, x0_pred)
            x = x_next
            previous = t
    return x


def adams_bashforth_flow(
    model: EpsModel,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    levels: list[int | None],
    order: int = 2,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE from ``levels[0]`` to ``levels[-1]`` (timesteps, in either direction;
    ``None`` is the data, alpha_bar = 1) with one network evaluation per step. x: (B, ...) at ``levels[0]``;
    returns x at ``levels[-1]``.

    In ``y = x / sqrt(alpha_bar)`` and ``rho = sqrt((1 - alpha_bar) / alpha_bar)`` the ODE reads
    ``dy / drho = eps_theta(x, t)`` (Song et al. 2021, eq. 14). ``order=1`` is Euler's method, which is DDIM's
    update downwards and :func:`ddim_invert` upwards. ``order=2`` is the two-step Adams-Bashforth method with
    variable steps (``rhoAB`` of Zhang & Chen 2022, DEIS): with ``h = rho_next - rho_i``,
    ``y_next = y_i + h (eps_i + h / (2 h_prev) (eps_i - eps_prev))`` after a first Euler step. A step that starts
    at the data takes eps at its target timestep, as :func:`ddim_invert` does. ``callback(k, t, x, x0_pred)``
    after every network evaluation.
    """
    if order not in INVERSION_ORDERS:
        raise ConfigError(f"inversion order must be one of {', '.join(map(str, INVERSION_ORDERS))}, got {order}")
    alpha_bar = schedule.alpha_bar.double().cpu()

    def rho(level: int | None) -> float:
        return 0.0 if level is None else float(((1 - alpha_bar[level]) / alpha_bar[level]).sqrt())

    def root_alpha_bar(level: int | None) -> float:
        return 1.0 if level is None else float(alpha_bar[level].sqrt())

    with sampling_mode(model):
        y = x / root_alpha_bar(levels[0])
        previous: tuple[torch.Tensor, float] | None = None  # (eps, h) of the last step
        for k, (here, there) in enumerate(zip(levels[:-1], levels[1:])):
            t = here if here is not None else there
            if t is None:
                raise ValueError("adams_bashforth_flow needs a timestep among any two consecutive levels")
            x_here = y * root_alpha_bar(here)
            eps, _ = split_output(model(x_here, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)), x)
            if callback is not None:
                callback(k, t, x_here, y - rho(here) * eps)
            h = rho(there) - rho(here)
            slope = eps
            if order == 2 and previous is not None:
                slope = eps + (h / (2 * previous[1])) * (eps - previous[0])
            y = y + h * slope
            previous = (eps, h)
    return y * root_alpha_bar(levels[-1])


def invert(
    model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    timesteps: list[int],
    order: int = 1,
    fixed_point_iterations: int = 0,
) -> torch.Tensor:
    """``x0`` (B, ...) mapped to x_t (B, ...) at ``timesteps[-1]`` along the increasing ``timesteps``: DDIM inversion
    (``order=1``, optionally refined by fixed-point iterations) or the second-order Adams-Bashforth flow."""
    if order == 1:
        return ddim_invert(model, schedule, x0, timesteps, fixed_point_iterations=fixed_point_iterations)
    if fixed_point_iterations:
        raise ConfigError("fixed-point refinement inverts first-order (DDIM) steps: use it with order 1")
    return adams_bashforth_flow(model, schedule, x0, [None, *timesteps], order)


def reconstruct(
    model: EpsModel, schedule: NoiseSchedule, x_t: torch.Tensor, timesteps: list[int], order: int = 1
) -> torch.Tensor:
    """x_t (B, ...) at ``timesteps[-1]`` taken back to the data, (B, ...), along the increasing ``timesteps`` reversed:
    plain DDIM (eta = 0, ``order=1``) or the second-order Adams-Bashforth flow, the inverse of :func:`invert`."""
    if order == 1:
        return ddim_sample(model, schedule, tuple(x_t.shape), timesteps=timesteps[::-1], x_T=x_t, device=x_t.device)
    return adams_bashforth_flow(model, schedule, x_t, [*timesteps[::-1], None], order)


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
    order: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert ``x0`` with ``steps`` DDIM steps to ``t_end`` (default :func:`default_inversion_end`), each refined by
    ``fixed_point_iterations``, and reconstruct it with the same steps of plain DDIM; returns
    ``(x_t, reconstruction)``, both shaped like ``x0``. ``spacing``: ``uniform`` in t
    (:func:`inversion_timesteps`) or ``logsnr`` (:func:`logsnr_inversion_timesteps`). ``order=2``: both directions
    by the second-order Adams-Bashforth flow on the same timesteps (:func:`adams_bashforth_flow`, same NFE)."""
    if t_end is None:
        t_end = default_inversion_end(schedule)
    timesteps = round_trip_timesteps(schedule, steps, t_end, spacing)
    latent = invert(model, schedule, x0, timesteps, order, fixed_point_iterations)
    return latent, reconstruct(model, schedule, latent, timesteps, order)
