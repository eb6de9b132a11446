"""Training objectives of diffusion models and their noisy classifiers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.data.batches import DataSketch, ShuffledBatches, data_sketch
from difflab.diffusion.prediction import PREDICTIONS, v_target
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import learned_log_variance, reverse_mean, split_output, vlb_terms
from difflab.errors import ConfigError
from difflab.seeding import batch_randint, batch_randn, mix_seed


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``t ~ U{0, ..., T-1}``, shape (B,). Drawn per example (see ``seeding.batch_randint``), so a loss split
    over processes or micro-batches sees the timesteps the whole batch would."""
    return batch_randint(num_timesteps, batch, generator, device)


def _noised(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    labels: torch.Tensor | None,
    label_dropout: float,
    null_label: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(t, eps, x_t, labels)``: t ~ U{0..T-1}, eps ~ N(0, I), x_t ~ q(x_t | x_0), labels with dropout applied.
    x0: (B, ...), labels: (B,) or None -> t (B,) int64, eps and x_t (B, ...), labels (B,) or None."""
    t = sample_timesteps(x0.shape[0], schedule.num_timesteps, generator, x0.device)
    noise = batch_randn(tuple(x0.shape), generator, x0.device)
    x_t = schedule.q_sample(x0, t, noise)
    if labels is not None and label_dropout > 0:
        if null_label is None:
            raise ValueError("label_dropout needs the null label")
        # Per-example uniforms as Phi(z) of per-example normals, so data-parallel ranks drop the global batch's labels.
        uniform = 0.5 * (1 + torch.erf(batch_randn((labels.shape[0],), generator, labels.device) / 2**0.5))
        labels = torch.where(uniform < label_dropout, torch.full_like(labels, null_label), labels)
    return t, noise, x_t, labels


LOSS_WEIGHTINGS = ("none", "min_snr")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Options of the denoising objective (the defaults are Ho et al.'s eps-prediction ``L_simple``).

    ``prediction``: what the network predicts, ``eps`` or ``v`` (Salimans & Ho 2022,
    ``v = sqrt(a_t) eps - sqrt(1 - a_t) x_0``; the network is wrapped in
    :class:`~difflab.diffusion.prediction.VPrediction` and the loss is ``|| v - v_theta ||^2``, which is the eps
    loss weighted by ``1 / a_t = 1 + 1 / SNR_t``: the high-noise timesteps count more).

    ``weighting``: ``none`` (every timestep weighs 1) or ``min_snr``, Hang et al. 2023's Min-SNR-gamma weighting
    of the eps loss, ``w_t = min(SNR_t, gamma) / SNR_t`` with ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``
    (``min_snr_gamma``; 5 in the paper): low-noise timesteps, whose eps loss is large but easy, are weighed down
    (the v loss is weighed by ``min(SNR_t, gamma) / (SNR_t + 1)``, the same weight in x_0 terms).
    ``input_perturbation``: Ning et al. 2023's DDPM-IP; the network sees
    ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) (eps + gamma xi)`` with a fresh ``xi ~ N(0, I)`` and still predicts eps,
    which simulates the error of the sampler's own x_t (exposure bias); ``gamma`` 0.1 in the paper, 0 = off.
    """

    weighting: str = "none"
    min_snr_gamma: float = 5.0
    input_perturbation: float = 0.0
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"objective.prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.weighting not in LOSS_WEIGHTINGS:
            choices = ", ".join(LOSS_WEIGHTINGS)
            raise ConfigError(f"objective.weighting must be one of {choices}, got {self.weighting!r}")
        if self.min_snr_gamma <= 0:
            raise ConfigError("objective.min_snr_gamma must be > 0")
        if not 0 <= self.input_perturbation < 1:
            raise ConfigError("objective.input_perturbation must be in [0, 1)")


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma weights, shape of t: of the eps loss ``min(SNR_t, gamma) / SNR_t`` = ``min(1, gamma / SNR_t)``;
    of the v loss ``min(SNR_t, gamma) / (SNR_t + 1)`` (Hang et al. 2023, sec. 3.4).

    ``SNR_t = alpha_bar_t / (1 - alpha_bar_t)``, computed in float64 from the betas (float32 ``alpha_bar``
    keeps only a few digits of ``1 - alpha_bar`` near t = 0).
    """
    alpha_bar, one_minus_alpha_bar = schedule.precise_alpha_bar()
    inverse_snr = one_minus_alpha_bar / alpha_bar
    weights = (gamma * inverse_snr).clamp(max=1.0)
    if prediction == "v":
        weights = weights / (1 + inverse_snr)  # min(SNR, gamma) / SNR * SNR / (SNR + 1)
    return weights.to(t.device)[t].float()


def epsilon_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    objective: ObjectiveConfig | None = None,
) -> torch.Tensor:
    """Ho et al.'s ``L_simple = E_{t, x_0, eps} || eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t) ||^2``.

    x0: (B, ...); the mean squared error over all elements, a scalar. ``labels`` (B,) is passed to conditional
    models as ``model(x_t, t, labels)``; with ``label_dropout = p`` each label is replaced by
    ``null_label`` with probability p (classifier-free guidance training, Ho & Salimans 2022).
    ``objective`` adds the Min-SNR weighting and/or the input perturbation (:class:`ObjectiveConfig`); the
    weighted loss is ``mean_b(w_{t_b} mean_pixels (eps_b - eps_theta_b)^2)``. With ``objective.prediction = "v"``
    the model is a :class:`~difflab.diffusion.prediction.VPrediction` and the target is v of its raw output.
    """
    objective = objective or ObjectiveConfig()
    t, noise, x_t, labels = _noised(schedule, x0, generator, labels, label_dropout, null_label)
    if objective.input_perturbation > 0:
        # DDPM-IP: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) (eps + gamma xi); the target stays eps
        extra = batch_randn(tuple(x0.shape), generator, x0.device)
        x_t = schedule.q_sample(x0, t, noise + objective.input_perturbation * extra)
    inputs = (x_t, t) if labels is None else (x_t, t, labels)
    if objective.prediction == "v":
        prediction = model(*inputs, raw=True)
        # The float32 alpha_bar that q_sample used for x_t, so that (x_t, v) is an exact pair of the same process.
        alpha_bar = schedule.alpha_bar.to(x0.device)[t].reshape((-1,) + (1,) * (x0.ndim - 1))
        target = v_target(x0, noise, alpha_bar)
    else:
        prediction, target = model(*inputs), noise
    if objective.weighting == "none":
        return F.mse_loss(prediction, target)
    per_example = (prediction.float() - target).pow(2).flatten(1).mean(dim=1)
    weights = min_snr_weights(schedule, t, objective.min_snr_gamma, objective.prediction)
    return (weights * per_example).mean()


def hybrid_loss(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    vlb_weight: float = 0.001,
    decoder: str = "discretized",
    levels: int = 256,
) -> torch.Tensor:
    """Nichol & Dhariwal's ``L_hybrid = L_simple + lambda L_vlb`` for a model returning ``[eps, v]`` (B, 2C, ...).

    ``L_simple`` is the eps MSE of the first C channels. ``L_vlb`` trains only the variance: the term ``L_t``
    (:func:`~difflab.diffusion.vlb.vlb_terms`, bits/dim, the decoder NLL at t = 0) is evaluated with the mean
    computed from a *detached* eps (stop-gradient, their sec. 3.1) and the learned variance of v. As
    ``L_vlb = sum_t L_t = T E_t[L_t]``, the sampled term is weighted by ``vlb_weight * T`` (with lambda = 0.001 and
    T = 1000 this is their code's ``mse + vb``). ``decoder``: ``discretized`` for images in [-1, 1] quantised to
    ``levels`` gray levels (256 for 8-bit), ``gaussian`` for continuous data such as latents. Noise, timesteps and
    label dropout as :func:`epsilon_loss`. x0: (B, C, ...), labels: (B,) or None; returns the loss, a scalar.
    """
    t, noise, x_t, labels = _noised(schedule, x0, generator, labels, label_dropout, null_label)
    output = model(x_t, t) if labels is None else model(x_t, t, labels)
    eps, values = split_output(output, x_t)
    if values is None:
        raise ConfigError("the hybrid loss needs a learned-variance model (output channels = 2 x input channels)")
    simple = F.mse_loss(eps, noise)
    mean = reverse_mean(schedule, eps.detach(), x_t, t)
    log_variance = learned_log_variance(schedule, values, t)
    vlb = vlb_terms(schedule, x0, x_t, t, mean, log_variance, decoder, levels)
    return simple + vlb_weight * schedule.num_timesteps * vlb.mean()


def noisy_classifier_loss(
    classifier: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Cross-entropy of ``f_phi(y | x_t, t)`` on points noised to a uniform random t (Dhariwal & Nichol).
    x0: (B, ...), e.g. points (B, D); labels: (B,) int64 class indices; returns the batch mean, a scalar."""
    t = sample_timesteps(x0.shape[0], schedule.num_timesteps, generator, x0.device)
    noise = batch_randn(tuple(x0.shape), generator, x0.device)
    return F.cross_entropy(classifier(schedule.q_sample(x0, t, noise), t), labels)


class NoisyPairs:
    """The reference's large-batch training set: ``(x_t, t, eps)`` triples kept in memory.

    All ``N x T`` pairs of a data point and a timestep (or a random ``subset`` of them) are noised once
    and re-noised every ``refresh_every`` epochs; each epoch visits them in a fresh random order in
    batches of ``batch_size``. ``batch(step)`` returns ``(x_t, t, eps)``; everything is a function of
    ``(seed, step)``, so resuming reproduces the same sequence.
    """

    def __init__(
        self,
        x0: torch.Tensor,
        schedule: NoiseSchedule,
        batch_size: int,
        refresh_every: int = 100,
        subset: int = 0,
        seed: int = 0,
    ) -> None:
        if refresh_every < 1:
            raise ConfigError(f"refresh_every must be >= 1, got {refresh_every}")
        total = x0.shape[0] * schedule.num_timesteps
        if subset < 0:
            raise ConfigError(f"pairs subset must be >= 0 (0 = all N x T pairs), got {subset}")
        self.x0 = x0
        self.schedule = schedule
        self.size = total if subset == 0 else min(subset, total)
        self.batch_size = batch_size
        self.refresh_every = refresh_every
        self.seed = seed
        self._refresh = -1
        self._pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._order = ShuffledBatches((torch.arange(self.size),), batch_size, seed=mix_seed(seed, 0, 11))

    @property
    def steps_per_epoch(self) -> int:
        return self._order.steps_per_epoch

    def sketch(self) -> DataSketch:
        """:func:`~difflab.data.batches.data_sketch` of the data points the pairs are made from."""
        return data_sketch((self.x0,))

    def _build(self, refresh: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``size`` pairs noised afresh for refresh ``refresh``: ``(x_t, t, eps)`` with x_t and eps (size, ...)
        like the rows of ``x0``, t (size,) int64, all on ``x0``'s device."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, refresh, 5))
        n, steps = self.x0.shape[0], self.schedule.num_timesteps
        if self.size == n * steps:
            flat = torch.arange(n * steps)
        else:
            flat = torch.randperm(n * steps, generator=generator)[: self.size]
        point, t = flat % n, flat // n
        eps = torch.randn((self.size,) + tuple(self.x0.shape[1:]), generator=generator).to(self.x0.device)
        t = t.to(self.x0.device)
        x_t = self.schedule.q_sample(self.x0[point.to(self.x0.device)], t, eps)
        return x_t, t, eps

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``step``: ``(x_t, t, eps)``, x_t and eps (batch_size, ...), t (batch_size,) int64."""
        refresh = (step // self.steps_per_epoch) // self.refresh_every
        if refresh != self._refresh:
            self._pairs = self._build(refresh)
            self._refresh = refresh
        assert self._pairs is not None
        (index,) = self._order.batch(step)
        index = index.to(self.x0.device)
        return tuple(p[index] for p in self._pairs)  # type: ignore[return-value]


def pairs_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """MSE of the eps prediction on precomputed ``(x_t, t, eps)`` pairs: x_t, eps (B, ...), t (B,); a scalar."""
    x_t, t, eps = batch
    return F.mse_loss(model(x_t, t), eps)
