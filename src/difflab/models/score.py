"""Noise-conditional score networks ``s_theta(x, sigma) ~ grad_x log p_sigma(x)`` (Song & Ermon 2019).

Both networks are called as ``model(x, sigma)`` with ``sigma`` (B,) float noise levels and return a
score of the shape of ``x``. They see the level through ``log sigma``, and their output is read in one
of two ways (``output``):

- ``"scaled"`` (default; after NCSNv2's technique 3, Song & Ermon 2020, which divides an unconditional network's
  output by sigma, while this network still sees the level): the network predicts ``sigma s`` and the model returns
  ``f_theta(x, log sigma) / sigma``. ``sigma s`` is of order 1 at every level (the DSM
  target is ``-z``), so the network's output range does not have to span 1 / sigma_min = 100x;
- ``"direct"``: the network's output is the score itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difflab.errors import ConfigError
from difflab.models.mlp import mlp, sinusoidal_embedding
from difflab.models.unet import UNet, UNetConfig

SCORE_OUTPUTS = ("scaled", "direct")
SIGMA_ENCODINGS = ("sinusoidal", "raw")


def _check_output(output: str) -> str:
    if output not in SCORE_OUTPUTS:
        raise ConfigError(f"score output must be one of {', '.join(SCORE_OUTPUTS)}, got {output!r}")
    return output


def _as_levels(sigma: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a float, a 0-d tensor or (B,)) as (batch,) levels in the dtype and on the device of ``like``."""
    if not isinstance(sigma, torch.Tensor):
        sigma = torch.tensor(float(sigma))
    sigma = sigma.to(device=like.device, dtype=like.dtype)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma


class NoiseConditionalUNet(nn.Module):
    """``s_theta(x, sigma)`` for images: a :class:`UNet` run at ``t = log sigma``.

    Use ``time_conditioning="film"`` for the NCSN design (every residual block scales and shifts its
    normalised features by a projection of the embedding). The U-Net embeds ``t * config.time_scale``
    sinusoidally; ``log sigma`` spans only ``log(sigma_max / sigma_min)`` (4.6 for 1 .. 0.01), so set
    ``time_scale`` to spread it (200 makes it ~920 units, the span DDPM's integer timesteps give the same
    embedding). x: (B, C, H, W), sigma: (B,) or a scalar -> (B, C, H, W).
    """

    def __init__(self, config: UNetConfig, output: str = "scaled") -> None:
        super().__init__()
        self.output = _check_output(output)
        self.unet = UNet(config)
        self.config = config

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """x: (B, C, H, W), sigma: (B,) or a scalar -> the score (B, C, H, W)."""
        sigma = _as_levels(sigma, x.shape[0], x)
        out = self.unet(x, sigma.log())
        if self.output == "scaled":
            out = out / sigma.reshape(-1, 1, 1, 1)  # NCSNv2: s_theta(x, sigma) = f_theta(x, sigma) / sigma
        return out


class ScoreMLP(nn.Module):
    """``s_theta(x, sigma)`` for D-dimensional points: an MLP on ``[x, enc(log sigma)]``.

    ``sigma_encoding``: ``sinusoidal`` (``embedding_dim`` features of ``log_sigma_scale * log sigma``)
    or ``raw`` (``log sigma`` itself as one feature). x: (B, D), sigma: (B,) or a scalar -> (B, D).
    """

    def __init__(
        self,
        data_dim: int = 2,
        hidden: Sequence[int] = (256, 256, 256, 256),
        activation: str = "silu",
        sigma_encoding: str = "sinusoidal",
        embedding_dim: int = 32,
        log_sigma_scale: float = 100.0,
        output: str = "scaled",
    ) -> None:
        super().__init__()
        if sigma_encoding not in SIGMA_ENCODINGS:
            raise ConfigError(f"sigma_encoding must be one of {', '.join(SIGMA_ENCODINGS)}, got {sigma_encoding!r}")
        if sigma_encoding == "sinusoidal" and embedding_dim < 2:
            raise ConfigError(f"embedding_dim must be >= 2, got {embedding_dim}")
        self.output = _check_output(output)
        self.sigma_encoding = sigma_encoding
        self.embedding_dim = embedding_dim if sigma_encoding == "sinusoidal" else 1
        self.log_sigma_scale = log_sigma_scale
        self.net = mlp(data_dim + self.embedding_dim, hidden, data_dim, activation)

    def encode(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) levels -> (B, embedding_dim) features."""
        log_sigma = sigma.float().log()
        if self.sigma_encoding == "raw":
            return log_sigma[:, None]
        return sinusoidal_embedding(log_sigma * self.log_sigma_scale, self.embedding_dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """x: (B, D), sigma: (B,) or a scalar -> the score (B, D)."""
        sigma = _as_levels(sigma, x.shape[0], x)
        out = self.net(torch.cat([x, self.encode(sigma).to(x.dtype)], dim=1))
        if self.output == "scaled":
            out = out / sigma[:, None]
        return out
