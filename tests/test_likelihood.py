"""Exact likelihood by the probability-flow ODE, against analytic densities (Gaussian, Gaussian mixture,
an image-shaped Gaussian), and Hutchinson's divergence estimator against the exact divergence."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.sampling.likelihood import (
    LikelihoodSettings,
    batched_likelihood,
    bits_per_dim,
    dequantize,
    eps_and_divergence,
    probability_flow_likelihood,
)
from difflab.sampling.wrappers import DiffusionModel


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianMixture:
    """Data ``sum_k w_k N(m_k, s_k^2 I)``; its noised marginal ``sum_k w_k N(sqrt(a) m_k, (a s_k^2 + 1 - a) I)``
    is known exactly, and so its eps ``-sqrt(1 - a) grad log p_t`` (by autograd of the log-density).
    Works for any event shape: ``means`` is (K, *shape)."""

    def __init__(self, schedule: NoiseSchedule, means, stds, weights) -> None:
        self.continuous = DiffusionModel(None, schedule)
        self.schedule = schedule
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.log_weights = torch.as_tensor(weights, dtype=torch.float64).log()

    def log_density(self, x: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """log p(x) of the marginal with ``alpha_bar`` (scalar or (B,)); x: (B, *shape) -> (B,)."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=x.dtype).reshape(-1, 1, 1)
        flat = x.reshape(len(x), 1, -1)
        means = self.means.reshape(1, len(self.means), -1)
        stds = self.stds.reshape(1, len(self.stds), -1) if self.stds.ndim > 1 else self.stds.reshape(1, -1, 1)
        variance = alpha_bar * stds**2 + 1 - alpha_bar
        terms = -0.5 * (flat - alpha_bar.sqrt() * means) ** 2 / variance - 0.5 * torch.log(2 * math.pi * variance)
        return torch.logsumexp(terms.expand(-1, -1, flat.shape[-1]).sum(-1) + self.log_weights, dim=1)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.continuous.alpha_bar_at(t) if t.is_floating_point() else self.schedule.alpha_bar.double()[t]
        alpha_bar = alpha_bar.to(x.dtype)
        with torch.enable_grad():
            inner = x if x.requires_grad else x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.log_density(inner, alpha_bar).sum(), inner, create_graph=x.requires_grad)
        return -(1 - alpha_bar).reshape((-1,) + (1,) * (x.ndim - 1)).sqrt() * grad


def start_alpha_bar(schedule: NoiseSchedule, settings: LikelihoodSettings) -> float:
    return float(DiffusionModel(None, schedule).alpha_bar_at(settings.t_min * (schedule.num_timesteps - 1)))


@pytest.mark.parametrize(
    ("means", "stds", "weights"),
    [([[1.0, -2.0]], [0.5], [1.0]), ([[1.5, 0.0], [-1.0, 1.0]], [0.3, 0.6], [0.3, 0.7])],
    ids=["gaussian", "mixture"],
)
def test_likelihood_of_2d_gaussians_is_analytic(means, stds, weights) -> None:
    """Within 0.01 nats per dimension of the analytic log-density (measured: < 1e-3 nats)."""
    schedule = NoiseSchedule.cosine(1000)  # alpha_bar_T ~ 2e-9, so the N(0, I) prior is the true marginal
    model = GaussianMixture(schedule, means, stds, weights)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=generator, dtype=torch.float64) * 0.8 + torch.tensor(means[0])
    settings = LikelihoodSettings()
    result = probability_flow_likelihood(model, schedule, x, settings=settings, dtype=torch.float64)
    exact = model.log_density(x, start_alpha_bar(schedule, settings))
    assert (result.log_likelihood - exact).abs().max() / 2 < 0.01
    assert (result.log_likelihood - exact).abs().mean() < 1e-3
    # ... and of the data itself (alpha_bar = 1): t_min's noise is far below these scales
    assert (result.log_likelihood - model.log_density(x, 1.0)).abs().max() / 2 < 0.01
    assert result.divergence == "exact" and result.dims == 2 and 20 < result.nfe < 1000


def test_likelihood_matches_the_exact_flow_of_the_model_with_its_prior() -> None:
    """With the linear schedule alpha_bar_T = 4e-5, so N(0, I) is not quite the marginal at T; the ODE
    then gives the density of the flow pushed back from N(0, I), which is affine for Gaussian data:
    x_1 = sqrt(a_1) (m + (x / sqrt(a_0) - m) k), k = sqrt((s^2 + sigma_1^2) / (s^2 + sigma_0^2))."""
    schedule = NoiseSchedule.linear(1000)
    mean, std = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    model = GaussianMixture(schedule, [mean.tolist()], [std], [1.0])
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.6 + mean
    # the integration error shrinks with the tolerance (measured max errors 6e-4 at 1e-5, 7e-7 at 1e-7)
    for tolerance, bound in ((1e-5, 2e-3), (1e-7, 1e-5)):
        settings = LikelihoodSettings(rtol=tolerance, atol=tolerance)
        result = probability_flow_likelihood(model, schedule, x, settings=settings, dtype=torch.float64)
        a0 = start_alpha_bar(schedule, settings)
        a1 = float(DiffusionModel(None, schedule).alpha_bar_at(999))
        k = math.sqrt((std**2 + (1 - a1) / a1) / (std**2 + (1 - a0) / a0))
        x1 = math.sqrt(a1) * (mean + (x / math.sqrt(a0) - mean) * k)
        prior = -math.log(2 * math.pi) - 0.5 * (x1**2).sum(1)
        flow = prior + 2 * math.log(math.sqrt(a1) * k / math.sqrt(a0))
        assert (result.log_likelihood - flow).abs().max() < bound
        assert (result.prior_log_prob - prior).abs().max() < bound


def test_image_likelihood_with_hutchinson_probes() -> None:
    """(B, 1, 4, 4) images from a Gaussian with a different std per pixel: the eps Jacobian is diagonal,
    so Rademacher probes (v_i^2 = 1) give the divergence exactly, and Gaussian probes are unbiased."""
    schedule = NoiseSchedule.cosine(1000)
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(1, 1, 4, 4, generator=generator, dtype=torch.float64) * 0.3
    stds = torch.rand(1, 1, 4, 4, generator=generator, dtype=torch.float64) * 0.4 + 0.2
    model = GaussianMixture(schedule, mean, stds, [1.0])
    x = mean[0] + stds[0] * torch.randn(64, 1, 4, 4, generator=generator, dtype=torch.float64)
    rademacher = LikelihoodSettings(divergence="hutchinson", probe="rademacher")
    result = probability_flow_likelihood(model, schedule, x, settings=rademacher, dtype=torch.float64)
    exact = model.log_density(x, start_alpha_bar(schedule, rademacher))
    assert result.dims == 16 and result.divergence == "hutchinson (rademacher)"
    assert (result.log_likelihood - exact).abs().max() / 16 < 0.01
    gaussian = LikelihoodSettings(divergence="hutchinson", probe="gaussian")
    noisy = batched_likelihood(
        model, schedule, x, batch_size=32, settings=gaussian, dtype=torch.float64, generator=generator
    )
    assert len(noisy.log_likelihood) == 64
    errors = noisy.log_likelihood - exact
    assert errors.abs().mean() > 1e-3  # one Gaussian probe per sample: a noisy estimate ...
    assert abs(float(errors.mean())) < 4 * float(errors.std()) / math.sqrt(64)  # ... without bias
    bits = bits_per_dim(result.nll.mean(), 16)
    assert bits == pytest.approx(float(-exact.mean()) / (16 * math.log(2)) + math.log2(127.5), abs=0.01)


def test_hutchinson_estimates_the_divergence_of_a_small_conv_net() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
    ).double()
    model = DiffusionModel(lambda x, t: net(x), NoiseSchedule.linear(100))
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    t = torch.zeros(4)
    _, exact = eps_and_divergence(model, x, t, None)
    probes = torch.randint(0, 2, (400, 4, 1, 6, 6)).double() * 2 - 1
    estimates = torch.stack([eps_and_divergence(model, x, t, v)[1] for v in probes])
    spread = estimates.std(0) / math.sqrt(len(probes))
    assert ((estimates.mean(0) - exact).abs() < 4 * spread + 1e-9).all()
    assert (estimates.std(0) > 0).all()  # a conv Jacobian is not diagonal: single probes differ


def test_likelihood_runs_on_an_untrained_image_network_in_float32() -> None:
    """The image path on (B, C, H, W) tensors of a real (if untrained) network: finite, reproducible."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 3, padding=1))
    schedule = NoiseSchedule.linear(50, 1e-3, 0.3)
    images = torch.randint(0, 256, (3, 1, 8, 8))
    x = dequantize(images, torch.Generator().manual_seed(0))
    assert x.min() >= -1 and x.max() < 1 + 1 / 127.5
    settings = LikelihoodSettings(rtol=1e-4, atol=1e-4)
    runs = [
        probability_flow_likelihood(
            lambda z, t: net(z), schedule, x, settings=settings, generator=torch.Generator().manual_seed(1)
        )
        for _ in range(2)
    ]
    assert torch.isfinite(runs[0].log_likelihood).all()
    torch.testing.assert_close(runs[0].log_likelihood, runs[1].log_likelihood)
    summary = runs[0].summary()
    assert summary["dims"] == 64 and summary["divergence"] == "hutchinson (rademacher)" and summary["rtol"] == 1e-4


def test_bits_per_dim_convention() -> None:
    """A uniform density on the 256 bins is 8 bits per dimension: with x = (k + u) / 127.5 - 1 its
    density is 127.5^D / 256^D ... i.e. nll_x = D log(256 / 127.5)."""
    dims = 784
    assert bits_per_dim(dims * math.log(256 / 127.5), dims) == pytest.approx(8.0)
    assert bits_per_dim(dims * math.log(2), dims, bin_width=2 / 256) == pytest.approx(8.0)  # Song et al.'s scaling
    with pytest.raises(ConfigError):
        dequantize(torch.tensor([256]))


def test_bad_likelihood_settings() -> None:
    with pytest.raises(ConfigError, match="divergence"):
        LikelihoodSettings(divergence="trace")
    with pytest.raises(ConfigError, match="probe"):
        LikelihoodSettings(probe="sphere")
    with pytest.raises(ConfigError, match="t_min"):
        LikelihoodSettings(t_min=1.0)
