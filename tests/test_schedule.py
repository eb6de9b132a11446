"""Noise schedules against closed forms and against diffusers' schedulers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from difflab.diffusion.schedule import NoiseSchedule, ScheduleConfig, cosine_betas
from difflab.errors import ConfigError


def test_linear_schedule_closed_forms() -> None:
    schedule = NoiseSchedule.linear(500, 1e-4, 0.02)
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    betas = torch.linspace(1e-4, 0.02, 500, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha_bar.double(), torch.cumprod(1 - betas, 0), rtol=1e-6, atol=1e-7)
    # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, and beta_tilde_0 = 0.
    alpha_bar = torch.cumprod(1 - betas, 0)
    expected = (1 - alpha_bar[:-1]) / (1 - alpha_bar[1:]) * betas[1:]
    torch.testing.assert_close(schedule.posterior_variance[1:].double(), expected, rtol=1e-5, atol=1e-9)
    assert schedule.posterior_variance[0].item() == 0.0
    assert (schedule.posterior_variance <= schedule.betas).all()


def test_cosine_schedule_matches_its_alpha_bar_function() -> None:
    T, s = 1000, 0.008
    schedule = NoiseSchedule.cosine(T, s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        # alpha_bar at index t is the product up to DDPM step t + 1: f(t + 1) / f(0)
        assert schedule.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert cosine_betas(T, s).max().item() == pytest.approx(0.999)


def test_posterior_mean_coefficients_recover_x0_when_noise_is_known() -> None:
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    x0 = torch.randn(64, 3)
    t = torch.randint(0, 100, (64,))
    noise = torch.randn(64, 3)
    x_t = schedule.q_sample(x0, t, noise)
    torch.testing.assert_close(schedule.predict_x0(x_t, t, noise), x0, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(schedule.predict_eps(x_t, t, x0), noise, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("t", [0, 99, 499])
def test_q_sample_mean_and_variance(t: int) -> None:
    schedule = NoiseSchedule.linear(500)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5)
    x_t = schedule.q_sample(x0, torch.full((200_000,), t), torch.randn(x0.shape, generator=generator))
    alpha_bar = schedule.alpha_bar[t].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 1.5, abs=0.01)
    assert x_t.var().item() == pytest.approx(1 - alpha_bar, abs=0.01 + 0.01 * (1 - alpha_bar))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_variance_preserving(kind: str) -> None:
    """Unit-variance data keeps unit variance at every t: alpha_bar * 1 + (1 - alpha_bar) = 1."""
    schedule = NoiseSchedule.from_config(ScheduleConfig(kind, 1000))
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(100_000, 2, generator=generator)
    for t in (0, 250, 999):
        x_t = schedule.q_sample(x0, torch.full((100_000,), t), torch.randn(x0.shape, generator=generator))
        assert x_t.var().item() == pytest.approx(1.0, abs=0.02)
    assert schedule.alpha_bar[-1].item() < 1e-3  # x_T is (almost) pure noise


@pytest.mark.parametrize(
    ("kind", "diffusers_name", "beta_start", "beta_end"),
    [
        ("linear", "linear", 1e-4, 0.02),
        ("cosine", "squaredcos_cap_v2", 1e-4, 0.02),
        ("scaled_linear", "scaled_linear", 0.00085, 0.012),
    ],
)
def test_schedules_match_diffusers(kind: str, diffusers_name: str, beta_start: float, beta_end: float) -> None:
    ours = NoiseSchedule.from_config(ScheduleConfig(kind, 1000, beta_start, beta_end))
    oracle = DDPMScheduler(1000, beta_start, beta_end, beta_schedule=diffusers_name)
    torch.testing.assert_close(ours.betas, oracle.betas.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alpha_bar, oracle.alphas_cumprod.float(), rtol=1e-5, atol=1e-6)
    x0, noise = torch.randn(8, 4), torch.randn(8, 4)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 998, 999])
    torch.testing.assert_close(ours.q_sample(x0, t, noise), oracle.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_bad_schedule_configs_raise_one_line_errors() -> None:
    with pytest.raises(ConfigError, match="schedule.kind"):
        ScheduleConfig("quadratic")
    with pytest.raises(ConfigError, match="beta_start"):
        ScheduleConfig("linear", 100, 0.5, 0.1)
    with pytest.raises(ConfigError, match="num_timesteps"):
        ScheduleConfig("linear", 0)
