"""The closed forms of diffusion for Gaussian data (difflab.diffusion.gaussian) against direct formulas, each other,
and DDIM's many-step limit."""

from __future__ import annotations

import math

import torch

from difflab.diffusion.gaussian import GaussianData
from difflab.diffusion.schedule import NoiseSchedule
from difflab.sampling.ddim import ddim_sample

MEAN = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
COVARIANCE = torch.tensor([[0.5, 0.2, 0.0], [0.2, 0.3, -0.1], [0.0, -0.1, 0.05]], dtype=torch.float64)


def gaussian() -> GaussianData:
    eigenvalues, basis = torch.linalg.eigh(COVARIANCE)
    return GaussianData(MEAN, eigenvalues, basis)


def test_fit_recovers_the_mean_and_covariance() -> None:
    samples = MEAN + torch.randn(200_000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) @ (
        torch.linalg.cholesky(COVARIANCE).T
    )
    fitted = GaussianData.fit(samples.reshape(-1, 3, 1, 1))  # any shape after the first axis
    covariance = fitted.basis @ torch.diag(fitted.eigenvalues) @ fitted.basis.T
    torch.testing.assert_close(fitted.mean, MEAN, atol=5e-3, rtol=0)
    torch.testing.assert_close(covariance, COVARIANCE, atol=5e-3, rtol=0)


def test_denoiser_eps_and_score_against_direct_formulas() -> None:
    """E[x_0 | x_t] = m + sqrt(a) S (a S + (1 - a) I)^-1 (x_t - sqrt(a) m), solved directly; eps from it; the VE score
    -(S + s^2 I)^-1 (x - m); and eps(x_t) = -sigma score(x_t / sqrt(a), sigma) with sigma^2 = (1 - a) / a."""
    model = gaussian()
    x_t = torch.randn(64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha_bar = torch.rand(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.98 + 0.01
    for a, x in zip(alpha_bar, x_t, strict=True):
        system = a * COVARIANCE + (1 - a) * torch.eye(3, dtype=torch.float64)
        x0 = MEAN + a.sqrt() * COVARIANCE @ torch.linalg.solve(system, x - a.sqrt() * MEAN)
        torch.testing.assert_close(model.x0_mean(x[None], a)[0], x0)
        torch.testing.assert_close(model.eps(x[None], a)[0], (x - a.sqrt() * x0) / (1 - a).sqrt())
        sigma = ((1 - a) / a).sqrt()
        blurred = COVARIANCE + sigma**2 * torch.eye(3, dtype=torch.float64)
        score = model.score(x[None] / a.sqrt(), sigma)[0]
        torch.testing.assert_close(score, -torch.linalg.solve(blurred, x / a.sqrt() - MEAN))
        torch.testing.assert_close(model.eps(x[None], a)[0], -sigma * score)
    # a batch with one alpha_bar per row is the rows one by one; a float applies to every row
    batched = model.eps(x_t, alpha_bar)
    torch.testing.assert_close(batched[5], model.eps(x_t[5:6], float(alpha_bar[5]))[0])


def test_flow_is_the_limit_of_ddim_and_keeps_the_marginals() -> None:
    """The exact map composes (a -> b -> c is a -> c), carries N(sqrt(a) m, a S + (1 - a) I) to the marginal at a', and
    is what DDIM with the exact eps converges to as its steps shrink (first order: 4x the steps, about 1/4 the
    error)."""
    model = gaussian()
    schedule = NoiseSchedule.cosine(1000)
    alpha_bar = schedule.alpha_bar.double()
    x_T = torch.randn(20_000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a_start, a_mid = float(alpha_bar[900]), float(alpha_bar[400])
    start = (
        math.sqrt(a_start) * MEAN
        + x_T @ torch.linalg.cholesky(a_start * COVARIANCE + (1 - a_start) * torch.eye(3, dtype=torch.float64)).T
    )
    direct = model.flow(start, a_start, 1.0)
    torch.testing.assert_close(model.flow(model.flow(start, a_start, a_mid), a_mid, 1.0), direct)
    torch.testing.assert_close(direct.mean(0), MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(direct.T), COVARIANCE, atol=0.02, rtol=0)

    def ddim_error(steps: int) -> float:
        timesteps = torch.linspace(900, 0, steps).round().long().unique().flip(0).tolist()
        out = ddim_sample(
            lambda x, t: model.eps(x, alpha_bar[t]), schedule, (1000, 3), timesteps=timesteps, x_T=start[:1000]
        )
        return float((out - direct[:1000]).abs().max())

    coarse, fine = ddim_error(50), ddim_error(200)
    assert fine < 0.4 * coarse and fine < 0.02


def test_isotropic_eps_and_flow_against_their_closed_forms() -> None:
    """For N(m, s^2 I): eps(x_t) = sqrt(1 - a) (x_t - sqrt(a) m) / (a s^2 + 1 - a), and the flow from the data
    x_a = sqrt(a) m + sqrt(a s^2 + 1 - a) (x_0 - m) / s."""
    mean, std = torch.tensor([1.0, -2.0]), 0.5
    model = GaussianData.isotropic(mean, std)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3))
    a = torch.rand(32, generator=torch.Generator().manual_seed(4)) * 0.98 + 0.01
    column = a[:, None]
    expected_eps = (1 - column).sqrt() * (x - column.sqrt() * mean) / (column * std**2 + 1 - column)
    torch.testing.assert_close(model.eps(x, a), expected_eps)
    expected_flow = column.sqrt() * mean + (column * std**2 + 1 - column).sqrt() * (x - mean) / std
    torch.testing.assert_close(model.flow(x, 1.0, a), expected_flow)
