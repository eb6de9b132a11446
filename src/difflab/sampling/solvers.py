"""Fast samplers: DPM-Solver++(2M) and (3M) with their SDE forms, Heun/Euler on the probability-flow ODE,
Euler ancestral, respaced DDPM and DDIM, each optionally followed by Langevin corrector steps, DDIM switching
from the ODE to ancestral steps; and a registry by name.

Every sampler has one signature::

    sample(model, schedule, shape, *, steps, generator=None, device="cpu", x_T=None,
           callback=None, show_progress=False, **options) -> x_0 of ``shape``

``model`` is an eps-model ``model(x_t, t) -> eps`` or a :class:`~difflab.sampling.wrappers.DiffusionModel`
(any parameterisation); pass a ``DiffusionModel`` and read its ``nfe`` to count network evaluations.
All start from the same ``x_T ~ N(0, I)`` in the model's VP space (drawn first from ``generator``), so the
same seed gives every sampler the same starting noise.

Two families:

- *discrete-timestep* samplers (``ddpm``, ``ddim``, ``ode-ancestral``, the ``dpmpp-*`` family and the ``+pc``
  forms) visit integer timesteps of the training schedule, at most T of them; their
  ``callback(k, t, x, x0_pred)`` gets the integer timestep t;
- *sigma-space* samplers (``euler``, ``heun``, ``euler-a``) integrate in the VE variable
  ``x_ve = x_vp / sqrt(alpha_bar)`` over continuous noise levels sigma (Karras et al. 2022), querying the
  network at fractional timesteps; any number of steps works. Their callback gets ``(i, sigma_i, x_vp,
  x0_pred)``: the VE sigma, and x mapped back to the VP space so every sampler's trajectory is comparable.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import FIXED_VARIANCES
from difflab.errors import ConfigError
from difflab.sampling.common import StepCallback, check_eta, progress, randn, sampling_mode, timestep_list
from difflab.sampling.ddim import ddim_step, per_step_etas
from difflab.sampling.wrappers import DiffusionModel, as_diffusion_model

SIGMA_SCHEDULES = ("karras", "uniform")
FINAL_SIGMAS = ("zero", "sigma_min")


# ----------------------------------------------------------------------------------------------------
# Step lists
# ----------------------------------------------------------------------------------------------------
DPM_SPACINGS = ("linspace", "leading", "trailing", "karras", "logsnr")
# The karras and logsnr ladders start no higher (then jump to T - 1): the cosine schedule's last steps, clipped at
# beta = 0.999, reach sigma = 2e4 and would take most of the ladder. At sigma = 40, alpha_bar = 6e-4: pure noise to
# 3 digits. Chosen on the v MNIST model, 10 steps, seed 4321: caps 20 / 30 / 40 / 80 / 160 gave FID 10.84 / 10.64 /
# 10.33 / 11.26 / 17.05 (README); EDM's sigma_max is 80.
LADDER_SIGMA_MAX = 40.0


def dpm_solver_timesteps(
    num_timesteps: int,
    steps: int,
    spacing: str = "linspace",
    log_sigmas: torch.Tensor | None = None,
    ladder_sigma_max: float = LADDER_SIGMA_MAX,
) -> list[int]:
    """The decreasing timesteps DPM-Solver visits before its final jump to ``alpha_bar = 1``.

    Spaced as diffusers' ``DPMSolverMultistepScheduler.set_timesteps`` does (which differs from DDIM's
    lists): ``linspace``: ``round(linspace(0, T-1, steps+1))`` without the 0; ``leading``:
    ``(0..steps) * (T // (steps+1))`` without the 0; ``trailing``: ``round(arange(T, 0, -T/steps)) - 1``.
    ``karras`` and ``logsnr`` need the schedule's ``log_sigmas`` (T,), increasing (``precise_log_sigmas()``): the VE
    noise levels ``s_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` from ``min(s_{T-1}, ladder_sigma_max)`` down to
    ``s_0`` (the first step stays at T - 1, where x_T ~ N(0, I) is the marginal) spaced as EDM's eq. 5 with
    rho = 7 (more steps at low noise; diffusers' ``use_karras_sigmas``), or uniformly in
    ``lambda = -log s`` (Lu et al. 2022, sec. 3.3, their choice for low-resolution images; diffusers'
    ``use_lu_lambdas``), each rounded to the timestep at that level, interpolating ``log s`` linearly between
    timesteps. Repeated entries (steps close to T) are dropped, so a list may be shorter than ``steps``.
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must be between 1 and the schedule's {num_timesteps} timesteps, got {steps}")
    if spacing == "linspace":
        # numpy's linspace, as diffusers uses: torch's rounds some midpoints (e.g. 499.5) the other way
        grid = np.linspace(0, num_timesteps - 1, steps + 1).round().astype(np.int64).tolist()[1:]
    elif spacing == "leading":
        ratio = num_timesteps // (steps + 1)
        grid = [i * ratio for i in range(1, steps + 1)]
    elif spacing == "trailing":
        grid = (np.arange(num_timesteps, 0, -num_timesteps / steps).round().astype(np.int64) - 1).tolist()
    elif spacing in ("karras", "logsnr"):
        if log_sigmas is None or len(log_sigmas) != num_timesteps:
            raise ConfigError(f"{spacing} spacing needs the schedule's log sigmas for its {num_timesteps} timesteps")
        log_sigma = log_sigmas.double().cpu().numpy()
        if not ladder_sigma_max > math.exp(log_sigma[0]):
            raise ConfigError(f"ladder_sigma_max must exceed the smallest noise level, got {ladder_sigma_max}")
        top = min(float(log_sigma[-1]), math.log(ladder_sigma_max))
        if steps == 1:
            targets = log_sigma[-1:]
        elif spacing == "karras":
            targets = np.log(karras_sigmas(math.exp(log_sigma[0]), math.exp(top), steps).numpy()[:-1])
        else:
            targets = np.linspace(top, log_sigma[0], steps)
        targets[0] = log_sigma[-1]  # always start at T - 1, where x_T ~ N(0, I) is the marginal
        # the fractional timestep at each target level (log s increases with t), then rounded
        grid = np.interp(targets, log_sigma, np.arange(num_timesteps)).round().astype(np.int64).tolist()
    else:
        raise ConfigError(f"spacing must be one of {', '.join(DPM_SPACINGS)}, got {spacing!r}")
    return sorted(set(grid), reverse=True)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """EDM eq. 5: ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, then a final 0.

    Returns (steps + 1,) float64, decreasing, ending with 0.
    """
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if not (math.isfinite(rho) and rho > 0):
        raise ConfigError(f"rho must be finite and > 0, got {rho}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    try:
        low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    except OverflowError:
        raise ConfigError(f"rho={rho} is too small: sigma_max^(1/rho) overflows (sigma_max {sigma_max:.4g})") from None
    sigmas = (high + ramp * (low - high)) ** rho
    if not bool(torch.isfinite(sigmas).all()):
        raise ConfigError(f"rho={rho} is too small: the Karras noise levels overflow (sigma_max = {sigma_max:.4g})")
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def uniform_t_sigmas(model: DiffusionModel, steps: int) -> torch.Tensor:
    """Sigmas at ``steps`` timesteps evenly spaced from T-1 to 0 (fractional), then a final 0. (steps + 1,)."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(model.num_timesteps - 1, 0, steps, dtype=torch.float64)
    return torch.cat([model.t_to_sigma(t), torch.zeros(1, dtype=torch.float64)])


def sigma_schedule(model: DiffusionModel, steps: int, kind: str = "karras", rho: float = 7.0) -> torch.Tensor:
    """The decreasing noise levels a sigma-space sampler visits: Karras (rho) or uniform in t. (steps + 1,)."""
    if kind == "karras":
        return karras_sigmas(model.sigma_min, model.sigma_max, steps, rho)
    if kind == "uniform":
        return uniform_t_sigmas(model, steps)
    raise ConfigError(f"sigmas must be one of {', '.join(SIGMA_SCHEDULES)}, got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Langevin corrector (Song et al. 2021, Algorithm "PC sampling", corrector of their code)
# ----------------------------------------------------------------------------------------------------
def langevin_correct(
    x: torch.Tensor,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    snr: float,
    n_steps: int,
    alpha: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``n_steps`` Langevin steps ``x <- x + e s(x) + sqrt(2 e) z`` at a fixed noise level; x: (B, ...).

    The step size follows the signal-to-noise rule ``e = 2 alpha (snr ||z|| / ||s||)^2``, the norms being
    per-sample Euclidean norms averaged over the batch (as in Song et al.'s code); ``alpha`` is
    ``1 - beta_t`` of the level corrected. The rule is invariant to rescaling x, so it gives the same
    update in the VP and the VE variable.
    """
    for _ in range(n_steps):
        score = score_fn(x)
        noise = randn(tuple(x.shape), generator, x.device).to(x.dtype)
        score_norm = score.reshape(len(score), -1).norm(dim=1).mean()
        noise_norm = noise.reshape(len(noise), -1).norm(dim=1).mean()
        step = 2 * alpha * (snr * noise_norm / score_norm.clamp(min=1e-12)) ** 2
        x = x + step * score + (2 * step).sqrt() * noise
    return x


def _check_corrector(corrector_steps: int, snr: float) -> None:
    if corrector_steps < 0 or snr <= 0:
        raise ConfigError(f"the corrector needs corrector_steps >= 0 and snr > 0, got {corrector_steps} and {snr}")


def _start(shape: tuple[int, ...], x_T: torch.Tensor | None, generator, device) -> torch.Tensor:
    """The chain's start on ``device``: ``x_T`` (B, ...) when given, else N(0, I) noise of ``shape`` (B, ...)."""
    return randn(shape, generator, device) if x_T is None else x_T.to(device)


def _index(t: int, batch: int, device) -> torch.Tensor:
    """The timestep ``t`` for every item of the batch: (batch,) int64."""
    return torch.full((batch,), t, device=device, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------
# Discrete-timestep samplers
# ----------------------------------------------------------------------------------------------------
def sample_ddpm(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    spacing: str = "trailing",
    variance: str = "beta",
    corrector_steps: int = 0,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Ancestral DDPM sampling, respaced to ``steps`` timesteps (Nichol & Dhariwal 2021, section 4).

    Over the visited list ``t_0 > t_1 > ...`` each jump ``t -> t'`` is one step of the DDPM whose
    ``alpha = alpha_bar_t / alpha_bar_t'`` (``alpha_bar = 1`` after the last timestep): posterior mean
    ``mu = sqrt(a') beta / (1 - a) x0_pred + sqrt(alpha) (1 - a') / (1 - a) x_t`` and variance ``beta``
    (``variance="beta"``) or ``beta (1 - a') / (1 - a)`` (``"posterior"``); no noise at the end. With
    ``steps = T`` (the default) this is Ho et al.'s Algorithm 2, identical to :func:`ddpm_sample`.
    ``corrector_steps > 0`` adds Langevin steps (snr rule) after every predictor step but the last.

    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``.
    """
    if variance == "learned":
        # this sampler sees the model through DiffusionModel, which keeps only eps, not the variance channels
        raise ConfigError(
            "the registry's ddpm sampler takes variance beta or posterior; a learned variance is sampled by the "
            "recipe's own DDPM (difflab.sampling.ddpm.ddpm_sample with variance='learned')"
        )
    if variance not in FIXED_VARIANCES:
        raise ConfigError(f"DDPM variance must be one of {', '.join(FIXED_VARIANCES)}, got {variance!r}")
    _check_corrector(corrector_steps, snr)
    net = as_diffusion_model(model, schedule)
    timesteps = timestep_list(schedule.num_timesteps, steps or schedule.num_timesteps, spacing)
    alpha_bar, one_minus = schedule.precise_alpha_bar()
    log_alpha_bar = alpha_bar.log()
    with sampling_mode(net):
        x = _start(shape, x_T, generator, device)
        for k in progress(list(range(len(timesteps))), show_progress, "DDPM"):
            t = timesteps[k]
            t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else None
            one_minus_t = float(one_minus[t])
            a_prev = float(alpha_bar[t_prev]) if t_prev is not None else 1.0
            one_minus_prev = float(one_minus[t_prev]) if t_prev is not None else 0.0
            # alpha = a_t / a_prev and beta = 1 - alpha of the respaced chain, without cancellation
            log_alpha = float(log_alpha_bar[t] - (log_alpha_bar[t_prev] if t_prev is not None else 0.0))
            alpha, beta = math.exp(log_alpha), -math.expm1(log_alpha)
            x0_pred = net.x0(x, _index(t, shape[0], device))
            if callback is not None:
                callback(k, t, x, x0_pred)
            # Ho et al. eq. 7 for the respaced chain
            mean = (math.sqrt(a_prev) * beta / one_minus_t) * x0_pred + (
                math.sqrt(alpha) * one_minus_prev / one_minus_t
            ) * x
            if t_prev is None:
                x = mean
                break
            var = beta if variance == "beta" else beta * one_minus_prev / one_minus_t
            x = mean + math.sqrt(var) * randn(shape, generator, device)
            if corrector_steps:
                index = _index(t_prev, shape[0], device)
                x = langevin_correct(
                    x,
                    lambda z, index=index: net.score(z, index),
                    snr=snr,
                    n_steps=corrector_steps,
                    alpha=float(schedule.alphas[t_prev]),
                    generator=generator,
                )
    return x


def sample_ddim(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    spacing: str = "trailing",
    eta: float | Sequence[float] = 0.0,
    corrector_steps: int = 0,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """DDIM (:func:`~difflab.sampling.ddim.ddim_step`) over ``steps`` timesteps, optionally with Langevin
    corrector steps after every predictor step but the last. Defaults to ``trailing`` spacing, which starts
    at T-1 (unlike :func:`ddim_sample`'s ``leading`` default). ``eta`` may be one value per step (``eta[k]`` for
    the update from the k-th visited timestep); noise is drawn only at steps with ``eta > 0``.
    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``."""
    _check_corrector(corrector_steps, snr)
    net = as_diffusion_model(model, schedule)
    timesteps = timestep_list(schedule.num_timesteps, steps, spacing)
    etas = per_step_etas(eta, len(timesteps))
    with sampling_mode(net):
        x = _start(shape, x_T, generator, device)
        for k in progress(list(range(len(timesteps))), show_progress, "DDIM"):
            t = timesteps[k]
            t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else None
            eps = net.eps(x, _index(t, shape[0], device))
            noise = randn(shape, generator, device) if etas[k] > 0 and t_prev is not None else None
            x_next, x0_pred = ddim_step(schedule, eps, t, t_prev, x, etas[k], noise)
            if callback is not None:
                callback(k, t, x, x0_pred)
            x = x_next
            if corrector_steps and t_prev is not None:
                index = _index(t_prev, shape[0], device)
                x = langevin_correct(
                    x,
                    lambda z, index=index: net.score(z, index),
                    snr=snr,
                    n_steps=corrector_steps,
                    alpha=float(schedule.alphas[t_prev]),
                    generator=generator,
                )
    return x


def ode_ancestral_etas(timesteps: Sequence[int], num_timesteps: int, switch: float = 0.8) -> list[float]:
    """DDIM's eta per visited timestep for :func:`sample_ode_ancestral`: 0 (the probability-flow ODE) while
    ``t > switch * T``, 1 (DDPM's ancestral step, posterior variance) from there on."""
    if not 0 <= switch <= 1:
        raise ConfigError(f"switch must lie in [0, 1] (a fraction of T), got {switch}")
    tau = switch * num_timesteps
    return [0.0 if t > tau else 1.0 for t in timesteps]


def sample_ode_ancestral(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    switch: float = 0.8,
    spacing: str = "trailing",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """DDIM with eta = 0 while ``t > switch * T`` and eta = 1 below: the deterministic probability-flow ODE
    carries x_T through the high noise levels and ancestral steps finish the chain.

    Ancestral noise corrects errors of the network that the ODE carries to the end (Karras et al. 2022,
    sec. 4); at high noise the ODE's errors matter little and its determinism keeps x_T's content. On the
    v-prediction MNIST model this beats both pure forms at 50 steps (``benchmarks/ode_gap.py``, README).
    ``switch = 0`` is DDIM (eta 0), ``switch = 1`` DDIM with eta 1 everywhere.
    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``."""
    timesteps = timestep_list(schedule.num_timesteps, steps, spacing)
    etas = ode_ancestral_etas(timesteps, schedule.num_timesteps, switch)
    return sample_ddim(
        model,
        schedule,
        shape,
        steps=steps,
        spacing=spacing,
        eta=etas,
        generator=generator,
        device=device,
        x_T=x_T,
        callback=callback,
        show_progress=show_progress,
    )


def sample_dpmpp_2m(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 20,
    spacing: str = "trailing",
    lower_order_final: bool = True,
    final_sigma: str = "zero",
    sde: bool = False,
    sde_switch: float = 1.0,
    eta: float = 1.0,
    ladder_sigma_max: float = LADDER_SIGMA_MAX,
    order: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the multistep second-order solver of the
    probability-flow ODE in its data-prediction form, on the discrete schedule; with ``sde=True`` its
    stochastic form, SDE-DPM-Solver++(2M), which solves the reverse SDE instead.

    With ``alpha = sqrt(alpha_bar)``, ``sigma = sqrt(1 - alpha_bar)``, ``lambda = log(alpha / sigma)`` and
    ``h = lambda_next - lambda_i``, one step is
    ``x_next = (sigma_next / sigma_i) x_i + alpha_next (1 - e^{-h}) D``, where ``D = x0_i`` on the first
    step (first order: DDIM) and ``D = x0_i + (x0_i - x0_{i-1}) / (2 r)``, ``r = h_{i-1} / h``, after.
    Timesteps are spaced as diffusers spaces them (:func:`dpm_solver_timesteps`); the last jump goes to
    ``alpha_bar = 1`` (``final_sigma="zero"``, where it is first order and returns ``x0_pred``) or to the
    smallest training noise level (``"sigma_min"``). As in diffusers, the last step is also first order when
    ``lower_order_final`` and fewer than 15 steps are taken. One network evaluation per step.

    SDE-DPM-Solver++(2M) (the DPM-Solver authors' SDE variant, as diffusers' ``sde-dpmsolver++`` with the
    midpoint rule implements it) integrates the reverse SDE exactly in its linear part:
    ``x_next = (sigma_next / sigma_i) e^{-h} x_i + alpha_next (1 - e^{-2h}) D + sigma_next sqrt(1 - e^{-2h}) z``,
    z ~ N(0, I) drawn from ``generator`` at every step but a final jump to ``alpha_bar = 1``. Its injected noise
    corrects the network's errors as ancestral sampling does, where the ODE carries them to the end.
    ``sde_switch < 1`` keeps the ODE's update for the steps from ``t > sde_switch * T`` (both forms share ``D``),
    as :func:`sample_ode_ancestral` does. ``eta`` scales the SDE's noise (k-diffusion's ``dpmpp_2m_sde``
    convention): ``x_next = (sigma_next / sigma_i) e^{-eta h} x_i + alpha_next (1 - e^{-(1 + eta) h}) D
    + sigma_next sqrt(1 - e^{-2 eta h}) z``, so 1 is the SDE above and 0 the ODE; every eta keeps the marginals
    of an exact model. Both options act only with ``sde=True``. ``ladder_sigma_max`` caps the karras and logsnr
    spacings (:func:`dpm_solver_timesteps`).

    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``.
    """
    if final_sigma not in FINAL_SIGMAS:
        raise ConfigError(f"final_sigma must be one of {', '.join(FINAL_SIGMAS)}, got {final_sigma!r}")
    if not 0 <= sde_switch <= 1:
        raise ConfigError(f"sde_switch must lie in [0, 1] (a fraction of T), got {sde_switch}")
    check_eta(eta)
    if order not in (2, 3):
        raise ConfigError(f"DPM-Solver++ multistep order must be 2 or 3, got {order}")
    net = as_diffusion_model(model, schedule)
    alpha_bar, one_minus = schedule.precise_alpha_bar()
    timesteps = dpm_solver_timesteps(
        schedule.num_timesteps, steps, spacing, schedule.precise_log_sigmas(), ladder_sigma_max
    )
    # (alpha_bar, 1 - alpha_bar) at each visited timestep, then at the final level
    levels = [(float(alpha_bar[t]), float(one_minus[t])) for t in timesteps]
    levels.append((1.0, 0.0) if final_sigma == "zero" else (float(alpha_bar[0]), float(one_minus[0])))
    count = len(timesteps)

    def lam(level: tuple[float, float]) -> float:  # lambda = log(alpha / sigma) = 0.5 log(a / (1 - a))
        return 0.5 * (math.log(level[0]) - math.log(level[1])) if level[1] > 0 else math.inf

    name = f"{'SDE-' if sde else ''}DPM-Solver++({order}M)"
    with sampling_mode(net):
        x = _start(shape, x_T, generator, device)
        history: list[tuple[float, torch.Tensor]] = []  # (lambda, x0_pred) of the steps taken, newest last
        for k in progress(list(range(count)), show_progress, name):
            t = timesteps[k]
            here, there = levels[k], levels[k + 1]
            x0_pred = net.x0(x, _index(t, shape[0], device))
            if callback is not None:
                callback(k, t, x, x0_pred)
            if there[1] == 0:  # the final jump to sigma = 0 lands on the data prediction itself
                x = x0_pred
                break
            h = lam(there) - lam(here)
            step_order = min(order, len(history) + 1)
            if lower_order_final and count < 15:  # diffusers: first order on the last step, at most second before
                step_order = 1 if k == count - 1 else min(step_order, 2) if k == count - 2 else step_order
            stochastic = sde and eta > 0 and t <= sde_switch * schedule.num_timesteps
            noise_eta = eta if stochastic else 0.0
            big_h = (1 + noise_eta) * h  # the exponent of the data term: h for the ODE, 2h for the SDE (eta = 1)
            data = -math.expm1(-big_h) * x0_pred  # (1 - e^{-H}) D0
            if step_order == 2:  # midpoint rule: + (1 - e^{-H}) (D0 - D0_prev) / (2 r)
                r = (lam(here) - history[-1][0]) / h
                data = data + (-math.expm1(-big_h) / (2 * r)) * (x0_pred - history[-1][1])
            elif step_order == 3:  # Lu et al. 2022b, the third-order multistep update in the data form
                r0 = (lam(here) - history[-1][0]) / h
                r1 = (history[-1][0] - history[-2][0]) / h
                d1_0 = (x0_pred - history[-1][1]) / r0
                d1_1 = (history[-1][1] - history[-2][1]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = 1 + math.expm1(-big_h) / big_h  # 1 - (1 - e^{-H}) / H
                phi_3 = 0.5 - (math.expm1(-big_h) + big_h) / big_h**2  # 1/2 - (e^{-H} - 1 + H) / H^2
                data = data + phi_2 * d1 + phi_3 * d2
            # x_next = (sigma_next / sigma_i) e^{-eta h} x_i + alpha_next * data + sigma_next sqrt(1 - e^{-2 eta h}) z
            x = math.sqrt(there[1] / here[1]) * math.exp(-noise_eta * h) * x + math.sqrt(there[0]) * data
            if stochastic:
                x = x + math.sqrt(-there[1] * math.expm1(-2 * noise_eta * h)) * randn(shape, generator, device)
            history = [*history[-1:], (lam(here), x0_pred)]
    return x


def sample_dpmpp_3m(model: Any, schedule: NoiseSchedule, shape: tuple[int, ...], **options: Any) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022b): :func:`sample_dpmpp_2m` with ``order=3``, the third-order multistep
    update once two earlier data predictions exist, and with fewer than 15 steps second order on the step before
    the last. ``sde=True`` (and ``eta``, ``sde_switch``) give SDE-DPM-Solver++(3M). One evaluation per step."""
    return sample_dpmpp_2m(model, schedule, shape, order=3, **options)


# sample_dpmpp_3m's options are sample_dpmpp_2m's but ``order``: what SamplerSpec.option_names reads
_signature = inspect.signature(sample_dpmpp_2m)
sample_dpmpp_3m.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _signature.parameters.values() if p.name != "order"]
)


# ----------------------------------------------------------------------------------------------------
# Sigma-space samplers (EDM / k-diffusion style)
# ----------------------------------------------------------------------------------------------------
def _to_vp(x_ve: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x_vp = x_ve / sqrt(1 + sigma^2)``: (B, ...) -> (B, ...)."""
    return x_ve / math.sqrt(1 + sigma**2)


def _sigmas_for(net: DiffusionModel, steps: int, sigmas: str | torch.Tensor, rho: float) -> torch.Tensor:
    """The noise levels to visit, float64 on the CPU, decreasing: :func:`sigma_schedule`'s (steps + 1,) for a name,
    or an explicit ``sigmas`` (L,) checked (1-D, L >= 2, strictly decreasing)."""
    if isinstance(sigmas, torch.Tensor):
        values = sigmas.double().cpu()
        if values.ndim != 1 or len(values) < 2 or not bool((values[:-1] > values[1:]).all()):
            raise ConfigError("explicit sigmas must be a decreasing 1-D tensor of at least 2 values")
        return values
    return sigma_schedule(net, steps, sigmas, rho)


def _ve_start(shape, x_T, generator, device, sigma_start: float) -> torch.Tensor:
    """The VE chain's start ``x_T sqrt(1 + sigma_start^2)``, (B, ...) of ``shape``, from :func:`_start`."""
    # x_T ~ N(0, I) in the VP space at the first noise level, i.e. x_ve = x_T sqrt(1 + sigma^2).
    return _start(shape, x_T, generator, device) * math.sqrt(1 + sigma_start**2)


def _ve_corrector(net: DiffusionModel, schedule, x, sigma: float, corrector_steps, snr, generator) -> torch.Tensor:
    """Langevin steps on ``x_ve`` with the VE score ``(D(x; sigma) - x) / sigma^2``. x: (B, ...) -> (B, ...)."""
    t = float(net.sigma_to_t(sigma))
    alpha = float(schedule.alphas[min(max(round(t), 0), schedule.num_timesteps - 1)])
    return langevin_correct(
        x,
        lambda z: (net.denoise(z, sigma) - z) / sigma**2,
        snr=snr,
        n_steps=corrector_steps,
        alpha=alpha,
        generator=generator,
    )


def sample_euler(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    sigmas: str | torch.Tensor = "karras",
    rho: float = 7.0,
    corrector_steps: int = 0,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (EDM eq. 3,
    first order; one evaluation per step), optionally with Langevin corrector steps after each step that
    does not end at sigma = 0. ``sigmas``: ``"karras"`` (rho), ``"uniform"`` in t, or an explicit tensor.
    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``."""
    _check_corrector(corrector_steps, snr)
    net = as_diffusion_model(model, schedule)
    levels = _sigmas_for(net, steps, sigmas, rho).tolist()
    with sampling_mode(net):
        x = _ve_start(shape, x_T, generator, device, levels[0])
        for i in progress(list(range(len(levels) - 1)), show_progress, "Euler"):
            sigma, sigma_next = levels[i], levels[i + 1]
            denoised = net.denoise(x, sigma)
            if callback is not None:
                callback(i, sigma, _to_vp(x, sigma), denoised)
            x = x + (sigma_next - sigma) * (x - denoised) / sigma
            if corrector_steps and sigma_next > 0:
                x = _ve_corrector(net, schedule, x, sigma_next, corrector_steps, snr, generator)
    return x


def sample_heun(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 25,
    sigmas: str | torch.Tensor = "karras",
    rho: float = 7.0,
    churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1; with
    ``churn > 0``, Algorithm 2's stochastic churn).

    Per step: (churn) ``sigma_hat = sigma_i (1 + gamma)``, ``gamma = min(churn / N, sqrt(2) - 1)`` for
    ``s_tmin <= sigma_i <= s_tmax``, ``x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) s_noise z``; then
    ``d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat``, Euler to ``x' = x_hat + (sigma_next - sigma_hat) d``
    and, unless ``sigma_next = 0``, the trapezoidal correction with ``d' = (x' - D(x'; sigma_next)) / sigma_next``.
    ``steps`` noise levels cost ``2 steps - 1`` evaluations.

    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``.
    """
    if not (churn >= 0 and s_noise >= 0 and s_tmin <= s_tmax):
        raise ConfigError(
            f"heun needs churn >= 0, s_noise >= 0 and s_tmin <= s_tmax, got {churn}, {s_noise}, {s_tmin} and {s_tmax}"
        )
    net = as_diffusion_model(model, schedule)
    levels = _sigmas_for(net, steps, sigmas, rho).tolist()
    count = len(levels) - 1
    with sampling_mode(net):
        x = _ve_start(shape, x_T, generator, device, levels[0])
        for i in progress(list(range(count)), show_progress, "Heun"):
            sigma, sigma_next = levels[i], levels[i + 1]
            gamma = min(churn / count, math.sqrt(2) - 1) if churn > 0 and s_tmin <= sigma <= s_tmax else 0.0
            sigma_hat = sigma * (1 + gamma)
            if gamma > 0:  # EDM Algorithm 2, lines 5-6
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn(shape, generator, device)
            denoised = net.denoise(x, sigma_hat)
            if callback is not None:
                callback(i, sigma_hat, _to_vp(x, sigma_hat), denoised)
            slope = (x - denoised) / sigma_hat
            x_next = x + (sigma_next - sigma_hat) * slope
            if sigma_next > 0:  # EDM Algorithm 1, lines 9-11: second-order correction
                slope_next = (x_next - net.denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma_hat) * (slope + slope_next) / 2
            x = x_next
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` splitting a step of a VE ancestral sampler (k-diffusion's rule):
    ``sigma_up = min(sigma_next, eta sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2))``,
    ``sigma_down = sqrt(sigma_next^2 - sigma_up^2)``."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler_ancestral(
    model: Any,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    sigmas: str | torch.Tensor = "karras",
    rho: float = 7.0,
    eta: float = 1.0,
    corrector_steps: int = 0,
    snr: float = 0.16,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    x_T: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``): an Euler step of the ODE down to
    ``sigma_down``, then fresh noise of std ``sigma_up`` (:func:`ancestral_step`); ``eta = 1`` matches the
    DDPM posterior. One evaluation per step.
    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``."""
    check_eta(eta)
    _check_corrector(corrector_steps, snr)
    net = as_diffusion_model(model, schedule)
    levels = _sigmas_for(net, steps, sigmas, rho).tolist()
    with sampling_mode(net):
        x = _ve_start(shape, x_T, generator, device, levels[0])
        for i in progress(list(range(len(levels) - 1)), show_progress, "Euler ancestral"):
            sigma, sigma_next = levels[i], levels[i + 1]
            denoised = net.denoise(x, sigma)
            if callback is not None:
                callback(i, sigma, _to_vp(x, sigma), denoised)
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            x = x + (sigma_down - sigma) * (x - denoised) / sigma
            if sigma_next > 0:
                x = x + sigma_up * randn(shape, generator, device)
                if corrector_steps:
                    x = _ve_corrector(net, schedule, x, sigma_next, corrector_steps, snr, generator)
    return x


# ----------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name: its function, fixed options, and its evaluation count for a number of steps.

    ``discrete``: visits integer timesteps, so at most T steps. ``evals_per_step`` and ``evals_saved``
    give ``nfe(steps) = evals_per_step * steps - evals_saved``.
    """

    name: str
    function: Callable[..., torch.Tensor]
    description: str
    discrete: bool
    stochastic: bool
    evals_per_step: int = 1
    evals_saved: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def nfe(self, steps: int) -> int:
        """Network evaluations of a run with ``steps`` steps."""
        return self.evals_per_step * steps - self.evals_saved

    def max_steps(self, num_timesteps: int) -> int | None:
        return num_timesteps if self.discrete else None

    def check_steps(self, steps: int, num_timesteps: int) -> None:
        """A ConfigError for a step count this sampler cannot take on a schedule of ``num_timesteps`` steps."""
        limit = self.max_steps(num_timesteps)
        if steps < 1 or (limit is not None and steps > limit):
            raise ConfigError(f"{self.name} takes 1 to T={limit} steps, got {steps}")

    def steps_for_nfe(self, nfe: int, num_timesteps: int) -> int | None:
        """The most steps whose NFE is at most ``nfe``; None when even 1 step costs more or T is exceeded."""
        steps = (nfe + self.evals_saved) // self.evals_per_step
        if steps < 1 or self.nfe(steps) < 1:
            return None
        limit = self.max_steps(num_timesteps)
        if limit is not None and steps > limit:
            return None
        return steps

    def option_names(self) -> list[str]:
        """The keyword options its function takes beyond the common signature (e.g. ``eta``, ``spacing``)."""
        params = inspect.signature(self.function).parameters
        names = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in COMMON]
        if "sde" in names:  # DPM-Solver++: the name fixes the form; eta and sde_switch act only in the SDE form
            dropped = {"sde", "order"} | (set() if self.options.get("sde") else {"eta", "sde_switch"})
            names = [name for name in names if name not in dropped]
        return names

    def check_options(self, options: dict[str, Any]) -> None:
        """A ConfigError naming the option and the ones this sampler takes, for an option it does not take."""
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise ConfigError(
                f"sampler {self.name} takes no option {', '.join(map(repr, unknown))}; "
                f"its options: {', '.join(self.option_names())}"
            )
        params = inspect.signature(self.function).parameters
        for name, value in options.items():  # a value of its default's kind: a word where a number goes fails here
            default = params[name].default
            if isinstance(default, bool):
                fits = isinstance(value, bool)
            elif isinstance(default, int | float):
                fits = isinstance(value, int | float) and not isinstance(value, bool)
            else:
                fits = not isinstance(default, str) or isinstance(value, str)
            if not fits:
                raise ConfigError(f"sampler {self.name}: option {name} takes a {type(default).__name__}, got {value!r}")

    def __call__(self, model: Any, schedule: NoiseSchedule, shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        """The sampler's function with this entry's fixed options under ``kwargs``; x_0 of ``shape`` (B, ...)."""
        return self.function(model, schedule, shape, **{**self.options, **kwargs})


# the keywords every sampler takes; the rest of a function's keyword-only parameters are its options
COMMON = frozenset({"steps", "generator", "device", "x_T", "callback", "show_progress"})


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in [
        SamplerSpec("ddpm", sample_ddpm, "DDPM ancestral, respaced (trailing) when steps < T", True, True),
        SamplerSpec("ddim", sample_ddim, "DDIM, eta = 0 (trailing)", True, False),
        SamplerSpec(
            "ode-ancestral",
            sample_ode_ancestral,
            "DDIM, eta = 0 above t = 0.8 T and 1 below (trailing)",
            True,
            True,
        ),
        SamplerSpec("dpmpp-2m", sample_dpmpp_2m, "DPM-Solver++(2M), data prediction (trailing)", True, False),
        SamplerSpec(
            "dpmpp-2m-sde",
            sample_dpmpp_2m,
            "SDE-DPM-Solver++(2M), midpoint, data prediction (trailing)",
            True,
            True,
            options={"sde": True},
        ),
        SamplerSpec(
            "dpmpp-2m-ode-sde",
            sample_dpmpp_2m,
            "DPM-Solver++(2M), the ODE above t = 0.8 T and the SDE below (trailing)",
            True,
            True,
            options={"sde": True, "sde_switch": 0.8},
        ),
        SamplerSpec(
            "dpmpp-2m-sde-karras",
            sample_dpmpp_2m,
            "SDE-DPM-Solver++(2M) on the Karras ladder of timesteps",
            True,
            True,
            options={"sde": True, "spacing": "karras"},
        ),
        SamplerSpec(
            "dpmpp-2m-ode-sde-karras",
            sample_dpmpp_2m,
            "DPM-Solver++(2M), the ODE above t = 0.8 T and the SDE below, on the Karras ladder of timesteps",
            True,
            True,
            options={"sde": True, "sde_switch": 0.8, "spacing": "karras"},
        ),
        SamplerSpec("dpmpp-3m", sample_dpmpp_3m, "DPM-Solver++(3M), data prediction (trailing)", True, False),
        SamplerSpec(
            "dpmpp-3m-sde",
            sample_dpmpp_3m,
            "SDE-DPM-Solver++(3M), data prediction (trailing)",
            True,
            True,
            options={"sde": True},
        ),
        SamplerSpec("euler", sample_euler, "Euler on the probability-flow ODE, Karras sigmas", False, False),
        SamplerSpec("heun", sample_heun, "Heun (EDM Algorithm 1), Karras sigmas", False, False, 2, 1),
        SamplerSpec("euler-a", sample_euler_ancestral, "Euler ancestral, eta = 1, Karras sigmas", False, True),
        SamplerSpec(
            "ddpm+pc",
            sample_ddpm,
            "DDPM predictor + 1 Langevin corrector step (snr 0.16)",
            True,
            True,
            2,
            1,
            {"corrector_steps": 1},
        ),
        SamplerSpec(
            "ddim+pc",
            sample_ddim,
            "DDIM predictor + 1 Langevin corrector step (snr 0.16)",
            True,
            True,
            2,
            1,
            {"corrector_steps": 1},
        ),
        SamplerSpec(
            "euler+pc",
            sample_euler,
            "Euler ODE predictor + 1 Langevin corrector step (snr 0.16)",
            False,
            True,
            2,
            1,
            {"corrector_steps": 1},
        ),
    ]
}


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name`` (see :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(
    name: str, model: Any, schedule: NoiseSchedule, shape: tuple[int, ...], *, steps: int, **kwargs: Any
) -> torch.Tensor:
    """Run the registered sampler ``name`` with ``steps`` steps; keyword options go to its function.
    ``shape`` is one batch's (B, ...); returns x_0 of that shape on ``device``."""
    spec = get_sampler(name)
    limit = spec.max_steps(schedule.num_timesteps)
    if steps < 1 or (limit is not None and steps > limit):
        bound = f"between 1 and T={limit}" if limit is not None else ">= 1"
        raise ConfigError(f"{name} needs steps {bound}, got {steps}")
    return spec(model, schedule, shape, steps=steps, **kwargs)
