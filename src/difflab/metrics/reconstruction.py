"""Reconstruction quality of an autoencoder: PSNR and SSIM per image (:mod:`difflab.metrics.image_quality`), MSE, L1."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.data.images import to_unit
from difflab.errors import DataError
from difflab.metrics.image_quality import psnr_per_image, ssim_per_image


@torch.no_grad()
def reconstruction_metrics(
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of ``reconstruct(images)`` against ``images`` (N, C, H, W) in [-1, 1].

    Both are computed on [0, 1] pixels (``data_range = 1``) after clipping the reconstructions to that range;
    PSNR is ``10 log10(1 / MSE)`` per image, averaged; SSIM uses the standard 11 x 11 Gaussian window
    (sigma 1.5, k1 = 0.01, k2 = 0.03), averaged over the images. Also returns ``mse`` and ``l1`` per pixel.
    """
    if images.ndim != 4 or len(images) == 0:
        raise DataError(f"reconstruction metrics need images (N, C, H, W), got {tuple(images.shape)}")
    psnr_sum = ssim_sum = mse_sum = l1_sum = 0.0
    for start in range(0, len(images), batch_size):
        target = images[start : start + batch_size].to(device)
        output = reconstruct(target)
        if output.shape != target.shape:
            raise DataError(f"reconstructions {tuple(output.shape)} differ in shape from images {tuple(target.shape)}")
        psnr_sum += float(psnr_per_image(output, target).double().sum())
        ssim_sum += float(ssim_per_image(output, target).double().sum())
        prediction, reference = to_unit(output.float()).clamp(0, 1), to_unit(target.float())
        mse_sum += float(((prediction - reference) ** 2).double().mean(dim=(1, 2, 3)).sum())
        l1_sum += float((prediction - reference).abs().double().mean(dim=(1, 2, 3)).sum())
    n = len(images)
    return {"psnr": psnr_sum / n, "ssim": ssim_sum / n, "mse": mse_sum / n, "l1": l1_sum / n, "n": n}
