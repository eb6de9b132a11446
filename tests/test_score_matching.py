"""NCSN pieces against closed forms: noise levels, the DSM objective on Gaussian data, annealed Langevin
dynamics with the exact score of a Gaussian mixture, the score networks and the score/eps conversions."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.score_matching import NoiseLevelsConfig, dsm_loss, dsm_terms, geometric_sigmas
from difflab.errors import ConfigError
from difflab.models.score import NoiseConditionalUNet, ScoreMLP
from difflab.models.unet import UNetConfig
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.langevin import annealed_langevin, network_evaluations
from difflab.sampling.score import eps_from_score, eps_from_ve_score, langevin_corrector, score_from_eps


def test_geometric_levels() -> None:
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    assert sigmas.shape == (10,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == pytest.approx(1.0) and sigmas[-1].item() == pytest.approx(0.01)
    ratios = sigmas[1:] / sigmas[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.01 ** (1 / 9)), rtol=1e-5)
    assert torch.equal(NoiseLevelsConfig().sigmas(), sigmas)
    with pytest.raises(ConfigError, match="sigma_min < sigma_max"):
        NoiseLevelsConfig(sigma_max=0.01, sigma_min=1.0)
    with pytest.raises(ConfigError, match="num_levels"):
        NoiseLevelsConfig(num_levels=1)


# -- DSM on Gaussian data: x ~ N(mu, s0^2 I_D), so x~ = x + sigma z ~ N(mu, (s0^2 + sigma^2) I) ---------------------
DIM, S0 = 3, 0.7
MU = torch.tensor([0.5, -1.0, 2.0])


def true_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return -(x - MU) / (S0**2 + sigma[:, None] ** 2)


def test_dsm_is_minimised_by_the_true_score_with_the_closed_form_minimum() -> None:
    """E[sigma^2/2 || s* + z/sigma ||^2] = sigma^2/2 tr Cov(z/sigma | x~) = D s0^2 / (2 (s0^2 + sigma^2)) per level;
    any other score adds E[sigma^2/2 || s - s* ||^2] (the cross term vanishes in expectation)."""
    generator = torch.Generator().manual_seed(0)
    sigmas = geometric_sigmas(2.0, 0.05, 5)
    n = 40_000
    x0 = MU + S0 * torch.randn(n * len(sigmas), DIM, generator=generator)
    sigma = sigmas.repeat_interleave(n)
    noise = torch.randn(x0.shape, generator=generator)
    true_terms = dsm_terms(true_score, x0, sigma, noise)
    closed_form = float((DIM * S0**2 / (2 * (S0**2 + sigmas**2))).mean())
    standard_error = float(true_terms.std()) / math.sqrt(len(true_terms))
    assert abs(float(true_terms.mean()) - closed_form) < 4 * standard_error
    x_noisy = x0 + sigma[:, None] * noise
    perturbations = {
        "scaled by 1.1": lambda x, s: 1.1 * true_score(x, s),
        "scaled by 0.9": lambda x, s: 0.9 * true_score(x, s),
        "shifted by 0.2 / sigma": lambda x, s: true_score(x, s) + 0.2 / s[:, None],
        "data variance only": lambda x, s: -(x - MU) / S0**2,
        "unit variance": lambda x, s: -(x - MU),
    }
    for name, score in perturbations.items():
        terms = dsm_terms(score, x0, sigma, noise)
        excess = 0.5 * (sigma[:, None] * (score(x_noisy, sigma) - true_score(x_noisy, sigma))).pow(2).sum(1)
        difference = terms - true_terms  # paired: same x0 and noise
        assert float(difference.mean()) > 0, name
        tolerance = 4 * float((difference - excess).std()) / math.sqrt(len(terms))
        assert abs(float(difference.mean()) - float(excess.mean())) < tolerance, name


def test_dsm_loss_draws_levels_uniformly_and_is_reproducible() -> None:
    sigmas = geometric_sigmas(1.0, 0.01, 4)
    seen: list[torch.Tensor] = []

    def zero_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append(sigma)
        return torch.zeros_like(x)

    x0 = torch.zeros(4000, 2)
    loss = dsm_loss(zero_score, x0, sigmas, torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(1.0, rel=0.05)  # s = 0: 1/2 E||z||^2 = D / 2 = 1
    counts = torch.stack([(seen[0] == s).sum() for s in sigmas]).float()
    assert counts.sum() == 4000 and counts.min() > 900  # about 1000 each
    again = dsm_loss(zero_score, x0, sigmas, torch.Generator().manual_seed(1))
    assert float(again) == float(loss)


# -- annealed Langevin dynamics with the exact score of a noised Gaussian mixture -------------------------------------
WEIGHTS = torch.tensor([0.2, 0.5, 0.3])
MEANS = torch.tensor([[-1.2, 0.0], [1.0, 0.3], [0.0, 1.3]])
STDS = torch.tensor([0.5, 0.4, 0.45])


def mixture_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """grad log sum_k w_k N(x; m_k, (s_k^2 + sigma^2) I) for x (B, 2), sigma (B,)."""
    variance = STDS[None, :] ** 2 + sigma[:, None] ** 2  # (B, K)
    offset = x[:, None, :] - MEANS[None]  # (B, K, 2)
    log_density = WEIGHTS.log() - offset.pow(2).sum(-1) / (2 * variance) - variance.log()  # 2-D: log(1/var)
    responsibility = torch.softmax(log_density, dim=1)
    return -(responsibility[:, :, None] * offset / variance[:, :, None]).sum(1)


def mixture_samples(n: int, generator: torch.Generator) -> torch.Tensor:
    component = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return MEANS[component] + STDS[component, None] * torch.randn(n, 2, generator=generator)


def test_annealed_langevin_with_the_exact_score_reproduces_a_gaussian_mixture() -> None:
    """sigma_max = 3 covers the modes' spread. The chain must still mix at the small levels, where a step
    moves a component of variance v = s_k^2 + sigma^2 by a / (2 v) = c sigma^2 / (2 v) e-folds: with c = 0.1 and
    T = 100 the components keep ~5 standard errors too much variance (frozen in at sigma ~ s_k) at this n,
    so the test runs c = 0.5 and T = 200, where what is left is within sampling error."""
    n = 4000
    generator = torch.Generator().manual_seed(0)
    sigmas = geometric_sigmas(3.0, 0.01, 10)
    x, trajectory = annealed_langevin(
        mixture_score,
        sigmas,
        (n, 2),
        c=0.5,
        steps_per_level=200,
        init="gaussian",
        generator=generator,
        record_levels=[0, 5, 9],
    )
    assert [level for level, _, _ in trajectory] == [0, 5, 9, 10]
    assert trajectory[-1][1] == 0.0 and torch.equal(trajectory[-1][2], x)
    assert float(trajectory[0][2].std()) > 2.5  # still at the scale of sigma_max = 3
    true_mean = (WEIGHTS[:, None] * MEANS).sum(0)
    second = (
        WEIGHTS[:, None, None] * (MEANS[:, :, None] * MEANS[:, None, :] + STDS[:, None, None] ** 2 * torch.eye(2))
    ).sum(0)
    true_cov = second - true_mean[:, None] * true_mean[None, :]
    # sampling error of the mean and of each covariance entry at this n, from an exact draw of the mixture
    exact = mixture_samples(200_000, torch.Generator().manual_seed(4)) - true_mean
    mean_se = exact.std(0) / math.sqrt(n)
    products = exact[:, :, None] * exact[:, None, :]
    cov_se = products.std(0) / math.sqrt(n)
    centred = x - x.mean(0)
    cov = centred.T @ centred / (n - 1)
    assert ((x.mean(0) - true_mean).abs() < 4 * mean_se).all(), (x.mean(0), true_mean)
    assert ((cov - true_cov).abs() < 4 * cov_se).all(), (cov, true_cov)
    # the mode weights: share of samples nearest each component mean
    nearest = torch.cdist(x, MEANS).argmin(1)
    shares = torch.bincount(nearest, minlength=3).float() / n
    assert ((shares - WEIGHTS).abs() < 4 * (WEIGHTS * (1 - WEIGHTS) / n).sqrt() + 0.01).all(), shares


def test_langevin_counts_its_network_evaluations_and_validates_input() -> None:
    calls = []

    def score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(float(sigma[0]))
        return -x

    sigmas = [1.0, 0.5, 0.25]
    generator = torch.Generator().manual_seed(0)
    x, trajectory = annealed_langevin(score, sigmas, (5, 1, 2, 2), c=0.1, steps_per_level=4, generator=generator)
    assert len(calls) == network_evaluations(3, 4, True) == 13 and trajectory == []
    assert calls[:4] == [1.0] * 4 and calls[-1] == 0.25
    assert x.shape == (5, 1, 2, 2)
    start = annealed_langevin(
        score, sigmas, (5, 1, 2, 2), c=0.1, steps_per_level=4, denoise=False, generator=torch.Generator().manual_seed(0)
    )[0]
    assert not torch.equal(start, x)
    for bad, message in [
        ({"c": 0.0}, "c must be > 0"),
        ({"steps_per_level": 0}, "steps_per_level"),
        ({"init": "zeros"}, "init must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            annealed_langevin(score, sigmas, (2, 2), **bad)
    with pytest.raises(ConfigError, match="decreasing"):
        annealed_langevin(score, [0.1, 1.0], (2, 2))


# -- the networks -----------------------------------------------------------------------------------------------------
def test_score_networks_shapes_and_output_parameterisation() -> None:
    torch.manual_seed(0)
    config = UNetConfig(
        base_channels=8, channel_mults=(1, 2), time_conditioning="film", mid_attention=False, time_scale=200.0
    )
    scaled, direct = NoiseConditionalUNet(config, "scaled"), NoiseConditionalUNet(config, "direct")
    for p in scaled.unet.out_conv.parameters():
        torch.nn.init.normal_(p, std=0.1)
    direct.load_state_dict(scaled.state_dict())
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 0.1, 0.01])
    assert torch.allclose(scaled(x, sigma), direct(x, sigma) / sigma[:, None, None, None], rtol=1e-5, atol=1e-6)
    assert scaled(x, 0.5).shape == x.shape  # a scalar level is broadcast
    mlp = ScoreMLP(2, (16, 16), output="scaled")
    assert mlp(torch.randn(5, 2), torch.full((5,), 0.3)).shape == (5, 2)
    assert ScoreMLP(2, (8,), sigma_encoding="raw")(torch.randn(4, 2), 0.2).shape == (4, 2)
    with pytest.raises(ConfigError, match="score output"):
        ScoreMLP(output="eps")
    with pytest.raises(ConfigError, match="sigma_encoding"):
        ScoreMLP(sigma_encoding="onehot")


# -- score <-> eps ----------------------------------------------------------------------------------------------------
VAR0 = 0.5  # data x_0 ~ N(0, VAR0 I): x_t ~ N(0, v_t I) with v_t = alpha_bar_t VAR0 + 1 - alpha_bar_t


def vp_variance(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    alpha_bar = schedule.alpha_bar[t]
    return alpha_bar * VAR0 + 1 - alpha_bar


def analytic_eps(schedule: NoiseSchedule):
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # E[eps | x_t] = sigma_t x_t / v_t
        return (schedule.sigma(t) / vp_variance(schedule, t))[:, None] * x

    return eps


def analytic_score(schedule: NoiseSchedule):
    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -x / vp_variance(schedule, t)[:, None]

    return score


def test_score_and_eps_conversions_match_the_closed_forms() -> None:
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0))
    t = torch.arange(50) * 2
    eps, score = analytic_eps(schedule), analytic_score(schedule)
    assert torch.allclose(score_from_eps(eps, schedule)(x, t), score(x, t), atol=1e-5)
    assert torch.allclose(eps_from_score(score, schedule)(x, t), eps(x, t), atol=1e-5)
    assert torch.allclose(eps_from_score(score_from_eps(eps, schedule), schedule)(x, t), eps(x, t), atol=1e-6)

    def ve_score(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:  # y = x_0 + sigma z ~ N(0, VAR0 + sigma^2)
        return -y / (VAR0 + sigma[:, None] ** 2)

    assert torch.allclose(eps_from_ve_score(ve_score, schedule)(x, t), eps(x, t), atol=1e-5)


def test_ddim_on_a_score_model_and_langevin_correction_on_an_eps_model() -> None:
    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    generator = torch.Generator().manual_seed(5)
    x_T = torch.randn(20_000, 2, generator=generator)
    samples = ddim_sample(eps_from_score(analytic_score(schedule), schedule), schedule, x_T.shape, steps=50, x_T=x_T)
    reference = ddim_sample(analytic_eps(schedule), schedule, x_T.shape, steps=50, x_T=x_T)
    assert torch.allclose(samples, reference, atol=1e-5)
    # DDIM-50 (Euler steps of the probability-flow ODE) shrinks the variance a little even with the exact eps
    assert float(samples.var(0).mean()) == pytest.approx(VAR0, rel=0.12)
    # Langevin at a fixed t pulls points started far away onto p_t = N(0, v_t I), with the eps model's score.
    t = 60
    start = torch.full((20_000, 2), 3.0)
    corrected = langevin_corrector(
        score_from_eps(analytic_eps(schedule), schedule), start, t, schedule, c=0.5, steps=150, generator=generator
    )
    v_t = float(vp_variance(schedule, torch.tensor([t]))[0])
    assert float(corrected.mean(0).abs().max()) < 0.05
    # stationary variance of the discretised chain: v / (1 - a / (4 v)), a = c sigma_t^2
    a = 0.5 * float(schedule.sigma(torch.tensor([t]))[0]) ** 2
    assert float(corrected.var(0).mean()) == pytest.approx(v_t / (1 - a / (4 * v_t)), rel=0.04)
