"""Full-reference image quality: PSNR and SSIM (torchmetrics' implementations), on images in [-1, 1]."""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images (B, C, H, W) in [-1, 1], over [0, 1] pixels (data range 1)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(_unit(prediction), _unit(target), data_range=1.0))


def ssim(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean structural similarity (Gaussian window 11, sigma 1.5) of images (B, C, H, W) in [-1, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_unit(prediction), _unit(target), data_range=1.0))
