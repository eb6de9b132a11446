"""Improved DDPM: the VLB terms against closed forms, the learned variance and respacing against diffusers'
DDPMScheduler, the hybrid loss's stop-gradient, and the bound on Gaussian data where everything is known."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from scipy.stats import norm

from difflab.diffusion.gaussian import GaussianData
from difflab.diffusion.objectives import epsilon_loss, hybrid_loss
from difflab.diffusion.respacing import kept_timesteps, respace, respaced
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import (
    discretized_gaussian_log_likelihood,
    fixed_log_variance,
    full_vlb,
    gaussian_log_likelihood,
    learned_log_variance,
    normal_kl,
    split_output,
    vlb_terms,
)
from difflab.errors import ConfigError
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.ddpm import ddpm_sample, ddpm_step
from test_samplers import NoiseQueue, float64_oracle


def test_normal_kl_matches_torch_distributions() -> None:
    generator = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=generator).double(), torch.randn(50, generator=generator).double()
    lv1, lv2 = torch.randn(50, generator=generator).double(), torch.randn(50, generator=generator).double()
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert torch.all(normal_kl(m1, lv1, m1, lv1) == 0)


def test_gaussian_log_likelihood_matches_torch() -> None:
    x, mean, log_variance = torch.randn(20).double(), torch.randn(20).double(), torch.randn(20).double()
    expected = torch.distributions.Normal(mean, (0.5 * log_variance).exp()).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, log_variance), expected)


@pytest.mark.parametrize("count", [256, 17])
@pytest.mark.parametrize(("mean", "std"), [(0.0, 0.5), (0.3, 0.01), (-0.99, 0.002), (0.7, 3.0), (0.999, 1e-4)])
def test_discretized_likelihood_is_a_distribution_over_the_levels(mean: float, std: float, count: int) -> None:
    """Ho et al. eq. 13: bins of width 2/(L-1) around each of the L levels (2/255 for 8-bit images, 2/16 for
    sklearn's 17-level digits), the end bins open; probabilities sum to one and equal the normal CDF differences
    (scipy, float64)."""
    levels = torch.arange(count, dtype=torch.float64) * 2 / (count - 1) - 1
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(std), dtype=torch.float64), count
    )
    assert torch.isfinite(log_p).all() or std < 1e-3  # far tails may underflow to the 1e-12-ish clamp
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0).double(), rtol=0, atol=1e-6)
    half_bin = 1 / (count - 1)
    upper = norm.cdf((levels.numpy() + half_bin - mean) / std)
    lower = norm.cdf((levels.numpy() - half_bin - mean) / std)
    upper[-1], lower[0] = 1.0, 0.0
    torch.testing.assert_close(log_p.exp(), torch.from_numpy(upper - lower), rtol=1e-6, atol=1e-9)


def test_vlb_decoder_term_uses_the_datas_levels() -> None:
    """``vlb_terms`` at t = 0 is the discretised decoder NLL with the bins of the data's own levels: on 17-level
    data a decoder of 256 levels would put its mass in bins 15x too narrow and overstate the NLL by about
    log2(255 / 16) bits/dim."""
    schedule = NoiseSchedule(NoiseSchedule.cosine(50).betas.double())
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 17, (4, 1, 8, 8), generator=generator).double() * 2 / 16 - 1
    mean = x0 + 0.01 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    log_variance = torch.full_like(x0, 2 * math.log(0.02))
    t = torch.zeros(4, dtype=torch.long)
    x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=generator, dtype=torch.float64))
    bits = {}
    for count in (17, 256):
        bits[count] = vlb_terms(schedule, x0, x_t, t, mean, log_variance, "discretized", count)
        expected = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance, count).mean((1, 2, 3))
        torch.testing.assert_close(bits[count], expected / math.log(2))
    assert float(bits[17].max()) < 0.01  # a mean within 0.01 of the level: nearly all mass in its bin of width 1/8
    assert float((bits[256] - bits[17]).mean()) > 2.0


def test_discretized_likelihood_stays_finite_in_the_tails() -> None:
    """A confident wrong mean: the log-probability is very negative but finite (log-ndtr differences)."""
    x = torch.tensor([0.0, 0.0, -0.5]).double()  # the first two: 0.9 below and 0.9 above the mean
    log_p = discretized_gaussian_log_likelihood(
        x, torch.tensor([0.9, -0.9, 0.9]).double(), torch.full((3,), math.log(0.05)).double()
    )
    expected = [
        norm.logcdf(-(0.9 - 1 / 255) / 0.05)
        + math.log1p(-math.exp(norm.logcdf(-(0.9 + 1 / 255) / 0.05) - norm.logcdf(-(0.9 - 1 / 255) / 0.05)))
    ] * 2
    assert torch.isfinite(log_p).all() and (log_p < -100).all()
    torch.testing.assert_close(log_p[:2], torch.tensor(expected).double(), rtol=1e-6, atol=1e-6)


def test_learned_variance_interpolates_between_beta_and_beta_tilde() -> None:
    schedule = NoiseSchedule.cosine(1000)
    t = torch.tensor([1, 10, 500, 999])
    shape = (4, 3)
    top = learned_log_variance(schedule, torch.ones(shape), t)
    bottom = learned_log_variance(schedule, -torch.ones(shape), t)
    middle = learned_log_variance(schedule, torch.zeros(shape), t)
    torch.testing.assert_close(top[:, 0], schedule.betas[t].log())
    torch.testing.assert_close(bottom[:, 0], schedule.posterior_variance[t].log())
    torch.testing.assert_close(middle, (top + bottom) / 2)  # v = 1/2: the geometric mean of the variances
    torch.testing.assert_close(fixed_log_variance(schedule, "posterior"), schedule.posterior_log_variance_clipped)
    assert fixed_log_variance(schedule, "beta")[0] == schedule.posterior_log_variance_clipped[0]


@pytest.mark.parametrize("t", [1, 37, 420, 999])
def test_learned_variance_step_matches_diffusers(monkeypatch, t: int) -> None:
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    schedule = NoiseSchedule.linear(1000)
    oracle = float64_oracle(DDPMScheduler(1000, variance_type="learned_range", clip_sample=False))
    generator = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(8, 3, 4, 4, generator=generator), torch.randn(8, 3, 4, 4, generator=generator)
    values = torch.rand(8, 3, 4, 4, generator=generator) * 2 - 1
    monkeypatch.setattr(ddpm_module, "randn_tensor", NoiseQueue(torch.Generator().manual_seed(3)))
    expected = oracle.step(torch.cat([eps, values], 1).double(), t, x_t.double()).prev_sample
    noise = torch.randn((8, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    ours, _ = ddpm_step(schedule, eps, t, x_t, noise, "learned", variance_values=values)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small"])
def test_respaced_ddpm_matches_diffusers_with_inference_steps(monkeypatch, variance_type: str) -> None:
    """diffusers' DDPMScheduler.set_timesteps(K) jumps between kept timesteps with beta = 1 - a_t / a_prev and the
    matching beta_tilde: respacing. Compare every step of a 100-step chain out of 1,000."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    schedule = NoiseSchedule.cosine(1000)
    oracle = float64_oracle(
        DDPMScheduler(
            1000,
            beta_schedule="squaredcos_cap_v2",
            variance_type=variance_type,
            clip_sample=False,
            timestep_spacing="linspace",
        )
    )
    oracle.set_timesteps(100)
    chain = respaced(schedule, 100)
    assert oracle.timesteps.tolist() == chain.timesteps[::-1]
    monkeypatch.setattr(ddpm_module, "randn_tensor", NoiseQueue(torch.Generator().manual_seed(7)))
    noise_generator = torch.Generator().manual_seed(7)
    generator = torch.Generator().manual_seed(1)
    for i in (99, 60, 5, 1):
        x_t, eps = torch.randn(6, 2, generator=generator), torch.randn(6, 2, generator=generator)
        values = torch.rand(6, 2, generator=generator) * 2 - 1
        output = torch.cat([eps, values], 1) if variance_type == "learned_range" else eps
        expected = oracle.step(output.double(), chain.timesteps[i], x_t.double()).prev_sample
        noise = torch.randn((6, 2), generator=noise_generator)
        variance = "learned" if variance_type == "learned_range" else "posterior"
        ours, _ = ddpm_step(chain.schedule, eps, i, x_t, noise, variance, variance_values=values)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_respacing_keeps_the_marginals() -> None:
    schedule = NoiseSchedule.linear(1000)
    chain = respaced(schedule, 50)
    assert len(chain.schedule) == 50 and chain.timesteps[0] == 0 and chain.timesteps[-1] == 999
    torch.testing.assert_close(chain.schedule.alpha_bar, schedule.alpha_bar[chain.timesteps], rtol=1e-5, atol=1e-7)
    full = respace(schedule, range(1000))
    torch.testing.assert_close(full.schedule.betas, schedule.betas, rtol=1e-5, atol=1e-9)
    assert kept_timesteps(1000, 4, "leading") == [0, 250, 500, 750]
    with pytest.raises(ConfigError, match="steps"):
        respaced(schedule, 0)


def test_respaced_sampler_calls_the_model_with_the_original_timesteps(fixed_eps) -> None:
    schedule = NoiseSchedule.linear(200, 1e-3, 0.1)
    seen: list[int] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(int(t[0]))
        return fixed_eps(x, t)

    chain = respaced(schedule, 20)
    ddpm_sample(chain.wrap(model), chain.schedule, (4, 2), generator=torch.Generator().manual_seed(0))
    assert seen == chain.timesteps[::-1]
    # All T steps "respaced" is the plain sampler, bit for bit in float32 up to rounding.
    same = respaced(schedule, 200)
    a = ddpm_sample(same.wrap(fixed_eps), same.schedule, (8, 2), generator=torch.Generator().manual_seed(2))
    b = ddpm_sample(fixed_eps, schedule, (8, 2), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_samplers_accept_a_learned_variance_output(fixed_eps) -> None:
    """DDIM ignores v; DDPM with a fixed variance ignores it too; DDPM 'learned' uses it."""
    schedule = NoiseSchedule.linear(50, 1e-3, 0.3)

    def with_v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([fixed_eps(x, t), torch.ones_like(x)], dim=1)

    x_T = torch.randn(8, 2)
    torch.testing.assert_close(
        ddim_sample(with_v, schedule, (8, 2), steps=10, x_T=x_T),
        ddim_sample(fixed_eps, schedule, (8, 2), steps=10, x_T=x_T),
    )
    # v = 1 is sigma^2 = beta_t: the same chain as variance="beta" (t = 0 aside, where no noise is added).
    a = ddpm_sample(with_v, schedule, (8, 2), generator=torch.Generator().manual_seed(0), variance="learned")
    b = ddpm_sample(fixed_eps, schedule, (8, 2), generator=torch.Generator().manual_seed(0), variance="beta")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="learned"):
        ddpm_sample(fixed_eps, schedule, (2, 2), variance="learned")
    with pytest.raises(ValueError, match="fits neither"):
        split_output(torch.zeros(2, 3), torch.zeros(2, 2))


def test_vlb_on_gaussian_data_is_a_tight_bound_and_the_optimal_learned_variance_tightens_it() -> None:
    """Data N(m, s^2 I) in 2-D: the exact eps and the exact reverse variance are known in closed form.

    The true reverse step q(x_{t-1} | x_t) is Gaussian with variance beta_tilde_t + c1_t^2 Var(x_0 | x_t); with it
    (expressed as v of eq. 15) the bound is the data's NLL up to Monte-Carlo noise, and both fixed variances give a
    looser (higher) bound (measured: learned 0.72-0.74, NLL 0.725-0.730, beta 0.84-0.87, beta_tilde 1.64-1.68).
    """
    mean, std, n = torch.tensor([0.5, -0.3]).double(), 0.4, 4000
    schedule = NoiseSchedule.linear(200, 1e-3, 0.1)
    alpha_bar_all = schedule.alpha_bar.double()

    data = GaussianData.isotropic(mean, std)

    def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return data.eps(x, alpha_bar_all[t])

    def optimal(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = alpha_bar_all[t][:, None]
        posterior_x0 = std**2 * (1 - alpha_bar) / (alpha_bar * std**2 + 1 - alpha_bar)  # Var(x_0 | x_t)
        coef1 = schedule.posterior_mean_coef1.double()[t][:, None]
        true_variance = schedule.posterior_variance.double()[t][:, None] + coef1**2 * posterior_x0
        low = schedule.posterior_log_variance_clipped.double()[t][:, None]
        high = schedule.betas.double().log()[t][:, None]
        v = 2 * (true_variance.log() - low) / (high - low) - 1
        return torch.cat([exact_eps(x, t), v.expand_as(x)], dim=1)

    x0 = mean + std * torch.randn(n, 2, generator=torch.Generator().manual_seed(0)).double()
    nll = float(-torch.distributions.Normal(mean, std).log_prob(x0).mean()) / math.log(2)
    schedule64 = NoiseSchedule(schedule.betas.double())
    fixed = full_vlb(exact_eps, schedule64, x0, generator=torch.Generator().manual_seed(1), decoder="gaussian")
    learned = full_vlb(optimal, schedule64, x0, generator=torch.Generator().manual_seed(1), decoder="gaussian")
    assert learned.variance == "learned" and set(fixed.by_variance) == {"beta", "posterior"}
    # The estimate of the bound is noisy (one x_t per term and point; about +-0.02 bits at this n), the comparisons
    # between variances are not (the same x_t serve all three).
    assert abs(learned.total - nll) < 0.05
    assert fixed.by_variance["beta"] > learned.total + 0.05 and fixed.by_variance["posterior"] > learned.total + 0.5
    assert fixed.total == min(fixed.by_variance.values())
    parts = learned.prior + learned.terms + learned.decoder
    torch.testing.assert_close(torch.tensor(learned.total), torch.tensor(parts))


def test_hybrid_loss_trains_the_variance_only_through_the_vlb() -> None:
    """With vlb_weight = 0 it is L_simple with the same draws; the VLB part sends no gradient to the eps head."""

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.eps_scale = torch.nn.Parameter(torch.tensor(0.3))
            self.v_bias = torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.eps_scale * x, self.v_bias.expand_as(x)], dim=1)

    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    x0 = torch.rand(16, 1, 4, 4) * 2 - 1
    model = TwoHeads()
    simple = epsilon_loss(lambda x, t: model(x, t)[:, :1], schedule, x0, torch.Generator().manual_seed(5))
    hybrid0 = hybrid_loss(model, schedule, x0, torch.Generator().manual_seed(5), vlb_weight=0.0)
    torch.testing.assert_close(hybrid0, simple)
    (grad_simple,) = torch.autograd.grad(simple, model.eps_scale)
    hybrid = hybrid_loss(model, schedule, x0, torch.Generator().manual_seed(5), vlb_weight=0.01)
    grad_eps, grad_v = torch.autograd.grad(hybrid, [model.eps_scale, model.v_bias])
    torch.testing.assert_close(grad_eps, grad_simple)
    assert grad_v.abs() > 0
    with pytest.raises(ConfigError, match="learned-variance"):
        hybrid_loss(lambda x, t: x, schedule, x0, torch.Generator().manual_seed(0))


class _GaussianEpsWithError(torch.nn.Module):
    """The exact eps of N(0, I) data, ``sqrt(1 - alpha_bar_t) x_t``, plus a fixed error of RMS ``error`` per t;
    with ``learned`` it also outputs v = 0 (the [eps, v] layout)."""

    def __init__(self, schedule: NoiseSchedule, error: float, learned: bool = False) -> None:
        super().__init__()
        self.schedule, self.error, self.learned = schedule, error, learned

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.schedule.alpha_bar.to(x.device)[t].view(-1, *([1] * (x.ndim - 1)))
        generator = torch.Generator().manual_seed(int(t[0]))
        eps = (1 - alpha_bar).sqrt() * x + self.error * torch.randn(x.shape[1:], generator=generator)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1) if self.learned else eps


@pytest.mark.parametrize("learned", [False, True])
def test_clipping_x0_keeps_the_cosine_schedules_first_step_in_distribution(learned: bool) -> None:
    """At the cosine schedule's last step alpha_bar_T ~ 2e-9, so an eps error of 0.05 becomes an x_0 error of ~1,000
    and the first DDPM step leaves x_{T-1} far wider than N(0, I) (what broke unclipped latent sampling); clipping
    x_0 to the data's range keeps it at std 1 (x_{T-1} of N(0, I) data is N(0, I) under any schedule)."""
    from difflab.experiments.images import sample_images

    schedule = NoiseSchedule.cosine(1000)
    model = _GaussianEpsWithError(schedule, 0.05, learned)
    first_steps: dict[str, float] = {}
    for clip in (None, 4.0):

        def record(step: int, t: int, x: torch.Tensor, x0: torch.Tensor, clip: float | None = clip) -> None:
            if step == 1:
                first_steps[str(clip)] = float(x.std())

        sample_images(
            model,
            schedule,
            256,
            (4, 7, 7),
            sampler="ddpm",
            steps=0,
            eta=0.0,
            batch_size=256,
            seed=0,
            device=torch.device("cpu"),
            callback=record,
            clip_x0=clip,
            variance="learned" if learned else "beta",
        )
    assert first_steps["None"] > 1.5
    assert abs(first_steps["4.0"] - 1) < 0.02


def test_full_vlb_scores_the_clipped_model_the_sampler_uses() -> None:
    """Under the cosine schedule an eps error of 0.05 at t = T costs ~1.5 nats/dim in L_{T-1} through the amplified
    x_0 prediction; clipping x_0 to the data's range (as the sampler does) removes that, and a bound no sample reaches
    changes nothing."""
    schedule = NoiseSchedule.cosine(1000)
    model = _GaussianEpsWithError(schedule, 0.05)
    x0 = torch.randn(16, 4, 7, 7, generator=torch.Generator().manual_seed(0)).clamp(-4, 4)

    def bound(clip: float | None) -> float:
        generator = torch.Generator().manual_seed(1)
        return full_vlb(model, schedule, x0, generator=generator, decoder="gaussian", clip_x0=clip).total

    unclipped, clipped, loose = bound(None), bound(4.0), bound(1e12)
    assert unclipped - clipped > 1.0
    assert loose == pytest.approx(unclipped, abs=1e-9)
