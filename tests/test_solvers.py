"""The model wrapper and the fast samplers: conversions, parity with diffusers' DPMSolverMultistepScheduler
and DDIMScheduler step by step (to 1e-5), closed forms on Gaussian data, convergence orders, the corrector."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from difflab.diffusion.gaussian import GaussianData
from difflab.diffusion.schedule import NoiseSchedule, linear_betas
from difflab.errors import ConfigError
from difflab.sampling.common import timestep_list
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.ddpm import ddpm_sample
from difflab.sampling.solvers import (
    SAMPLERS,
    ancestral_step,
    dpm_solver_timesteps,
    get_sampler,
    karras_sigmas,
    langevin_correct,
    ode_ancestral_etas,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_3m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_ode_ancestral,
)
from difflab.sampling.wrappers import (
    DiffusionModel,
    as_diffusion_model,
    eps_to_score,
    eps_to_v,
    eps_to_x0,
    score_to_eps,
    v_to_eps,
    x0_to_eps,
)
from test_samplers import float64_oracle


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are small: one thread is faster, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MEAN, STD = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5


def gaussian_eps(schedule: NoiseSchedule, mean: torch.Tensor = MEAN, std: float = STD):
    """The exact eps of data N(mean, std^2 I) at integer or fractional timesteps (the wrapper's continuous
    alpha_bar between steps): eps = sqrt(1 - a) (x - sqrt(a) m) / (a s^2 + 1 - a)."""
    continuous = DiffusionModel(None, schedule)
    data = GaussianData.isotropic(mean, std)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            alpha_bar = continuous.alpha_bar_at(t)
        else:
            alpha_bar = schedule.alpha_bar.double()[t]
        return data.eps(x, alpha_bar)

    return eps


def exact_flow(x_T: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The probability-flow ODE solved exactly for Gaussian data: in the VE variable x - m scales with
    sqrt(s^2 + sigma^2). x_T is the VP state at sigma_start; returns the VE state at sigma_end."""
    x_ve = x_T.double() * math.sqrt(1 + sigma_start**2)
    return MEAN + (x_ve - MEAN) * math.sqrt(STD**2 + sigma_end**2) / math.sqrt(STD**2 + sigma_start**2)


# ------------------------------------------------------------------------------------------------------
# The wrapper
# ------------------------------------------------------------------------------------------------------
def test_parameterisation_identities() -> None:
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=generator, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    alpha_bar = torch.rand(64, 1, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0  # Salimans & Ho's definition
    torch.testing.assert_close(eps_to_x0(x_t, eps, alpha_bar), x0)
    torch.testing.assert_close(x0_to_eps(x_t, x0, alpha_bar), eps)
    torch.testing.assert_close(eps_to_v(x_t, eps, alpha_bar), v)
    torch.testing.assert_close(v_to_eps(x_t, v, alpha_bar), eps)
    torch.testing.assert_close(eps_to_score(eps, alpha_bar), -eps / (1 - alpha_bar).sqrt())
    torch.testing.assert_close(score_to_eps(eps_to_score(eps, alpha_bar), alpha_bar), eps)


def test_every_parameterisation_gives_the_same_predictions() -> None:
    """An eps network re-expressed as an x0, v and score network predicts the same eps, x0, v and score."""
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    eps_fn = gaussian_eps(schedule)
    reference = DiffusionModel(eps_fn, schedule, "eps")

    def as_target(kind: str):
        return lambda x, t: getattr(reference, kind)(x, t)

    x = torch.randn(32, 2, dtype=torch.float64)
    for t in (torch.full((32,), 37), torch.full((32,), 12.25, dtype=torch.float64)):
        expected = {k: getattr(reference, k)(x, t) for k in ("eps", "x0", "v", "score")}
        for kind in ("x0", "v", "score"):
            wrapped = DiffusionModel(as_target(kind), schedule, kind)
            for target, value in expected.items():
                torch.testing.assert_close(getattr(wrapped, target)(x, t), value, msg=f"{kind} -> {target}")
    # the score of the Gaussian's exact eps is the analytic score of the noised Gaussian
    a = schedule.alpha_bar.double()[37]
    analytic = -(x - a.sqrt() * MEAN) / (a * STD**2 + 1 - a)
    torch.testing.assert_close(reference.score(x, torch.full((32,), 37)), analytic)


def test_sigma_view_interpolates_log_sigma_and_counts_evaluations() -> None:
    schedule = NoiseSchedule.linear(200, 1e-3, 0.05)
    model = DiffusionModel(lambda x, t: torch.zeros_like(x), schedule)
    alpha_bar = torch.cumprod(1 - linear_betas(200, 1e-3, 0.05), 0)  # float64 throughout
    # sigma_t = sqrt((1 - a) / a), accurate even at t = 0 where the stored float32 alpha_bar is not
    torch.testing.assert_close(model.sigmas, ((1 - alpha_bar) / alpha_bar).sqrt(), rtol=1e-6, atol=0)
    steps = torch.arange(200, dtype=torch.float64)
    torch.testing.assert_close(model.t_to_sigma(steps), model.sigmas)
    torch.testing.assert_close(model.alpha_bar_at(steps), alpha_bar, rtol=1e-6, atol=0)
    fractional = torch.tensor([0.0, 0.3, 17.5, 123.9, 199.0], dtype=torch.float64)
    torch.testing.assert_close(model.sigma_to_t(model.t_to_sigma(fractional)), fractional)
    midpoint = model.t_to_sigma(17.5)
    torch.testing.assert_close(midpoint, (model.sigmas[17] * model.sigmas[18]).sqrt())  # geometric mean
    assert float(model.sigma_to_t(1e-9)) == 0 and float(model.sigma_to_t(1e9)) == 199
    # D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2)): with eps = 0 the denoiser is the identity
    x = torch.randn(8, 2)
    torch.testing.assert_close(model.denoise(x, 3.0), x)
    assert model.nfe == 1
    rounded = DiffusionModel(lambda x, t: x * 0 + t[:, None], schedule, round_timesteps=True)
    assert rounded.eps(x, torch.full((8,), 17.6, dtype=torch.float64))[0, 0] == 18


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_registry_counts_network_evaluations(name: str) -> None:
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    model = DiffusionModel(gaussian_eps(schedule), schedule)
    spec = get_sampler(name)
    for steps in (1, 4, 10):
        model.reset_nfe()
        x = sample(name, model, schedule, (16, 2), steps=steps, generator=torch.Generator().manual_seed(0))
        assert x.shape == (16, 2) and torch.isfinite(x).all()
        assert model.nfe == spec.nfe(steps), (name, steps)
        assert spec.steps_for_nfe(spec.nfe(steps), 100) == steps
    if spec.discrete:
        assert spec.steps_for_nfe(10_000, 100) is None
        with pytest.raises(ConfigError, match="steps"):
            sample(name, model, schedule, (4, 2), steps=101)


def test_registry_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown sampler"):
        get_sampler("dpm-4s")


# ------------------------------------------------------------------------------------------------------
# Parity with diffusers
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_timesteps_match_diffusers(spacing: str) -> None:
    for num_timesteps in (100, 1000):
        for steps in [1, 2, 3, 7, 10, 14, 15, 20, 25, 27, 30, 48, 50, 99]:
            oracle = DPMSolverMultistepScheduler(num_timesteps, timestep_spacing=spacing)
            oracle.set_timesteps(steps)
            assert dpm_solver_timesteps(num_timesteps, steps, spacing) == oracle.timesteps.tolist()


@pytest.mark.parametrize("spacing, flag", [("karras", "use_karras_sigmas"), ("logsnr", "use_lu_lambdas")])
def test_dpm_ladder_timesteps_match_diffusers(spacing: str, flag: str) -> None:
    """Karras and uniform-lambda ladders rounded to timesteps as diffusers rounds them (on SD's scaled-linear
    betas, whose sigma_max 14.6 is below the ladders' cap of 80), repeated entries dropped."""
    for steps in [*range(1, 60), 100, 200, 500]:
        oracle = DPMSolverMultistepScheduler(1000, beta_schedule="scaled_linear", **{flag: True})
        oracle.set_timesteps(steps)
        alpha_bar = oracle.alphas_cumprod.double()  # diffusers' float32 table: the same rounding ties
        log_sigmas = 0.5 * (torch.log1p(-alpha_bar) - torch.log(alpha_bar))
        expected = sorted(set(oracle.timesteps.tolist()), reverse=True)
        assert dpm_solver_timesteps(1000, steps, spacing, log_sigmas) == expected, steps


def test_dpm_ladders_cap_sigma_max_and_start_at_pure_noise() -> None:
    """On the cosine schedule (sigma reaches 2e4 at t = T-1) the ladders start from T-1 and then follow a ladder
    from sigma = 40 (``ladder_sigma_max``) down. Below t = 100 uniform lambda puts more of its steps than Karras
    (rho = 7 is between uniform sigma and uniform log sigma), which puts more than uniform t."""
    schedule = NoiseSchedule.cosine(1000)
    log_sigma = schedule.precise_log_sigmas()
    karras = dpm_solver_timesteps(1000, 10, "karras", log_sigma)
    logsnr = dpm_solver_timesteps(1000, 10, "logsnr", log_sigma)
    for ladder in (karras, logsnr):
        assert len(ladder) == 10 and ladder[0] == 999 and ladder[-1] == 0
        assert math.exp(float(log_sigma[ladder[1]])) < 40
    trailing = dpm_solver_timesteps(1000, 10, "trailing")
    low = [sum(t < 100 for t in ladder) for ladder in (logsnr, karras, trailing)]
    assert low[0] > low[1] > low[2], low
    higher = dpm_solver_timesteps(1000, 10, "karras", log_sigma, ladder_sigma_max=80.0)
    assert higher[1] > karras[1] and math.exp(float(log_sigma[higher[1]])) < 80
    with pytest.raises(ConfigError, match="log sigmas"):
        dpm_solver_timesteps(1000, 10, "karras")
    with pytest.raises(ConfigError, match="ladder_sigma_max"):
        dpm_solver_timesteps(1000, 10, "logsnr", log_sigma, ladder_sigma_max=0.001)


def test_ddim_timesteps_match_diffusers_for_every_step_count() -> None:
    """Rounding ties (e.g. 499.5) and float steps of arange must come out as diffusers computes them, for the
    samplers' lists and for the respaced DDPM's (``respaced``), which must visit the same timesteps."""
    from difflab.diffusion.respacing import kept_timesteps

    for spacing in ("linspace", "trailing", "leading"):
        oracle = DDIMScheduler(500, timestep_spacing=spacing)
        for steps in range(1, 501):
            oracle.set_timesteps(steps)
            expected = oracle.timesteps.tolist()
            assert timestep_list(500, steps, spacing) == expected, (spacing, steps)
            assert kept_timesteps(500, steps, spacing) == sorted(set(expected)), (spacing, steps)


class QueuedOutputs:
    """A stand-in network that returns pre-drawn random outputs, one per call, whatever its input."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = iter(outputs)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return next(self.outputs)


def dpm_oracle(
    steps: int, spacing: str, final: str, prediction: str, algorithm: str = "dpmsolver++", order: int = 2
) -> DPMSolverMultistepScheduler:
    oracle = float64_oracle(
        DPMSolverMultistepScheduler(
            1000,
            algorithm_type=algorithm,
            solver_order=order,
            lower_order_final=True,
            timestep_spacing=spacing,
            final_sigmas_type=final,
            prediction_type=prediction,
        )
    )
    oracle.set_timesteps(steps)
    # the oracle's sigmas are float32; recompute them in float64 from its float64 alphas_cumprod
    alpha_bar = oracle.alphas_cumprod
    sigmas = ((1 - alpha_bar[oracle.timesteps]) / alpha_bar[oracle.timesteps]).sqrt()
    last = torch.zeros(1, dtype=torch.float64) if final == "zero" else ((1 - alpha_bar[0]) / alpha_bar[0]).sqrt()[None]
    oracle.sigmas = torch.cat([sigmas, last])
    return oracle


def dpmpp_2m_path(outputs: list[torch.Tensor], x_T: torch.Tensor, order: int = 2, **options) -> list[torch.Tensor]:
    """Every x the sampler visits on the queued x0-predictions, then its output."""
    visited: list[torch.Tensor] = []
    model = DiffusionModel(QueuedOutputs(outputs), NoiseSchedule.linear(1000), "x0")
    out = (sample_dpmpp_2m if order == 2 else sample_dpmpp_3m)(
        model, NoiseSchedule.linear(1000), x_T.shape, x_T=x_T, callback=lambda k, t, x, x0: visited.append(x), **options
    )
    assert model.nfe == len(outputs)
    return visited + [out]


@pytest.mark.parametrize("sde", [False, True])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20])
def test_dpmpp_2m_matches_diffusers_step_by_step(spacing: str, steps: int, final: str, sde: bool) -> None:
    """Random x0-predictions at every step: each intermediate x and the output agree to 1e-5. The SDE form
    against diffusers' ``sde-dpmsolver++`` (midpoint) fed the same noise, drawn at every step but a final jump
    to 0."""
    oracle = dpm_oracle(steps, spacing, final, "sample", "sde-dpmsolver++" if sde else "dpmsolver++")
    generator = torch.Generator().manual_seed(steps)
    outputs = [torch.randn(8, 3, generator=generator) for _ in oracle.timesteps]
    x_T = torch.randn(8, 3, generator=generator)
    drawn = torch.Generator().manual_seed(7)
    noises = [torch.randn(8, 3, generator=drawn) for _ in range(len(oracle.timesteps) - (final == "zero"))]
    noises.append(torch.zeros(8, 3))
    expected, x = [], x_T.double()
    for k, t in enumerate(oracle.timesteps):
        expected.append(x)
        x = oracle.step(outputs[k].double(), t, x, variance_noise=noises[k].double() if sde else None).prev_sample
    expected.append(x)
    options = {"steps": steps, "spacing": spacing, "final_sigma": final}
    ours = dpmpp_2m_path(outputs, x_T, sde=sde, generator=torch.Generator().manual_seed(7), **options)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if sde:  # the noise changes the path (one jump to 0 is the ODE's first-order step and draws nothing)
        ode = dpmpp_2m_path(outputs, x_T, **options)
        assert (steps == 1 and final == "zero") is torch.allclose(torch.stack(ode[1:]), torch.stack(ours[1:]))


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 14, 15, 20])
def test_dpmpp_3m_matches_diffusers_step_by_step(spacing: str, steps: int, final: str) -> None:
    """DPM-Solver++(3M) against diffusers' ``solver_order=3`` on random x0-predictions, 1e-5 at every step
    (its warm-up at orders 1 and 2, lower orders on the last two steps below 15 steps)."""
    oracle = dpm_oracle(steps, spacing, final, "sample", order=3)
    generator = torch.Generator().manual_seed(100 + steps)
    outputs = [torch.randn(8, 3, generator=generator) for _ in oracle.timesteps]
    x_T = torch.randn(8, 3, generator=generator)
    expected, x = [], x_T.double()
    for k, t in enumerate(oracle.timesteps):
        expected.append(x)
        x = oracle.step(outputs[k].double(), t, x).prev_sample
    expected.append(x)
    ours = dpmpp_2m_path(outputs, x_T, order=3, steps=steps, spacing=spacing, final_sigma=final)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if steps >= 10:  # third-order steps change the path
        second = dpmpp_2m_path(outputs, x_T, steps=steps, spacing=spacing, final_sigma=final)
        assert not torch.allclose(torch.stack(second[3:-1]), torch.stack(ours[3:-1]))


def test_sde_dpmpp_3m_is_the_ode_at_eta_0_and_keeps_gaussian_marginals() -> None:
    """SDE-DPM-Solver++(3M): eta = 0 is the 3M ODE; with the exact eps of Gaussian data the samples have the
    data's mean and std. Its third-order data term is the ODE's with h -> (1 + eta) h, as k-diffusion's
    ``dpmpp_3m_sde`` has it; diffusers 0.42's ``sde-dpmsolver++`` at order 3 has -1/2 where the ODE's D2 coefficient
    ``(1 - e^{-H} - H) / H^2 + 1/2`` has +1/2."""
    outputs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(k)) for k in range(10)]
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(11))
    ode = dpmpp_2m_path(outputs, x_T, order=3, steps=10)
    zero = dpmpp_2m_path(outputs, x_T, order=3, steps=10, sde=True, eta=0.0, generator=torch.Generator().manual_seed(3))
    for a, b in zip(zero, ode, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # against diffusers fed the same noise: equal through the warm-up (orders 1, 2); at the first third-order step
    # the two differ by exactly alpha_next * D2, the 1/2 - (-1/2) of that coefficient
    oracle = dpm_oracle(10, "trailing", "zero", "sample", "sde-dpmsolver++", order=3)
    drawn = torch.Generator().manual_seed(7)
    noises = [torch.randn(8, 3, generator=drawn).double() for _ in range(3)]
    expected, x = [], x_T.double()
    for k in range(3):
        expected.append(x)
        x = oracle.step(outputs[k].double(), oracle.timesteps[k], x, variance_noise=noises[k]).prev_sample
    expected.append(x)
    sde = dpmpp_2m_path(outputs, x_T, order=3, steps=10, sde=True, generator=torch.Generator().manual_seed(7))
    for got, want in zip(sde[:3], expected[:3], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    alpha_bar, one_minus = NoiseSchedule.linear(1000).precise_alpha_bar()
    lam = [0.5 * math.log(alpha_bar[t] / one_minus[t]) for t in oracle.timesteps[:4].tolist()]
    r0, r1 = (lam[2] - lam[1]) / (lam[3] - lam[2]), (lam[1] - lam[0]) / (lam[3] - lam[2])
    m0, m1, m2 = (outputs[k].double() for k in (2, 1, 0))
    d2 = ((m0 - m1) / r0 - (m1 - m2) / r1) / (r0 + r1)
    torch.testing.assert_close(
        sde[3].double(), expected[3] + alpha_bar[oracle.timesteps[3]].sqrt() * d2, rtol=1e-5, atol=1e-5
    )
    schedule = NoiseSchedule.cosine(1000)
    big_T = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("dpmpp-3m", "dpmpp-3m-sde"):
        generator = torch.Generator().manual_seed(1)
        x = sample(name, gaussian_eps(schedule), schedule, (20_000, 2), steps=50, x_T=big_T, generator=generator)
        torch.testing.assert_close(x.mean(0), MEAN, atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "name, options",
    [
        ("dpmpp-2m", {}),
        ("dpmpp-2m-sde", {"sde": True}),
        ("dpmpp-2m-ode-sde", {"sde": True, "sde_switch": 0.8}),
        ("dpmpp-2m-sde-karras", {"sde": True, "spacing": "karras"}),
        ("dpmpp-2m-ode-sde-karras", {"sde": True, "sde_switch": 0.8, "spacing": "karras"}),
        ("dpmpp-3m", {"order": 3}),
        ("dpmpp-3m-sde", {"order": 3, "sde": True}),
    ],
)
def test_registry_dpmpp_names_are_their_options(name: str, options: dict) -> None:
    """Each DPM-Solver++ name visits the states of ``sample_dpmpp_2m`` with its options (trailing by default)."""
    outputs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(k)) for k in range(10)]
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(11))
    schedule = NoiseSchedule.linear(1000)
    visited: list[torch.Tensor] = []
    sample(
        name,
        DiffusionModel(QueuedOutputs(outputs), schedule, "x0"),
        schedule,
        (8, 3),
        steps=10,
        x_T=x_T,
        generator=torch.Generator().manual_seed(3),
        callback=lambda k, t, x, x0: visited.append(x),
    )
    direct = dpmpp_2m_path(outputs, x_T, steps=10, generator=torch.Generator().manual_seed(3), **options)
    assert all(torch.equal(a, b) for a, b in zip(visited, direct, strict=False)) and len(visited) == len(direct) - 1
    others = dpmpp_2m_path(outputs, x_T, steps=10, generator=torch.Generator().manual_seed(3))
    assert (name == "dpmpp-2m") is all(torch.equal(a, b) for a, b in zip(visited, others, strict=False))


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_dpmpp_2m_eps_model_loop_matches_diffusers(fixed_eps, spacing: str) -> None:
    schedule = NoiseSchedule.cosine(1000)
    oracle = float64_oracle(
        DPMSolverMultistepScheduler(
            1000, beta_schedule="squaredcos_cap_v2", algorithm_type="dpmsolver++", timestep_spacing=spacing
        )
    )
    oracle.set_timesteps(25)
    alpha_bar = oracle.alphas_cumprod[oracle.timesteps]
    oracle.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x_T = torch.randn((8, 2), generator=torch.Generator().manual_seed(5))
    x = x_T.double()
    with torch.no_grad():
        for t in oracle.timesteps:
            x = oracle.step(fixed_eps(x.float(), torch.full((8,), int(t))).double(), t, x).prev_sample
    ours = sample_dpmpp_2m(fixed_eps, schedule, (8, 2), steps=25, spacing=spacing, x_T=x_T)
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 8, 20, 50])
def test_ddim_matches_diffusers_step_by_step(spacing: str, steps: int) -> None:
    """Random x0-predictions at every step. diffusers' DDIM takes the previous timestep as t - T // steps,
    which is the next listed one for these spacings when steps divides T (difflab reads it from the list)."""
    oracle = float64_oracle(
        DDIMScheduler(
            1000, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing, prediction_type="sample"
        )
    )
    oracle.set_timesteps(steps)
    generator = torch.Generator().manual_seed(steps)
    outputs = [torch.randn(8, 3, generator=generator) for _ in oracle.timesteps]
    x_T = torch.randn(8, 3, generator=generator)
    expected, x = [], x_T.double()
    for k, t in enumerate(oracle.timesteps.tolist()):
        expected.append(x)
        x = oracle.step(outputs[k].double(), t, x).prev_sample
    expected.append(x)
    schedule = NoiseSchedule.linear(1000)
    model = DiffusionModel(QueuedOutputs(outputs), schedule, "x0")
    visited: list[torch.Tensor] = []
    ours = sample_ddim(
        model,
        schedule,
        (8, 3),
        steps=steps,
        spacing=spacing,
        x_T=x_T,
        callback=lambda k, t, x_t, x0: visited.append(x_t),
    )
    for got, want in zip(visited + [ours], expected, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def sigma_space_oracle(name: str, levels: torch.Tensor):
    """diffusers' Euler / Heun / Euler-ancestral scheduler on difflab's noise levels (float64; Heun's list
    interleaved as diffusers lays it out: every level but the first and the final 0 twice)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

    kind = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler, "euler-a": EulerAncestralDiscreteScheduler}
    # diffusers' Euler ancestral takes no x0-predictions: it is fed the same random outputs as eps-predictions
    oracle = kind[name](1000, prediction_type="epsilon" if name == "euler-a" else "sample")
    oracle.set_timesteps(len(levels) - 1)
    if name == "heun":
        levels = torch.cat([levels[:1], levels[1:-1].repeat_interleave(2), levels[-1:]])
    assert len(oracle.sigmas) == len(levels)
    oracle.sigmas = levels.double()
    return oracle


@pytest.mark.parametrize("steps", [1, 2, 5, 18])
@pytest.mark.parametrize("name", ["euler", "heun", "euler-a"])
def test_sigma_space_samplers_match_diffusers_step_by_step(monkeypatch, name: str, steps: int) -> None:
    """Random network outputs at every call, on a Karras ladder: each output agrees with diffusers'
    EulerDiscreteScheduler, HeunDiscreteScheduler (x0-predictions; EDM Algorithm 1: 2 steps - 1 calls, Euler on
    the last step) and EulerAncestralDiscreteScheduler (eps-predictions, eta = 1, fed the noise difflab draws)."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as ancestral_module

    from test_samplers import NoiseQueue

    levels = karras_sigmas(0.03, 80.0, steps)
    oracle = sigma_space_oracle(name, levels)
    generator = torch.Generator().manual_seed(steps)
    outputs = [torch.randn(8, 3, generator=generator, dtype=torch.float64) for _ in oracle.timesteps]
    x_T = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    monkeypatch.setattr(ancestral_module, "randn_tensor", NoiseQueue(torch.Generator().manual_seed(5)))
    expected, x = [], x_T * math.sqrt(1 + float(levels[0]) ** 2)
    for k, t in enumerate(oracle.timesteps):
        if name != "heun" or oracle.state_in_first_order:  # the state at the start of each level's step, in VP
            expected.append(x / math.sqrt(1 + float(levels[len(expected)]) ** 2))
        x = oracle.step(outputs[k], t, x).prev_sample.double()
    sampler = {"euler": sample_euler, "heun": sample_heun, "euler-a": sample_euler_ancestral}[name]
    model = DiffusionModel(QueuedOutputs(outputs), NoiseSchedule.linear(1000), "eps" if name == "euler-a" else "x0")
    visited: list[torch.Tensor] = []
    ours = sampler(
        model,
        NoiseSchedule.linear(1000),
        (8, 3),
        sigmas=levels,
        x_T=x_T,
        generator=torch.Generator().manual_seed(5),
        callback=lambda i, sigma, x_vp, x0: visited.append(x_vp),
    )
    assert model.nfe == len(outputs) == (2 * steps - 1 if name == "heun" else steps)
    # the last step lands on sigma = 0, i.e. on that call's x0-prediction: the path before it is what differs
    for got, want in zip([*visited, ours], [*expected, x], strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [5, 25])
@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
@pytest.mark.parametrize("ladder", ["karras", "uniform"])
def test_sigma_space_samplers_match_diffusers_end_to_end(
    fixed_eps, ladder: str, kind: str, name: str, steps: int
) -> None:
    """The whole sampler, with its own Karras or uniform-in-t ladder, VP <-> VE conversion and sigma -> fractional-t
    mapping, against diffusers' Euler / Heun DiscreteScheduler (``use_karras_sigmas=True``, or its ``linspace``
    timesteps with sigma interpolated in t) driven as a diffusers pipeline drives it (``scale_model_input``, the
    network called at the scheduler's fractional timestep) on the same eps network."""
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    from difflab.diffusion.schedule import ScheduleConfig

    config = ScheduleConfig(kind, 1000, *((0.00085, 0.012) if kind == "scaled_linear" else (1e-4, 0.02)))
    schedule = NoiseSchedule.from_config(config)
    scheduler = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}[name]
    oracle = float64_oracle(
        scheduler(
            1000,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=kind,
            timestep_spacing="linspace",
            use_karras_sigmas=ladder == "karras",
        )
    )
    oracle.set_timesteps(steps)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(steps))
    x = x_T.double() * math.sqrt(1 + float(oracle.sigmas[0]) ** 2)
    with torch.no_grad():
        for t in oracle.timesteps:
            eps = fixed_eps(oracle.scale_model_input(x, t).float(), t.reshape(1).expand(8).double()).double()
            x = oracle.step(eps, t, x).prev_sample.double()
        sampler = {"euler": sample_euler, "heun": sample_heun}[name]
        ours = sampler(fixed_eps, schedule, (8, 2), steps=steps, x_T=x_T, sigmas=ladder)
    # measured <= 4e-7 (Karras) and <= 1.3e-6 (uniform) of the largest value
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))


def test_dpmpp_first_order_is_ddim() -> None:
    """With one step DPM-Solver++ is DDIM; both land on x0_pred."""
    schedule = NoiseSchedule.linear(200, 1e-3, 0.05)
    eps = gaussian_eps(schedule)
    x_T = torch.randn(64, 2, dtype=torch.float64)
    torch.testing.assert_close(
        sample_dpmpp_2m(eps, schedule, (64, 2), steps=1, x_T=x_T), sample_ddim(eps, schedule, (64, 2), steps=1, x_T=x_T)
    )


def test_respaced_ddpm_with_all_steps_is_ddpm(fixed_eps) -> None:
    schedule = NoiseSchedule.linear(60, 1e-3, 0.3)
    for variance in ("beta", "posterior"):
        reference = ddpm_sample(
            fixed_eps, schedule, (16, 2), generator=torch.Generator().manual_seed(4), variance=variance
        )
        ours = sample_ddpm(fixed_eps, schedule, (16, 2), generator=torch.Generator().manual_seed(4), variance=variance)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Closed forms on Gaussian data
# ------------------------------------------------------------------------------------------------------
def test_heun_and_dpmpp_reproduce_gaussian_data() -> None:
    """Heun (50 noise levels, 99 NFE) and DPM-Solver++(2M) (20 NFE) with the exact eps: per-sample close to
    the exact ODE solution and with the data's mean and std."""
    x_T = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    linear = NoiseSchedule.linear(1000)
    heun = sample_heun(gaussian_eps(linear), linear, (20_000, 2), steps=50, x_T=x_T)
    cosine = NoiseSchedule.cosine(1000)
    dpm = sample_dpmpp_2m(gaussian_eps(cosine), cosine, (20_000, 2), steps=20, x_T=x_T)
    for schedule, x, tolerance in ((linear, heun, 0.02), (cosine, dpm, 0.01)):
        exact = exact_flow(x_T, DiffusionModel(None, schedule).sigma_max, 0.0)
        assert (x - exact).abs().max() < tolerance
        torch.testing.assert_close(x.std(0), exact.std(0), atol=0.005, rtol=0)  # the solver's own error
        # and the data's moments, up to 4 standard errors of 20,000 samples
        torch.testing.assert_close(x.mean(0), MEAN, atol=0.02, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.01, rtol=0)
    # The last jump to sigma = 0 returns the posterior mean D(x; sigma_last), which shrinks a Gaussian by
    # s^2 / (s^2 + sigma_last^2) instead of the ODE's s / sqrt(s^2 + sigma_last^2): 20 trailing steps of the
    # linear schedule end at sigma = 0.17 (4% too small a std); 40 end at 0.09 (1%).
    coarse = sample_dpmpp_2m(gaussian_eps(linear), linear, (20_000, 2), steps=40, x_T=x_T)
    torch.testing.assert_close(coarse.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.01, rtol=0)


def test_dpmpp_2m_sde_switch_keeps_the_ode_at_high_noise() -> None:
    """``sde_switch``: ODE updates from t > switch * T, SDE updates below; 0 is the ODE, 1 the SDE."""
    outputs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(k)) for k in range(10)]
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(11))
    timesteps = dpm_solver_timesteps(1000, 10, "trailing")
    ode = dpmpp_2m_path(outputs, x_T, steps=10)
    sde = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, generator=torch.Generator().manual_seed(3))
    hybrid = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, sde_switch=0.8, generator=torch.Generator().manual_seed(3))
    ode_steps = sum(t > 800 for t in timesteps)
    assert ode_steps == 2
    for k in range(ode_steps + 1):  # x_T and the states the ODE steps reach
        assert torch.equal(hybrid[k], ode[k])
    assert not torch.allclose(hybrid[ode_steps + 1], ode[ode_steps + 1])
    assert not torch.allclose(hybrid[ode_steps + 1], sde[ode_steps + 1])
    never = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, sde_switch=0.0, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(never, ode, strict=True))
    always = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, sde_switch=1.0, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(always, sde, strict=True))
    with pytest.raises(ConfigError, match="sde_switch"):
        sample_dpmpp_2m(QueuedOutputs(outputs), NoiseSchedule.linear(1000), (8, 3), sde=True, sde_switch=1.5)


def test_sde_dpmpp_2m_reproduces_gaussian_data() -> None:
    """SDE-DPM-Solver++(2M) and its ODE-then-SDE form with the exact eps of Gaussian data: the data's mean and
    std (4 standard errors of 20,000 samples plus the solver's error); unlike the ODE, x_T's samples are not
    mapped one to one."""
    schedule = NoiseSchedule.cosine(1000)
    x_T = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ode = sample_dpmpp_2m(gaussian_eps(schedule), schedule, (20_000, 2), steps=50, x_T=x_T)
    for name in ("dpmpp-2m-sde", "dpmpp-2m-ode-sde"):
        generator = torch.Generator().manual_seed(1)
        x = sample(name, gaussian_eps(schedule), schedule, (20_000, 2), steps=50, x_T=x_T, generator=generator)
        torch.testing.assert_close(x.mean(0), MEAN, atol=0.03, rtol=0)
        torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.02, rtol=0)
        assert (x - ode).abs().mean() > 0.1, name


def test_sde_dpmpp_2m_eta_interpolates_between_the_ode_and_the_sde() -> None:
    """``eta`` scales the SDE's noise: 0 is the ODE's path exactly, 1 the default SDE; every eta keeps an exact
    model's marginals (Gaussian data: mean and std of 20,000 samples)."""
    outputs = [torch.randn(8, 3, generator=torch.Generator().manual_seed(k)) for k in range(10)]
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(11))
    ode = dpmpp_2m_path(outputs, x_T, steps=10)
    zero = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, eta=0.0, generator=torch.Generator().manual_seed(3))
    for a, b in zip(zero, ode, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    full = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, eta=1.0, generator=torch.Generator().manual_seed(3))
    sde = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(full, sde, strict=True))
    half = dpmpp_2m_path(outputs, x_T, steps=10, sde=True, eta=0.5, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(half[-2], ode[-2]) and not torch.allclose(half[-2], sde[-2])  # (the last is x0_pred)
    schedule = NoiseSchedule.cosine(1000)
    big_T = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_dpmpp_2m(
        gaussian_eps(schedule),
        schedule,
        (20_000, 2),
        steps=50,
        sde=True,
        eta=0.5,
        x_T=big_T,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.02, rtol=0)
    for bad in (-0.1, math.nan, math.inf):
        with pytest.raises(ConfigError, match="eta"):
            sample_dpmpp_2m(QueuedOutputs(outputs), NoiseSchedule.linear(1000), (8, 3), sde=True, eta=bad)


def test_heun_is_second_order_and_euler_first_order() -> None:
    """On a Karras ladder from sigma_max down to 10 sigma_min, doubling the steps divides Heun's error by ~4
    and Euler's by ~2 (errors against the exact Gaussian flow)."""
    schedule = NoiseSchedule.linear(500)
    model = DiffusionModel(gaussian_eps(schedule), schedule)
    x_T = torch.randn(500, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sampler, low, high in ((sample_heun, 3.5, 5.5), (sample_euler, 1.8, 2.2)):
        errors = []
        for steps in (16, 32, 64):
            sigmas = karras_sigmas(10 * model.sigma_min, model.sigma_max, steps)[:-1]
            x = sampler(model, schedule, (500, 2), steps=steps, sigmas=sigmas, x_T=x_T)
            errors.append(float((x - exact_flow(x_T, model.sigma_max, float(sigmas[-1]))).abs().max()))
        ratios = [errors[0] / errors[1], errors[1] / errors[2]]
        assert all(low < r < high for r in ratios), (sampler.__name__, errors, ratios)


def test_uniform_sigmas_and_euler_ancestral_on_gaussian_data() -> None:
    schedule = NoiseSchedule.linear(1000)
    eps = gaussian_eps(schedule)
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(20_000, 2, generator=generator, dtype=torch.float64)
    heun = sample_heun(eps, schedule, (20_000, 2), steps=100, sigmas="uniform", x_T=x_T)
    assert (heun - exact_flow(x_T, DiffusionModel(None, schedule).sigma_max, 0.0)).abs().max() < 0.02
    ancestral = sample_euler_ancestral(eps, schedule, (20_000, 2), steps=200, generator=generator, x_T=x_T)
    torch.testing.assert_close(ancestral.mean(0), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(ancestral.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.02, rtol=0)
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert math.isclose(down**2 + up**2, 1.0) and math.isclose(up, math.sqrt(0.75))


def test_heun_churn_stays_on_the_distribution() -> None:
    schedule = NoiseSchedule.linear(1000)
    generator = torch.Generator().manual_seed(6)
    x = sample_heun(
        gaussian_eps(schedule),
        schedule,
        (20_000, 2),
        steps=60,
        churn=20.0,
        s_tmin=0.05,
        s_tmax=50.0,
        generator=generator,
    )
    torch.testing.assert_close(x.mean(0).double(), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0).double(), torch.full((2,), STD, dtype=torch.float64), atol=0.02, rtol=0)


def test_heun_churn_is_noise_then_the_deterministic_step_from_the_raised_level(fixed_eps) -> None:
    """EDM Algorithm 2, exactly: at a level inside [s_tmin, s_tmax] the churned sampler raises sigma to
    ``sigma_hat = sigma (1 + gamma)``, ``gamma = min(churn / N, sqrt(2) - 1)``, adds ``sqrt(sigma_hat^2 - sigma^2)
    s_noise z`` and takes the deterministic Heun step (diffusers-checked above) from sigma_hat; outside it, the plain
    step. Rebuilt here step by step from one-step Heun runs and the same draws of z."""
    schedule = NoiseSchedule.linear(1000)
    net = as_diffusion_model(fixed_eps, schedule)
    levels = karras_sigmas(net.sigma_min, net.sigma_max, 6)  # 6 steps: 7 levels, the last 0
    churn, s_noise = 1.8, 1.1  # gamma = min(1.8 / 6, sqrt(2) - 1) = 0.3
    s_tmin, s_tmax = float(levels[4]), float(levels[1])  # steps 1 to 4 churn; 0 (above) and 5 (below) do not
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(3))
    raised: list[float] = []
    with torch.no_grad():
        ours = sample_heun(
            fixed_eps,
            schedule,
            (16, 2),
            sigmas=levels,
            churn=churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
            s_noise=s_noise,
            generator=torch.Generator().manual_seed(9),
            x_T=x_T,
            callback=lambda i, sigma, x, denoised: raised.append(float(sigma)),
        )
        draws = torch.Generator().manual_seed(9)
        x = x_T * math.sqrt(1 + float(levels[0]) ** 2)  # the VE chain's start
        for i in range(6):
            sigma, sigma_next = float(levels[i]), float(levels[i + 1])
            sigma_hat = sigma * 1.3 if 1 <= i <= 4 else sigma
            assert raised[i] == pytest.approx(sigma_hat, rel=1e-12)
            if sigma_hat > sigma:
                x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * torch.randn(16, 2, generator=draws)
            one_step = torch.tensor([sigma_hat, sigma_next], dtype=torch.float64)
            x = sample_heun(fixed_eps, schedule, (16, 2), sigmas=one_step, x_T=x / math.sqrt(1 + sigma_hat**2))
    # float32 apart from the VE <-> VP rescaling at each rebuilt step's start
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    unchurned = sample_heun(fixed_eps, schedule, (16, 2), sigmas=levels, x_T=x_T)
    assert float((ours - unchurned).abs().mean()) > 0.01  # the churn did inject noise


def test_ode_then_ancestral_switches_eta_at_the_chosen_timestep(fixed_eps) -> None:
    """eta 0 while t > switch T, 1 below; switch 0 is DDIM, switch 1 DDIM with eta 1; the same samples as
    ``ddim_sample`` with that eta per step (what ``benchmarks/ode_gap.py`` runs)."""
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    timesteps = timestep_list(100, 10, "trailing")  # 99, 89, ..., 9
    etas = ode_ancestral_etas(timesteps, 100, 0.8)
    assert etas == [0.0, 0.0] + [1.0] * 8  # 99 and 89 lie above 80
    assert ode_ancestral_etas([999, 801, 800, 0], 1000) == [0.0, 0.0, 1.0, 1.0]
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))

    def run(function, **options) -> torch.Tensor:
        return function(fixed_eps, schedule, (32, 2), x_T=x_T, generator=torch.Generator().manual_seed(2), **options)

    hybrid = run(sample_ode_ancestral, steps=10)
    torch.testing.assert_close(hybrid, run(ddim_sample, timesteps=timesteps, eta=etas), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hybrid, run(sample_ddim, steps=10, eta=etas), rtol=0, atol=0)
    assert not torch.allclose(hybrid, run(sample_ddim, steps=10))  # the ancestral steps drew noise
    torch.testing.assert_close(run(sample_ode_ancestral, steps=10, switch=0.0), run(sample_ddim, steps=10))
    torch.testing.assert_close(run(sample_ode_ancestral, steps=10, switch=1.0), run(sample_ddim, steps=10, eta=1.0))
    # with the exact eps of Gaussian data both halves are exact samplers, so is their join
    linear = NoiseSchedule.linear(1000)
    x = sample_ode_ancestral(
        gaussian_eps(linear), linear, (20_000, 2), steps=250, generator=torch.Generator().manual_seed(5)
    ).double()
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match="switch"):
        sample_ode_ancestral(fixed_eps, schedule, (2, 2), steps=3, switch=1.5)
    with pytest.raises(ConfigError, match="eta values"):
        sample_ddim(fixed_eps, schedule, (2, 2), steps=3, eta=[0.0, 1.0])
    with pytest.raises(ConfigError, match="eta"):
        sample_ddim(fixed_eps, schedule, (2, 2), steps=3, eta=-0.5)


# ------------------------------------------------------------------------------------------------------
# Predictor-corrector
# ------------------------------------------------------------------------------------------------------
def test_langevin_corrector_pulls_samples_to_the_noisy_marginal() -> None:
    """With the score of a DDPM (eps) model, Langevin steps at level t move a badly scaled cloud to
    p_t = N(sqrt(a) m, (a s^2 + 1 - a) I) and then keep it there."""
    schedule = NoiseSchedule.linear(1000)
    model = DiffusionModel(gaussian_eps(schedule), schedule)
    t = 300
    a = float(schedule.alpha_bar[t])
    target_mean, target_std = math.sqrt(a) * MEAN, math.sqrt(a * STD**2 + 1 - a)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(20_000, 2, generator=generator, dtype=torch.float64) * 3 * target_std  # 3x too wide
    index = torch.full((20_000,), t)
    x = langevin_correct(
        x, lambda z: model.score(z, index), snr=0.16, n_steps=300, alpha=float(schedule.alphas[t]), generator=generator
    )
    assert model.nfe == 300
    torch.testing.assert_close(x.mean(0), target_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), target_std, dtype=torch.float64), atol=0.03, rtol=0)


@pytest.mark.parametrize("name", ["ddpm+pc", "ddim+pc", "euler+pc"])
def test_predictor_corrector_samplers_on_gaussian_data(name: str) -> None:
    schedule = NoiseSchedule.linear(1000)
    x = sample(
        name,
        gaussian_eps(schedule),
        schedule,
        (20_000, 2),
        steps=100,
        generator=torch.Generator().manual_seed(8),
        x_T=torch.randn(20_000, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64),
    )
    torch.testing.assert_close(x.mean(0), MEAN, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.03, rtol=0)


def test_bad_solver_arguments() -> None:
    schedule = NoiseSchedule.linear(10)
    eps = gaussian_eps(schedule)
    with pytest.raises(ConfigError, match="sigmas"):
        sample_heun(eps, schedule, (2, 2), steps=3, sigmas="cosine")
    with pytest.raises(ConfigError, match="decreasing"):
        sample_euler(eps, schedule, (2, 2), steps=3, sigmas=torch.tensor([1.0, 2.0]))
    with pytest.raises(ConfigError, match="final_sigma"):
        sample_dpmpp_2m(eps, schedule, (2, 2), steps=3, final_sigma="one")
    with pytest.raises(ConfigError, match="corrector"):
        sample_ddim(eps, schedule, (2, 2), steps=3, corrector_steps=1, snr=0)
    with pytest.raises(ConfigError, match="parameterization"):
        DiffusionModel(eps, schedule, "noise")
