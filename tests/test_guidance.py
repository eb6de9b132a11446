"""Classifier guidance and classifier-free guidance."""

from __future__ import annotations

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.models.mlp import DenoiserMLP, NoisyClassifierMLP
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.guidance import ClassifierFreeGuidance, ClassifierGuidance, cfg_combine

SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)


def test_classifier_guidance_follows_its_equation() -> None:
    torch.manual_seed(0)
    model, classifier = DenoiserMLP(2, (16,), 100), NoisyClassifierMLP(2, 3, (8,), 100)
    x, t = torch.randn(10, 2), torch.randint(0, 100, (10,))
    guided = ClassifierGuidance(model, classifier, SCHEDULE, labels=2, scale=1.7)
    with torch.no_grad():  # works inside a no-grad sampler
        eps_hat = guided(x, t)
    x_in = x.clone().requires_grad_(True)
    log_p = torch.log_softmax(classifier(x_in, t), 1)[:, 2].sum()
    (grad,) = torch.autograd.grad(log_p, x_in)
    expected = model(x, t) - 1.7 * (1 - SCHEDULE.alpha_bar[t]).sqrt()[:, None] * grad
    torch.testing.assert_close(eps_hat, expected.detach())


class GaussianClassifier(torch.nn.Module):
    """Exact p(y | x_t) for two classes at means +-m with unit variance mixed equally (up to the noise)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha_bar = SCHEDULE.alpha_bar[t][:, None]
        centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]) * alpha_bar.sqrt()[..., None]
        distance = ((x[:, None, :] - centres) ** 2).sum(-1)
        return -0.5 * distance


def test_guidance_moves_samples_to_the_requested_class() -> None:
    def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Two unit-variance Gaussians at (+-2, 0): eps = -sqrt(1 - alpha_bar) * score of the mixture.
        alpha_bar = SCHEDULE.alpha_bar[t][:, None]
        centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]]) * alpha_bar.sqrt()[..., None]
        weights = torch.softmax(-0.5 * ((x[:, None, :] - centres) ** 2).sum(-1), dim=1)
        score = ((centres - x[:, None, :]) * weights[..., None]).sum(1)
        return -(1 - alpha_bar).sqrt() * score

    generator = torch.Generator().manual_seed(0)
    unguided = ddim_sample(exact_eps, SCHEDULE, (4000, 2), steps=50, generator=generator)
    assert 0.4 < (unguided[:, 0] > 0).float().mean() < 0.6
    guided = ClassifierGuidance(exact_eps, GaussianClassifier(), SCHEDULE, labels=1, scale=1.0)
    samples = ddim_sample(guided, SCHEDULE, (4000, 2), steps=50, generator=torch.Generator().manual_seed(0))
    assert (samples[:, 0] > 0).float().mean() > 0.97


def test_cfg_conventions_map_onto_each_other() -> None:
    """difflab's eps_u + w (eps_c - eps_u) equals the papers' (1 + w') eps_c - w' eps_u with w = 1 + w'."""
    eps_u, eps_c = torch.randn(5, 2), torch.randn(5, 2)
    for w_paper in (0.0, 0.5, 1.0, 3.0):
        torch.testing.assert_close(cfg_combine(eps_u, eps_c, 1 + w_paper), (1 + w_paper) * eps_c - w_paper * eps_u)
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 0.0), eps_u)
    torch.testing.assert_close(cfg_combine(eps_u, eps_c, 1.0), eps_c)


def test_classifier_free_guidance_batches_cond_and_null() -> None:
    torch.manual_seed(0)
    model = DenoiserMLP(2, (16,), 100, num_classes=4)
    x, t = torch.randn(6, 2), torch.randint(0, 100, (6,))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    null = torch.full((6,), 4)
    for w in (0.0, 1.0, 2.5):
        out = ClassifierFreeGuidance(model, labels, null_label=4, w=w)(x, t)
        expected = cfg_combine(model(x, t, null), model(x, t, labels), w)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_classifier_free_guidance_on_exact_conditional_and_unconditional_models() -> None:
    """Two overlapping 1-D classes N(-+0.5, 0.7^2), mixed equally; the model's exact eps is each class's Gaussian
    eps for labels 0 / 1 and the mixture's for the null label 2. DDIM with CFG at w = 0 draws the mixture (half
    on each side, std sqrt(0.7^2 + 0.5^2)), at w = 1 the requested class (mean 0.5, std 0.7, 76% above 0), and at
    w = 3 a sharper distribution pushed further to the requested side (the trade of diversity for fidelity)."""
    means, std, null = torch.tensor([-0.5, 0.5]), 0.7, 2

    def exact_eps(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        alpha_bar = SCHEDULE.alpha_bar[t][:, None]
        variance = alpha_bar * std**2 + 1 - alpha_bar
        centres = alpha_bar.sqrt() * means[None, :]
        weights = torch.softmax(-0.5 * (x - centres) ** 2 / variance, dim=1)  # p(class | x_t) of the mixture
        chosen = torch.nn.functional.one_hot(labels.clamp(max=1), 2).float()
        weights = torch.where((labels == null)[:, None], weights, chosen)
        score = (weights * (centres - x)).sum(1, keepdim=True) / variance
        return -(1 - alpha_bar).sqrt() * score

    def draw(w: float) -> torch.Tensor:
        guided = ClassifierFreeGuidance(exact_eps, 1, null_label=null, w=w)
        return ddim_sample(guided, SCHEDULE, (8000, 1), steps=100, generator=torch.Generator().manual_seed(0))

    unconditional, conditional, guided = draw(0.0), draw(1.0), draw(3.0)
    assert abs(float(unconditional.mean())) < 0.03 and abs(float(unconditional.std()) - (0.49 + 0.25) ** 0.5) < 0.03
    assert abs(float((unconditional > 0).float().mean()) - 0.5) < 0.03
    assert abs(float(conditional.mean()) - 0.5) < 0.03 and abs(float(conditional.std()) - 0.7) < 0.03
    assert abs(float((conditional > 0).float().mean()) - 0.7602) < 0.03  # Phi(0.5 / 0.7)
    assert float(guided.mean()) > 1.0 and float(guided.std()) < 0.6 and float((guided > 0).float().mean()) > 0.97
