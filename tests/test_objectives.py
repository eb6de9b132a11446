"""The eps objective's options: Min-SNR-gamma weighting (Hang et al. 2023) and input perturbation (DDPM-IP,
Ning et al. 2023), against closed forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difflab.diffusion.objectives import ObjectiveConfig, epsilon_loss, min_snr_weights
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.seeding import batch_randint, batch_randn


class Recorder(torch.nn.Module):
    """Returns a fixed multiple of its input and remembers what it saw."""

    def __init__(self, scale: float = 0.0) -> None:
        super().__init__()
        self.scale = scale
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.scale * x


def _draws(schedule: NoiseSchedule, x0: torch.Tensor, seed: int, extra: bool):
    """The t, eps (and xi) that epsilon_loss draws from a generator seeded ``seed``, in its order."""
    generator = torch.Generator().manual_seed(seed)
    t = batch_randint(schedule.num_timesteps, x0.shape[0], generator, x0.device)
    noise = batch_randn(tuple(x0.shape), generator, x0.device)
    xi = batch_randn(tuple(x0.shape), generator, x0.device) if extra else None
    return t, noise, xi


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_min_snr_weights_are_min_snr_gamma_over_snr(kind: str) -> None:
    schedule = NoiseSchedule.cosine(1000) if kind == "cosine" else NoiseSchedule.linear(1000)
    t = torch.arange(1000)
    alpha_bar = torch.cumprod(1 - schedule.betas.double(), 0)
    snr = alpha_bar / (1 - alpha_bar)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    weights = min_snr_weights(schedule, t, 5.0)
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=0)
    assert weights.max() <= 1 and weights[-1] == 1  # full weight where SNR < gamma (high noise)
    assert weights[0] < 1e-3  # t = 0: SNR ~ 1e4, weighed down


def test_default_objective_is_l_simple_bit_for_bit() -> None:
    schedule = NoiseSchedule.linear(100)
    x0 = torch.randn(16, 1, 4, 4)
    model = Recorder(0.3)
    plain = epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(3))
    same = epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(3), objective=ObjectiveConfig())
    t, noise, _ = _draws(schedule, x0, 3, extra=False)
    x_t = schedule.q_sample(x0, t, noise)
    assert torch.equal(plain, same)
    torch.testing.assert_close(plain, F.mse_loss(0.3 * x_t, noise))


def test_min_snr_loss_is_the_weighted_mean_of_per_example_errors() -> None:
    schedule = NoiseSchedule.cosine(1000)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    objective = ObjectiveConfig(weighting="min_snr", min_snr_gamma=5.0)
    loss = epsilon_loss(Recorder(0.5), schedule, x0, torch.Generator().manual_seed(7), objective=objective)
    t, noise, _ = _draws(schedule, x0, 7, extra=False)
    x_t = schedule.q_sample(x0, t, noise)
    per_example = ((0.5 * x_t - noise) ** 2).mean(dim=(1, 2, 3))
    alpha_bar = torch.cumprod(1 - schedule.betas.double(), 0)[t]
    weight = torch.clamp(5.0 * (1 - alpha_bar) / alpha_bar, max=1.0).float()
    torch.testing.assert_close(loss, (weight * per_example).mean())


def test_input_perturbation_noises_the_input_but_not_the_target() -> None:
    schedule = NoiseSchedule.linear(100)
    x0 = torch.randn(32, 1, 4, 4)
    model = Recorder(0.0)  # predicts 0, so the loss is the mean square of the target
    objective = ObjectiveConfig(input_perturbation=0.1)
    loss = epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(11), objective=objective)
    t, noise, xi = _draws(schedule, x0, 11, extra=True)
    torch.testing.assert_close(model.seen[0], schedule.q_sample(x0, t, noise + 0.1 * xi))
    torch.testing.assert_close(loss, noise.pow(2).mean())  # the target is eps, not eps + gamma xi


@pytest.mark.parametrize(
    "options", [{"weighting": "p2"}, {"min_snr_gamma": 0.0}, {"input_perturbation": -0.1}, {"input_perturbation": 1.0}]
)
def test_bad_objective_options_are_config_errors(options: dict) -> None:
    with pytest.raises(ConfigError):
        ObjectiveConfig(**options)


def test_label_dropout_swaps_a_fraction_p_of_labels_for_the_null_label() -> None:
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes the null label with
    probability p, independently; the others reach the model unchanged; p = 0 changes nothing; the same seed
    drops the same examples."""
    seen: list[torch.Tensor] = []

    def model(x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(labels.clone())
        return torch.zeros_like(x_t)

    schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
    n, p, null = 20_000, 0.2, 10
    labels = torch.arange(n) % 10
    x0 = torch.zeros(n, 2)
    epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(0), labels, label_dropout=p, null_label=null)
    dropped = seen[-1] == null
    standard_error = (p * (1 - p) / n) ** 0.5
    assert abs(float(dropped.float().mean()) - p) < 4 * standard_error
    assert torch.equal(seen[-1][~dropped], labels[~dropped])
    for digit in range(10):  # independent of the class
        share = float(dropped[labels == digit].float().mean())
        assert abs(share - p) < 4 * (p * (1 - p) / (n / 10)) ** 0.5
    epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(0), labels, label_dropout=p, null_label=null)
    assert torch.equal(seen[-1] == null, dropped)
    epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(0), labels, label_dropout=0.0, null_label=null)
    assert torch.equal(seen[-1], labels)
    with pytest.raises(ValueError, match="null label"):
        epsilon_loss(model, schedule, x0, torch.Generator().manual_seed(0), labels, label_dropout=p)


class TwoPointPosterior(torch.nn.Module):
    """The exact ``p(y | x_t, t)`` for data at -m (label 0) and +m (label 1), equally likely: logits
    ``[0, 2 sqrt(a_t) m x_t / (1 - a_t)]``, the log-ratio of ``N(+-sqrt(a_t) m, 1 - a_t)``. ``use_t=False`` is a
    classifier that ignores t and assumes the middle timestep's a_t."""

    def __init__(self, schedule: NoiseSchedule, m: float, use_t: bool = True) -> None:
        super().__init__()
        self.alpha_bar, self.m, self.use_t = schedule.alpha_bar.double(), m, use_t

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar[t if self.use_t else torch.full_like(t, len(self.alpha_bar) // 2)]
        log_ratio = 2 * a.sqrt() * self.m * x[:, 0].double() / (1 - a)
        return torch.stack([torch.zeros_like(log_ratio), log_ratio], 1)


def test_noisy_classifier_loss_is_the_conditional_entropy_under_the_exact_posterior() -> None:
    """With the Bayes classifier the loss is E_t H(y | x_t): per t, with r = a_t m^2 / (1 - a_t) and u ~ N(0, 1),
    H_t = E softplus(-2 r - 2 sqrt(r) u) (Gauss-Hermite quadrature); any other classifier scores higher."""
    import numpy as np

    from difflab.diffusion.objectives import noisy_classifier_loss

    schedule, m, n = NoiseSchedule.linear(200), 0.5, 400_000
    labels = torch.arange(n) % 2
    x0 = (labels.double() * 2 - 1).mul(m).float()[:, None]
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    r = (schedule.alpha_bar.double() * m**2 / (1 - schedule.alpha_bar.double())).numpy()[:, None]
    entropy = (weights * np.logaddexp(0, -2 * r - 2 * np.sqrt(r) * nodes)).sum(1) / weights.sum()
    expected = float(entropy.mean())  # t ~ U{0, ..., T-1}
    generator = torch.Generator().manual_seed(3)
    loss = float(noisy_classifier_loss(TwoPointPosterior(schedule, m), schedule, x0, labels, generator))
    # Monte Carlo over 400k (t, eps) draws: the per-sample loss has sd < 0.7, so the mean's sd is < 0.0012
    assert loss == pytest.approx(expected, abs=0.004), (loss, expected)
    assert 0.05 < expected < 0.69  # between certain (early t) and a coin toss (late t)
    generator = torch.Generator().manual_seed(3)
    blind = float(noisy_classifier_loss(TwoPointPosterior(schedule, m, False), schedule, x0, labels, generator))
    assert blind > loss + 0.02, (blind, loss)  # the same draws: the classifier that ignores t pays for it
