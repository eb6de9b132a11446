"""Full-reference image quality: PSNR and SSIM (torchmetrics' implementations), on images in [-1, 1]."""

from __future__ import annotations

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] float32, clipped: x of any shape, e.g. (B, C, H, W) -> the same shape."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images (B, C, H, W) in [-1, 1], over [0, 1] pixels (data range 1), of
    the MSE pooled over all images (:func:`psnr_per_image` gives each image's)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(_unit(prediction), _unit(target), data_range=1.0))


def psnr_per_image(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image (B, C, H, W) in [-1, 1] over [0, 1] pixels: (B,). Their mean is at least
    :func:`psnr` of the pooled MSE (the log of a mean is at least the mean of the logs)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(_unit(prediction), _unit(target), data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Mean structural similarity (Gaussian window 11, sigma 1.5) of images (B, C, H, W) in [-1, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(_unit(prediction), _unit(target), data_range=1.0))


def ssim_per_image(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each image (B, C, H, W) in [-1, 1], as :func:`ssim` computes it: (B,). Their mean
    is :func:`ssim` of the batch."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(_unit(prediction), _unit(target), data_range=1.0, reduction="none")


def box_mean(images: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of each pixel's ``(2 radius + 1)^2`` window, edges replicated: (B, C, H, W) -> (B, C, H, W)."""
    if radius < 1:
        return images
    padded = torch.nn.functional.pad(images, (radius,) * 4, mode="replicate")
    return torch.nn.functional.avg_pool2d(padded, 2 * radius + 1, stride=1)


def guided_filter(guide: torch.Tensor, target: torch.Tensor, radius: int, eps: float = 1e-3) -> torch.Tensor:
    """He, Sun & Tang's guided filter (ECCV 2010, eqs. 19-21 for a colour guide): the target as a local affine
    function of the guide, ``q = mean(a)^T I + mean(b)`` with, in every ``(2 radius + 1)^2`` window,
    ``a = (Sigma_I + eps U)^-1 cov(I, p)`` and ``b = mean(p) - a^T mean(I)``.

    guide: (B, C, H, W), target: (B, 1, H, W) -> (B, 1, H, W). Fitted on ``target`` itself, it is an oracle: the best
    a per-window affine map of the guide's channels can do (rgb2ir's ceiling rows). Solved in float64.
    """
    if guide.shape[0] != target.shape[0] or guide.shape[-2:] != target.shape[-2:] or target.shape[1] != 1:
        raise ValueError(f"guided_filter: guide {tuple(guide.shape)} and target {tuple(target.shape)} do not match")
    guide, target = guide.double(), target.double()
    channels = guide.shape[1]
    mean_guide, mean_target = box_mean(guide, radius), box_mean(target, radius)
    cov_guide_target = box_mean(guide * target, radius) - mean_guide * mean_target  # (B, C, H, W)
    products = guide[:, :, None] * guide[:, None]  # (B, C, C, H, W)
    flat = products.flatten(1, 2)
    outer_means = mean_guide[:, :, None] * mean_guide[:, None]
    sigma = box_mean(flat, radius).unflatten(1, (channels, channels)) - outer_means
    sigma = sigma.permute(0, 3, 4, 1, 2) + eps * torch.eye(channels, dtype=torch.float64)  # (B, H, W, C, C)
    a = torch.linalg.solve(sigma, cov_guide_target.permute(0, 2, 3, 1).unsqueeze(-1)).squeeze(-1)
    a = a.permute(0, 3, 1, 2)  # (B, C, H, W)
    b = mean_target - (a * mean_guide).sum(dim=1, keepdim=True)
    return ((box_mean(a, radius) * guide).sum(dim=1, keepdim=True) + box_mean(b, radius)).float()


def at_low_resolution(images: torch.Tensor, grid: int) -> torch.Tensor:
    """The images averaged down to a ``grid`` x ``grid`` raster (``adaptive_avg_pool2d``) and upsampled back bilinearly:
    what knowing them at that resolution gives. (B, C, H, W) -> (B, C, H, W)."""
    if grid < 1:
        raise ValueError(f"at_low_resolution: grid must be >= 1, got {grid}")
    low = torch.nn.functional.adaptive_avg_pool2d(images, grid)
    return torch.nn.functional.interpolate(low, size=images.shape[-2:], mode="bilinear", align_corners=False)
