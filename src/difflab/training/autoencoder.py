"""The objective of the KL-regularised autoencoder and the latent scaling factor (Rombach et al. 2022, sec. 3 and
appendix G)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from difflab.errors import ConfigError
from difflab.seeding import batch_randint, batch_randn

RECONSTRUCTIONS = ("l1", "l2")


def autoencoder_loss(
    model: nn.Module,
    images: torch.Tensor,
    generator: torch.Generator,
    kl_weight: float = 1e-6,
    reconstruction: str = "l1",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L = rec(x, D(z)) + kl_weight * KL(q(z | x) || N(0, I))`` with ``z = mu + sigma * eps`` (reparameterised).

    ``model`` (a :class:`~difflab.models.autoencoder.KLAutoencoder`, or the DDP wrapper of one) is called as
    ``model(images, noise) -> (reconstruction, mean, log_variance)``; ``noise`` has the shape of its
    ``latent_shape``. images: (B, C, H, W) in [-1, 1]. ``rec`` is the mean absolute (``l1``) or squared (``l2``)
    error per pixel; the KL (``0.5 sum(mu^2 + sigma^2 - 1 - log sigma^2)`` per image) is divided by the number of
    pixels too, so ``kl_weight`` has the meaning of the LDM code's (whose losses are both sums per image). Returns
    the loss and its parts (``reconstruction``, ``kl`` per image in nats).
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise ConfigError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}, got {reconstruction!r}")
    network = getattr(model, "module", model)  # under DDP the wrapper's forward must run (gradient all-reduce)
    latent = network.latent_shape(tuple(images.shape[1:]))
    noise = batch_randn((len(images), *latent), generator, images.device)
    recon, mean, log_variance = model(images, noise)
    error = recon - images
    rec = error.abs().mean() if reconstruction == "l1" else (error**2).mean()
    kl = 0.5 * (mean**2 + torch.exp(log_variance) - 1.0 - log_variance).flatten(1).sum(dim=1)
    pixels = images[0].numel()
    loss = rec + kl_weight * kl.mean() / pixels
    return loss, {"reconstruction": rec.detach(), "kl": kl.mean().detach()}


def random_crops(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``crop`` x ``crop`` window per image of images (B, C, H, W) -> (B, C, crop, crop); per-example
    draws, so the windows are the same for any split of the batch over processes or micro-batches."""
    height, width = images.shape[-2:]
    tops = batch_randint(height - crop + 1, len(images), generator, "cpu")
    lefts = batch_randint(width - crop + 1, len(images), generator, "cpu")
    return torch.stack(
        [
            img[:, int(t) : int(t) + crop, int(s) : int(s) + crop]
            for img, t, s in zip(images, tops.tolist(), lefts.tolist())
        ]
    )


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """images (N, ...) in consecutive slices (batch_size, ...), the last one possibly shorter."""
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


@torch.no_grad()
def latent_scaling_factor(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> float:
    """``1 / std`` of the posterior means of ``images`` (N, C, H, W) over every element (Rombach et al., sec. G),
    so the scaled latents have unit variance like the diffusion model's noise."""
    device = next(model.parameters()).device
    means = [model.encode_moments(part.to(device))[0].double().cpu() for part in _batches(images, batch_size)]
    std = float(torch.cat(means).std())
    if not std > 0:
        raise ConfigError("the autoencoder maps every image to the same latent: cannot compute a scaling factor")
    return 1.0 / std
