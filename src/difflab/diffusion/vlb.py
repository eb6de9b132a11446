"""The variational bound of a discrete diffusion model and the learned reverse variance (Ho et al. 2020, sec. 3;
Nichol & Dhariwal 2021, "Improved DDPM", sec. 3.1).

The negative ELBO of a T-step model is ``L_vlb = L_T + sum_{t>=1} L_{t-1} + L_0`` with

- ``L_T = KL(q(x_T | x_0) || N(0, I))`` (the prior term, no parameters),
- ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))`` (two Gaussians, closed form),
- ``L_0 = -log p_theta(x_0 | x_1)``: for 8-bit images in [-1, 1] the discretised Gaussian of Ho et al. eq. 13
  (each of the 256 levels owns a bin of width 2/255, the end bins reach to -inf / +inf; images of L levels, such
  as sklearn's 17-level digits, bins of width 2/(L-1)); for continuous data (e.g. VAE latents) the Gaussian
  density.

Indices are 0-based as everywhere in difflab: index ``t`` is DDPM's step ``t + 1``, so the decoder term sits at
index 0 and ``L_T`` is taken at index ``T - 1``. Every term is reported per dimension in bits (nats / ln 2), so
``L_vlb`` is in bits/dim.

The learned variance (Nichol & Dhariwal eq. 15) interpolates in the log domain between the two fixed choices:
``Sigma_theta = exp(v log beta_t + (1 - v) log beta_tilde_t)`` with ``v = (out + 1) / 2`` for the network's extra
output channels ``out`` (as in their code, so ``out`` in [-1, 1] spans the range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError

LN2 = math.log(2.0)
DECODERS = ("discretized", "gaussian")
FIXED_VARIANCES = ("beta", "posterior")


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` per element, in nats (all arguments broadcast):

    ``0.5 (logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2 - 1)``.
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_ndtr_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """``log(Phi(upper) - Phi(lower))`` for ``upper > lower``, accurate in both tails.

    ``log Phi(u) + log1p(-exp(log Phi(l) - log Phi(u)))``, evaluated on the mirrored pair
    ``(-lower, -upper)`` when both lie in the upper tail (where ``Phi`` rounds to 1).
    """
    mirrored = lower > 0
    hi = torch.where(mirrored, -lower, upper)
    lo = torch.where(mirrored, -upper, lower)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    gap = (log_lo - log_hi).clamp(max=-1e-12)  # < 0 whenever the bin has positive width
    return log_hi + torch.log(-torch.expm1(gap))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, levels: int = 256
) -> torch.Tensor:
    """``log p(x)`` per element of quantised data rescaled to [-1, 1] under a Gaussian discretised to ``levels`` bins
    (Ho et al. 2020, eq. 13), in nats.

    x: data on the grid ``2 k / (levels - 1) - 1``; mean, log_scale (log standard deviation) broadcast to x.
    The bin of ``x`` is ``[x - 1/(levels-1), x + 1/(levels-1)]``, widened to ``-inf`` at ``x = -1`` and ``+inf`` at
    ``x = 1``, so the probabilities of the levels sum to one.
    """
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_scale)
    centred = x - mean
    upper = inv_std * (centred + half_bin)
    lower = inv_std * (centred - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # the bottom bin: P(X <= x + half_bin)
    log_survival_lower = torch.special.log_ndtr(-lower)  # the top bin: P(X >= x - half_bin)
    log_middle = _log_ndtr_difference(upper, lower)
    edge = 1.0 - half_bin / 2
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_survival_lower, log_middle))


def gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, e^log_variance)`` per element, in nats (the decoder of continuous data)."""
    return -0.5 * (math.log(2 * math.pi) + log_variance + (x - mean) ** 2 * torch.exp(-log_variance))


def fixed_log_variance(schedule: NoiseSchedule, kind: str) -> torch.Tensor:
    """log sigma_t^2 of a fixed-variance reverse process, shape (T,).

    ``beta``: sigma_t^2 = beta_t (Ho et al.'s "fixed large"), except at index 0 where beta_tilde_1 stands in so the
    decoder term is not dominated by the tiny beta_1 (improved DDPM's convention); ``posterior``:
    sigma_t^2 = beta_tilde_t with the same substitution at index 0 (``posterior_log_variance_clipped``).
    """
    if kind == "posterior":
        return schedule.posterior_log_variance_clipped
    if kind == "beta":
        if schedule.num_timesteps == 1:
            return torch.log(schedule.betas)
        return torch.log(torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]))
    raise ConfigError(f"fixed variance must be one of {', '.join(FIXED_VARIANCES)}, got {kind!r}")


def learned_log_variance(schedule: NoiseSchedule, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Nichol & Dhariwal eq. 15: ``log Sigma = v log beta_t + (1 - v) log beta_tilde_t``, ``v = (values + 1) / 2``.

    values: the network's variance channels (B, ...), nominally in [-1, 1]; t: (B,) indices into ``schedule``
    (a respaced schedule interpolates between *its* betas and beta_tildes). ``log beta_tilde`` is the clipped
    one (``beta_tilde_1`` at index 0). Returns log-variances of the shape of ``values``.
    """
    min_log = NoiseSchedule.gather(schedule.posterior_log_variance_clipped, t, values.ndim)
    max_log = NoiseSchedule.gather(torch.log(schedule.betas), t, values.ndim)
    fraction = (values + 1) / 2
    return fraction * max_log + (1 - fraction) * min_log


def split_output(output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A model output (B, C, ...) or (B, 2C, ...) for an input x (B, C, ...) -> ``(eps, variance values or None)``."""
    channels = x.shape[1]
    if output.shape == x.shape:
        return output, None
    if output.shape[1] == 2 * channels and output.shape[2:] == x.shape[2:]:
        return output[:, :channels], output[:, channels:]
    raise ValueError(
        f"a model output of shape {tuple(output.shape)} fits neither eps nor [eps, v] for {tuple(x.shape)}"
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def reverse_mean(
    schedule: NoiseSchedule,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    clip_x0: float | None = None,
) -> torch.Tensor:
    """``mu_theta(x_t, t) = mu_tilde(x0_pred, x_t)`` with ``x0_pred`` from eps, clipped to ``[-clip_x0, clip_x0]``
    when given (the mean DDPM samples with). eps, x_t: (B, ...), t: (B,) int64 indices -> (B, ...)."""
    x0_pred = schedule.predict_x0(x_t, t, eps)
    if clip_x0 is not None:
        x0_pred = x0_pred.clamp(-clip_x0, clip_x0)
    return schedule.posterior_mean(x0_pred, x_t, t)


def vlb_terms(
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    model_mean: torch.Tensor,
    model_log_variance: torch.Tensor,
    decoder: str = "discretized",
    levels: int = 256,
) -> torch.Tensor:
    """``L_{t}`` per sample in bits/dim, (B,): the KL of the true posterior to ``p_theta(x_{t-1} | x_t)`` for
    ``t > 0`` and the decoder NLL ``-log p_theta(x_0 | x_1)`` at ``t = 0`` (``decoder`` = ``discretized`` for
    data in [-1, 1] quantised to ``levels`` gray levels, 256 for 8-bit, ``gaussian`` for continuous data).

    x0, x_t, model_mean: (B, ...); model_log_variance broadcasts to them; t: (B,) indices.
    """
    if decoder not in DECODERS:
        raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    true_mean = schedule.posterior_mean(x0, x_t, t)
    true_log_variance = NoiseSchedule.gather(schedule.posterior_log_variance_clipped, t, x0.ndim)
    kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / LN2
    log_variance = model_log_variance.expand_as(x0)
    if decoder == "discretized":
        log_likelihood = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * log_variance, levels)
    else:
        log_likelihood = gaussian_log_likelihood(x0, model_mean, log_variance)
    decoder_nll = -mean_flat(log_likelihood) / LN2
    return torch.where(t == 0, decoder_nll, kl)


def prior_kl_bits(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """``L_T = KL(q(x_T | x_0) || N(0, I))`` per sample in bits/dim: x0 (B, ...) -> (B,)."""
    last = torch.full((x0.shape[0],), schedule.num_timesteps - 1, device=x0.device, dtype=torch.long)
    alpha_bar = NoiseSchedule.gather(schedule.alpha_bar, last, x0.ndim)
    mean = alpha_bar.sqrt() * x0
    log_variance = torch.log(1 - alpha_bar).expand_as(x0)
    zero = torch.zeros_like(x0)
    return mean_flat(normal_kl(mean, log_variance, zero, zero)) / LN2


@dataclass
class VLBResult:
    """The full bound of a batch (every value a mean over the batch, bits/dim).

    ``total = prior + terms + decoder`` where ``terms = sum_{t >= 1} L_t`` and ``decoder = L_0``; ``per_t`` (T,) holds
    ``L_t`` by index (``per_t[0]`` is the decoder term). ``by_variance`` holds the totals of every variance that
    was scored from the same network evaluations (``learned``, ``beta``, ``posterior``).
    """

    total: float
    prior: float
    terms: float
    decoder: float
    per_t: torch.Tensor
    variance: str
    by_variance: dict[str, float]


@torch.no_grad()
def full_vlb(
    model: object,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    decoder: str = "discretized",
    fixed_variances: tuple[str, ...] = FIXED_VARIANCES,
    batch_size: int = 0,
    clip_x0: float | None = None,
    levels: int = 256,
) -> VLBResult:
    """The negative ELBO of ``x0`` (B, ...) in bits/dim: ``L_T + sum_t L_t + L_0`` over all T timesteps.

    model: called as ``model(x_t, t)`` (or ``model(x_t, t, labels)`` when ``labels`` (B,) are given) -> eps
    (B, C, ...) or [eps, v] (B, 2C, ...). One network evaluation per
    timestep and sample (T of them per sample), each at ``x_t ~ q(x_t | x_0)`` with fresh noise from
    ``generator``. A learned-variance model is scored with its own variance (``variance = "learned"``); a
    fixed-variance one with every kind in ``fixed_variances`` from the same evaluations, the lowest reported as
    the result (the fairest to the fixed model). ``batch_size`` > 0 evaluates ``x0`` in chunks. ``clip_x0``
    scores the model that samples with x_0 predictions clipped to ``[-clip_x0, clip_x0]`` (improved-diffusion's
    ``clip_denoised`` in its NLL evaluation); None scores the unclipped mean. ``levels``: the gray levels of the
    discretised decoder (256 for 8-bit images).
    """
    device = x0.device
    n = x0.shape[0]
    chunk = batch_size or n
    sums: dict[str, torch.Tensor] = {}
    for t_index in range(schedule.num_timesteps - 1, -1, -1):
        for start in range(0, n, chunk):
            part = x0[start : start + chunk]
            t = torch.full((part.shape[0],), t_index, device=device, dtype=torch.long)
            noise_source = generator.device if generator is not None else device
            noise = torch.randn(part.shape, generator=generator, device=noise_source).to(device)
            x_t = schedule.q_sample(part, t, noise)
            output = model(x_t, t) if labels is None else model(x_t, t, labels[start : start + chunk])
            eps, values = split_output(output, x_t)
            mean = reverse_mean(schedule, eps, x_t, t, clip_x0)
            variants: dict[str, torch.Tensor] = {}
            if values is not None:
                variants["learned"] = learned_log_variance(schedule, values, t)
            else:
                for kind in fixed_variances:
                    variants[kind] = NoiseSchedule.gather(fixed_log_variance(schedule, kind), t, x_t.ndim)
            for kind, log_variance in variants.items():
                terms = vlb_terms(schedule, part, x_t, t, mean, log_variance, decoder, levels)
                sums.setdefault(kind, torch.zeros(schedule.num_timesteps, dtype=torch.float64))
                sums[kind][t_index] += float(terms.double().sum())
    prior = float(prior_kl_bits(schedule, x0).double().mean())
    totals = {kind: prior + float(per_t.sum()) / n for kind, per_t in sums.items()}
    best = min(totals, key=totals.get)
    per_t = sums[best] / n
    return VLBResult(
        total=totals[best],
        prior=prior,
        terms=float(per_t[1:].sum()),
        decoder=float(per_t[0]),
        per_t=per_t,
        variance=best,
        by_variance=totals,
    )
