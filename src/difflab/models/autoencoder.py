"""Autoencoders for latent diffusion (Rombach et al. 2022): a KL-regularised convolutional VAE trained by difflab,
a wrapper around a pretrained ``diffusers.AutoencoderKL`` (e.g. Stable Diffusion's VAE), and the
:class:`Autoencoder` protocol both follow.

The diffusion model works on *scaled* latents ``z = scaling_factor * (mu(x) - shift)``: ``scaling_factor`` is
``1 / std`` of the training latents for difflab's VAE (computed from the data and stored with its weights as the
buffer ``scaling_factor``) and the pretrained VAE's own ``config.scaling_factor`` for diffusers (0.18215 for SD v1).
Encoding uses the posterior mean (deterministic, so the latents can be cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import CheckpointError, ConfigError, first_line


@runtime_checkable
class Autoencoder(Protocol):
    """What latent diffusion needs from an autoencoder.

    ``encode``: images (B, C, H, W) in [-1, 1] -> scaled latents (B, c, h, w); ``decode``: scaled latents ->
    images (B, C, H, W), roughly in [-1, 1] (not clipped); ``latent_shape((C, H, W)) -> (c, h, w)``;
    ``scaling_factor``: the factor applied after encoding; ``description``: one line for reports.
    """

    scaling_factor: float
    description: str

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]: ...


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of a :class:`KLAutoencoder`: ``channel_mults[i] * base_channels`` channels at level i, a stride-2
    downsample between levels (spatial factor ``2 ** (len(channel_mults) - 1)``), ``latent_channels`` channels
    of latent (mean and log-variance)."""

    in_channels: int = 1
    latent_channels: int = 4
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    mid_attention: bool = False
    norm_groups: int = 8

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.latent_channels < 1 or self.base_channels < 1 or self.num_res_blocks < 1:
            raise ConfigError("autoencoder in_channels, latent_channels, base_channels, num_res_blocks must be >= 1")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError(f"autoencoder channel_mults must be positive integers, got {list(self.channel_mults)}")
        if self.norm_groups < 1:
            raise ConfigError(f"autoencoder norm_groups must be >= 1, got {self.norm_groups}")
        for mult in self.channel_mults:
            if (mult * self.base_channels) % self.norm_groups:
                raise ConfigError(
                    f"autoencoder channels {mult * self.base_channels} are not divisible by "
                    f"norm_groups={self.norm_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


class _ResBlock(nn.Module):
    """``GN -> SiLU -> conv -> GN -> SiLU -> conv`` plus a (1 x 1 when the width changes) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Single-head self-attention over the pixels (the VAE bottleneck's)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), residual."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w))


class _Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3 x 3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class KLAutoencoder(nn.Module):
    """A KL-regularised convolutional VAE (the "KL-f" autoencoders of Rombach et al. 2022, scaled down).

    ``encode_moments(x)``: x (B, C, H, W) -> mean, log-variance (B, c, H/f, W/f), f = ``downsample_factor``;
    ``decode_raw(z)``: unscaled latents -> images (B, C, H, W); ``encode`` / ``decode`` work on scaled latents
    ``z * scaling_factor`` (the :class:`Autoencoder` protocol). ``scaling_factor`` is a buffer, saved with the
    weights.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        groups, base = config.norm_groups, config.base_channels
        widths = [base * m for m in config.channel_mults]
        encoder: list[nn.Module] = [nn.Conv2d(config.in_channels, widths[0], 3, padding=1)]
        channels = widths[0]
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                encoder.append(_ResBlock(channels, width, groups))
                channels = width
            if level < len(widths) - 1:
                encoder.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        encoder.append(_ResBlock(channels, channels, groups))
        if config.mid_attention:
            encoder.append(_Attention(channels, groups))
        encoder.append(_ResBlock(channels, channels, groups))
        encoder += [
            nn.GroupNorm(groups, channels),
            nn.SiLU(),
            nn.Conv2d(channels, 2 * config.latent_channels, 3, padding=1),
        ]
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = [
            nn.Conv2d(config.latent_channels, channels, 3, padding=1),
            _ResBlock(channels, channels, groups),
        ]
        if config.mid_attention:
            decoder.append(_Attention(channels, groups))
        decoder.append(_ResBlock(channels, channels, groups))
        for level in reversed(range(len(widths))):
            for _ in range(config.num_res_blocks + 1):
                decoder.append(_ResBlock(channels, widths[level], groups))
                channels = widths[level]
            if level > 0:
                decoder.append(_Upsample(channels))
        decoder += [nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, config.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)
        self.register_buffer("scaling_factor_buffer", torch.ones(()))

    # -- the protocol -------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return float(self.scaling_factor_buffer)

    @scaling_factor.setter
    def scaling_factor(self, value: float) -> None:
        self.scaling_factor_buffer.fill_(float(value))

    @property
    def description(self) -> str:
        c = self.config
        return (
            f"difflab KL-VAE (widths {[c.base_channels * m for m in c.channel_mults]}, {c.latent_channels} latent "
            f"channels, downsampling x{c.downsample_factor}), scaling factor {self.scaling_factor:.4f}"
        )

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        channels, height, width = image_shape
        factor = self.config.downsample_factor
        if channels != self.config.in_channels or height % factor or width % factor:
            raise ConfigError(
                f"the autoencoder takes {self.config.in_channels}-channel images whose sides are multiples of "
                f"{factor}, got {tuple(image_shape)}"
            )
        return self.config.latent_channels, height // factor, width // factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> scaled posterior means (B, c, H/f, W/f)."""
        mean, _ = self.encode_moments(images)
        return mean * self.scaling_factor_buffer

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (B, c, h, w) -> images (B, C, h f, w f)."""
        return self.decode_raw(latents / self.scaling_factor_buffer)

    # -- training -----------------------------------------------------------------------------------------
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``q(z | x) = N(mean, exp(log_variance))``; log-variance clamped to [-30, 20].
        images (B, C, H, W) in [-1, 1] -> mean, log_variance (B, c, H/f, W/f) each (unscaled latents)."""
        mean, log_variance = self.encoder(images).chunk(2, dim=1)
        return mean, log_variance.clamp(-30.0, 20.0)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z (B, c, h, w) -> images (B, C, h f, w f), roughly in [-1, 1] (not clipped)."""
        return self.decoder(z)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``(reconstruction, mean, log_variance)``: decodes ``mean + exp(log_variance / 2) * noise`` (the
        reparameterised sample; the mean itself when ``noise`` is None). images: (B, C, H, W), noise: (B, c, H/f, W/f)
        or None -> reconstruction (B, C, H, W), mean and log_variance (B, c, H/f, W/f)."""
        mean, log_variance = self.encode_moments(images)
        z = mean if noise is None else mean + torch.exp(0.5 * log_variance) * noise
        return self.decode_raw(z), mean, log_variance


class DiffusersAutoencoder(nn.Module):
    """A pretrained ``diffusers.AutoencoderKL`` behind the :class:`Autoencoder` protocol.

    Images whose channel count differs from the VAE's (grey digits into an RGB VAE) are repeated across channels
    on the way in and averaged on the way out; sides that the VAE's downsampling does not divide are padded
    (replicating the border) and cropped back. Latents are ``scaling_factor * (mean - shift_factor)``.
    """

    def __init__(
        self, vae: nn.Module, image_shape: tuple[int, int, int], scaling_factor: float = 0.0, source: str = ""
    ) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.image_shape = tuple(image_shape)
        config = vae.config
        self.scaling_factor = float(scaling_factor or getattr(config, "scaling_factor", 0.0) or 1.0)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.vae_channels = int(config.in_channels)
        self.latent_channels = int(config.latent_channels)
        self.description = (
            f"diffusers AutoencoderKL{f' from {source}' if source else ''} "
            f"(x{self.factor} downsampling, {self.latent_channels} latent channels), "
            f"scaling factor {self.scaling_factor:g}"
        )

    def _padded_size(self) -> tuple[int, int]:
        _, height, width = self.image_shape
        return height + (-height) % self.factor, width + (-width) % self.factor

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if tuple(image_shape) != self.image_shape:
            raise ConfigError(f"this autoencoder was set up for images {self.image_shape}, got {tuple(image_shape)}")
        height, width = self._padded_size()
        return self.latent_channels, height // self.factor, width // self.factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1], (C, H, W) = ``image_shape`` -> scaled latents (B, c, H'/f, W'/f), H' and W'
        the sides padded to multiples of f."""
        channels, height, width = self.image_shape
        if channels != self.vae_channels:
            if channels != 1:
                raise ConfigError(f"cannot feed {channels}-channel images to a {self.vae_channels}-channel VAE")
            images = images.repeat(1, self.vae_channels, 1, 1)
        padded_h, padded_w = self._padded_size()
        if (padded_h, padded_w) != (height, width):
            images = F.pad(images, (0, padded_w - width, 0, padded_h - height), mode="replicate")
        mean = self.vae.encode(images).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents (B, c, h, w) -> images (B, C, H, W) of ``image_shape``, roughly in [-1, 1] (not clipped)."""
        channels, height, width = self.image_shape
        images = self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample
        images = images[..., :height, :width]
        if channels != self.vae_channels:
            images = images.mean(dim=1, keepdim=True)
        return images


def load_diffusers_autoencoder(
    path: str | Path, image_shape: tuple[int, int, int], scaling_factor: float = 0.0
) -> DiffusersAutoencoder:
    """``diffusers.AutoencoderKL.from_pretrained(path)`` from a local folder only (``local_files_only``,
    safetensors weights only: nothing is downloaded and nothing is unpickled). ``scaling_factor`` 0 takes the
    VAE's ``config.scaling_factor``."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError(
            "vae.kind=diffusers needs the diffusers package (pip install diffusers); it is not a dependency of difflab"
        ) from None
    folder = Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"vae.path={path} must be a local folder holding an AutoencoderKL (config.json + weights)")
    try:
        vae: Any = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"cannot load a diffusers AutoencoderKL from {folder}: {first_line(exc)}") from None
    return DiffusersAutoencoder(vae, image_shape, scaling_factor, source=str(folder))
