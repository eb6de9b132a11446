"""DDPM and DDIM, step by step and whole loops, against diffusers' schedulers (to 1e-5)."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from difflab.diffusion.gaussian import GaussianData
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.memory import available_memory_bytes
from difflab.sampling.common import check_output_fits, timestep_list
from difflab.sampling.ddim import ddim_sample, ddim_step
from difflab.sampling.ddpm import ddpm_sample, ddpm_step

VARIANCE_NAMES = {"beta": "fixed_large", "posterior": "fixed_small"}


def float64_oracle(scheduler):
    """Make a diffusers scheduler compute in float64.

    In float32 its ``1 - alphas_cumprod`` loses ~1e-4 of relative precision at small t (cancellation),
    while difflab precomputes its coefficients in float64; comparing both to a float64 oracle tests the
    equations rather than the rounding.
    """
    betas = scheduler.betas.double()
    if scheduler.config.beta_schedule == "linear":
        betas = torch.linspace(
            scheduler.config.beta_start,
            scheduler.config.beta_end,
            scheduler.config.num_train_timesteps,
            dtype=torch.float64,
        )
    elif scheduler.config.beta_schedule == "squaredcos_cap_v2":
        from difflab.diffusion.schedule import cosine_betas

        betas = cosine_betas(scheduler.config.num_train_timesteps)
    scheduler.betas = betas
    scheduler.alphas = 1 - betas
    scheduler.alphas_cumprod = torch.cumprod(1 - betas, 0)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


class NoiseQueue:
    """Stands in for diffusers' ``randn_tensor`` so the oracle adds exactly the noise difflab draws."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.drawn: list[torch.Tensor] = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):  # noqa: ANN001
        noise = torch.randn(tuple(shape), generator=self.generator)
        self.drawn.append(noise)
        return noise.to(dtype or torch.float32)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("t", [0, 1, 37, 499])
def test_ddpm_step_matches_diffusers(monkeypatch, variance: str, t: int) -> None:
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    schedule = NoiseSchedule.linear(500)
    oracle = float64_oracle(DDPMScheduler(500, variance_type=VARIANCE_NAMES[variance], clip_sample=False))
    x_t, eps = torch.randn(16, 2), torch.randn(16, 2)
    monkeypatch.setattr(ddpm_module, "randn_tensor", NoiseQueue(torch.Generator().manual_seed(3)))
    expected = oracle.step(eps.double(), t, x_t.double()).prev_sample
    noise = torch.randn((16, 2), generator=torch.Generator().manual_seed(3)) if t > 0 else None
    ours, _ = ddpm_step(schedule, eps, t, x_t, noise, variance)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_ddpm_mean_equals_ho_et_al_form() -> None:
    """mu_tilde(x0_pred, x_t) == (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)."""
    schedule = NoiseSchedule.cosine(1000)
    x_t, eps = torch.randn(32, 2), torch.randn(32, 2)
    for t in (1, 300, 999):
        mean, _ = ddpm_step(schedule, eps, t, x_t, torch.zeros(32, 2))
        beta, alpha, alpha_bar = schedule.betas[t], schedule.alphas[t], schedule.alpha_bar[t]
        torch.testing.assert_close(
            mean, (x_t - beta / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt(), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_loop_matches_diffusers(monkeypatch, fixed_eps, variance: str) -> None:
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    schedule = NoiseSchedule.linear(200, 1e-3, 0.1)
    oracle = float64_oracle(DDPMScheduler(200, 1e-3, 0.1, variance_type=VARIANCE_NAMES[variance], clip_sample=False))
    generator = torch.Generator().manual_seed(11)
    x = torch.randn((8, 2), generator=generator).double()
    monkeypatch.setattr(ddpm_module, "randn_tensor", NoiseQueue(generator))
    with torch.no_grad():
        for t in range(199, -1, -1):
            eps = fixed_eps(x.float(), torch.full((8,), t)).double()
            x = oracle.step(eps, t, x).prev_sample
    ours = ddpm_sample(fixed_eps, schedule, (8, 2), generator=torch.Generator().manual_seed(11), variance=variance)
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize(("spacing", "steps"), [("trailing", 10), ("trailing", 37), ("leading", 20), ("linspace", 7)])
def test_respaced_ddpm_loop_matches_diffusers(monkeypatch, fixed_eps, variance: str, spacing: str, steps: int) -> None:
    """``sample_ddpm`` with fewer steps than T against diffusers' DDPMScheduler on the same timesteps (its
    ``previous_timestep`` is the next listed one, and its beta is ``1 - a_t / a_prev``). diffusers draws noise at
    every t > 0, also on the last step, where the respaced chain (and difflab) ends at the mean: that step is fed
    zero noise."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    from difflab.sampling.solvers import sample_ddpm

    schedule = NoiseSchedule.cosine(200)
    oracle = float64_oracle(
        DDPMScheduler(
            200,
            beta_schedule="squaredcos_cap_v2",
            variance_type=VARIANCE_NAMES[variance],
            clip_sample=False,
            timestep_spacing=spacing,
        )
    )
    oracle.set_timesteps(steps)
    timesteps = oracle.timesteps.tolist()
    assert timesteps == timestep_list(200, steps, spacing)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn((8, 2), generator=generator).double()
    monkeypatch.setattr(ddpm_module, "randn_tensor", NoiseQueue(generator))
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            if k == len(timesteps) - 1:
                monkeypatch.setattr(ddpm_module, "randn_tensor", lambda shape, **_: torch.zeros(tuple(shape)))
            eps = fixed_eps(x.float(), torch.full((8,), t)).double()
            x = oracle.step(eps, t, x).prev_sample
    ours = sample_ddpm(
        fixed_eps,
        schedule,
        (8, 2),
        steps=steps,
        spacing=spacing,
        variance=variance,
        generator=torch.Generator().manual_seed(11),
    )
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50, 1000])
def test_timestep_lists_match_diffusers(spacing: str, steps: int) -> None:
    oracle = DDIMScheduler(1000, timestep_spacing=spacing)
    oracle.set_timesteps(steps)
    assert timestep_list(1000, steps, spacing) == oracle.timesteps.tolist()


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("t", "t_prev"), [(999, 979), (500, 480), (20, 0), (0, None)])
def test_ddim_step_matches_diffusers(eta: float, t: int, t_prev: int | None, clip: float | None) -> None:
    """With ``clip_x0`` the step re-derives eps from the clipped x_0: diffusers' ``clip_sample=True`` with
    ``use_clipped_model_output=True`` (its default, False, keeps the network's eps in the direction term)."""
    schedule = NoiseSchedule.linear(1000)
    oracle = float64_oracle(
        DDIMScheduler(1000, clip_sample=clip is not None, clip_sample_range=clip or 1.0, set_alpha_to_one=True)
    )
    oracle.set_timesteps(50)  # step ratio 20, so diffusers' prev = t - 20 agrees with the list
    generator = torch.Generator().manual_seed(t)
    x_t, eps, noise = (torch.randn(16, 3, generator=generator) * 1.5 for _ in range(3))
    expected = oracle.step(
        eps.double(), t, x_t.double(), eta=eta, variance_noise=noise.double(), use_clipped_model_output=True
    ).prev_sample
    ours, x0 = ddim_step(schedule, eps, t, t_prev, x_t, eta, noise, clip_x0=clip)
    if clip is not None and t > 20:
        assert x0.abs().max() == clip  # the clip acts: the x_0 predictions of these draws leave [-1, 1]
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_loop_matches_diffusers(fixed_eps, spacing: str, eta: float) -> None:
    schedule = NoiseSchedule.cosine(1000)
    oracle = float64_oracle(
        DDIMScheduler(1000, beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing=spacing)
    )
    oracle.set_timesteps(25)
    generator = torch.Generator().manual_seed(5)
    x = torch.randn((8, 2), generator=generator).double()
    with torch.no_grad():
        timesteps = oracle.timesteps.tolist()
        for i, t in enumerate(timesteps):
            eps = fixed_eps(x.float(), torch.full((8,), t)).double()
            last = i == len(timesteps) - 1
            noise = torch.zeros(8, 2) if (eta == 0 or last) else torch.randn((8, 2), generator=generator)
            x = oracle.step(eps, t, x, eta=eta, variance_noise=noise.double()).prev_sample
    ours = ddim_sample(
        fixed_eps, schedule, (8, 2), steps=25, eta=eta, spacing=spacing, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(ours.double(), x, rtol=1e-5, atol=1e-5)


def test_ddim_reads_previous_timestep_from_the_list() -> None:
    """With steps that do not divide T, each update goes to the next listed timestep (closed form check)."""
    schedule = NoiseSchedule.linear(500)
    timesteps = timestep_list(500, 30, "trailing")
    assert len(timesteps) == 30 and timesteps[0] == 499
    visited = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        visited.append(int(t[0]))
        return torch.zeros_like(x)

    x_T = torch.ones(4, 2)
    out = ddim_sample(model, schedule, (4, 2), timesteps=timesteps, x_T=x_T)
    assert visited == timesteps
    # With eps = 0, DDIM maps x_t to sqrt(alpha_bar_prev / alpha_bar_t) x_t at each step, ending at alpha_bar = 1.
    torch.testing.assert_close(out, x_T / schedule.alpha_bar[499].sqrt(), rtol=1e-5, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_eta1_is_stochastic(fixed_eps) -> None:
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    x_T = torch.randn(16, 2)
    a = ddim_sample(fixed_eps, schedule, (16, 2), steps=20, x_T=x_T, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(fixed_eps, schedule, (16, 2), steps=20, x_T=x_T, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = ddim_sample(
        fixed_eps, schedule, (16, 2), steps=20, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(a, c)


def test_ddim_takes_one_eta_per_step(fixed_eps) -> None:
    """A constant eta list is the scalar eta, draw for draw; a hybrid (ancestral at the first 5 of 20 steps, the ODE
    below) equals the DDIM update (Song et al. eq. 12) applied by hand with noise drawn only where eta > 0."""
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    timesteps = timestep_list(100, 20, "leading")
    scalar = ddim_sample(fixed_eps, schedule, (16, 2), steps=20, eta=1.0, generator=torch.Generator().manual_seed(3))
    listed = ddim_sample(
        fixed_eps, schedule, (16, 2), steps=20, eta=[1.0] * 20, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(scalar, listed)
    etas = [1.0] * 5 + [0.0] * 15
    hybrid = ddim_sample(fixed_eps, schedule, (16, 2), steps=20, eta=etas, generator=torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn((16, 2), generator=generator)
    for k, t in enumerate(timesteps):
        t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else None
        noise = torch.randn((16, 2), generator=generator) if etas[k] > 0 and t_prev is not None else None
        x, _ = ddim_step(schedule, fixed_eps(x, torch.full((16,), t)), t, t_prev, x, etas[k], noise)
    assert torch.equal(hybrid, x)
    assert not torch.allclose(hybrid, scalar)
    with pytest.raises(ConfigError, match="3 eta values for 20 steps"):
        ddim_sample(fixed_eps, schedule, (16, 2), steps=20, eta=[0.0] * 3)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        ddim_sample(fixed_eps, schedule, (16, 2), steps=20, eta=-0.1)


def test_samplers_are_reproducible_with_a_seed(fixed_eps) -> None:
    schedule = NoiseSchedule.linear(50, 1e-3, 0.3)
    runs = [ddpm_sample(fixed_eps, schedule, (32, 2), generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_ddpm_on_gaussian_data_with_the_exact_eps_recovers_the_distribution() -> None:
    """For data N(m, s^2 I) the optimal eps is known in closed form; DDPM with it must reproduce m and s."""
    mean, std = torch.tensor([1.0, -2.0]), 0.5
    schedule = NoiseSchedule.linear(1000)

    data = GaussianData.isotropic(mean, std)

    def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return data.eps(x, schedule.alpha_bar[t])

    for variance in ("beta", "posterior"):
        samples = ddpm_sample(
            exact_eps, schedule, (20_000, 2), generator=torch.Generator().manual_seed(0), variance=variance
        )
        torch.testing.assert_close(samples.mean(0), mean, atol=0.02, rtol=0)
        torch.testing.assert_close(samples.std(0), torch.full((2,), std), atol=0.015, rtol=0)
    # DDIM integrates the probability-flow ODE: exact in the limit of many steps.
    deterministic = ddim_sample(
        exact_eps, schedule, (20_000, 2), steps=1000, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(deterministic.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(deterministic.std(0), torch.full((2,), std), atol=0.005, rtol=0)


def test_bad_sampler_arguments() -> None:
    schedule = NoiseSchedule.linear(10)
    with pytest.raises(ConfigError, match="steps"):
        timestep_list(10, 11)
    with pytest.raises(ConfigError, match="variance"):
        ddpm_sample(lambda x, t: x, schedule, (2, 2), variance="learned")
    from difflab.sampling.solvers import sample_ddpm

    # the registry's DDPM sees eps only: a learned variance is refused, not silently taken as the posterior one
    with_v = lambda x, t: torch.cat([x, torch.ones_like(x)], 1)  # noqa: E731  an [eps, v] model
    for model in (lambda x, t: x, with_v):
        with pytest.raises(ConfigError, match="learned variance is sampled by the recipe's own DDPM"):
            sample_ddpm(model, schedule, (2, 2), variance="learned")
    with pytest.raises(ConfigError, match="must be one of beta, posterior, got 'fixed'"):
        sample_ddpm(lambda x, t: x, schedule, (2, 2), variance="fixed")


def test_an_output_that_cannot_be_held_is_refused_before_sampling(monkeypatch, fixed_eps) -> None:
    from difflab import memory
    from difflab.experiments import images, points2d

    available = available_memory_bytes()
    assert available is not None and 2**26 < available < 2**50  # read from /proc/meminfo on Linux
    check_output_fits(1000, (1, 28, 28))
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10 * 2**20)  # 10 MiB left
    check_output_fits(1000, (2,))  # 16 kB: fine
    with pytest.raises(
        ConfigError,
        match=r"2000 images of 1 x 28 x 28 values need at least 12.0 MiB of memory, and 10.0 MiB is available",
    ):
        check_output_fits(2000, (1, 28, 28), "images")  # 12.5 MB twice
    schedule = NoiseSchedule.linear(50)
    calls = []

    def counted(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.zeros_like(x)

    with pytest.raises(ConfigError, match="2000 images"):
        images.sample_images(
            counted,
            schedule,
            2000,
            (1, 28, 28),
            sampler="ddim",
            steps=5,
            eta=0.0,
            batch_size=100,
            seed=0,
            device=torch.device("cpu"),
        )
    with pytest.raises(ConfigError, match="10000000 points"):
        points2d.sample_points(
            fixed_eps,
            schedule,
            10**7,
            sampler="ddim",
            steps=5,
            eta=0.0,
            ddpm_variance="beta",
            batch_size=1000,
            generator=torch.Generator(),
            device=torch.device("cpu"),
        )
    assert not calls
