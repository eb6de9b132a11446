"""Multi-layer perceptrons for 2-D data: the denoiser, the noisy classifier and the score network.

The networks take integer timesteps ``t`` (B,) and encode them themselves, so every sampler can call
``model(x_t, t)`` without knowing how a network wants its time input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from difflab.errors import ConfigError

ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
TIME_ENCODINGS = ("centered", "raw", "sinusoidal")


def mlp(in_features: int, hidden: Sequence[int], out_features: int, activation: str = "silu") -> nn.Sequential:
    """``Linear -> act`` for each hidden width, then a final ``Linear``."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        if h < 1:
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(hidden)}")
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of scalars (Vaswani et al. 2017; Ho et al. 2020).

    values: (B,) float; returns (B, dim) = ``[cos(v w_k), sin(v w_k)]`` with
    ``w_k = max_period^(-k / (dim/2))``.
    """
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=1)
    return embedding


class TimeEncoding(nn.Module):
    """Maps integer timesteps (B,) to the features an MLP is given.

    - ``centered``: one feature ``t_bar = 2 (t - T/2) / T`` in [-1, 1) (the STATES reference);
    - ``raw``: one feature, the timestep itself as a float (the swiss-roll walkthrough);
    - ``sinusoidal``: ``dim`` sinusoidal features of t.
    """

    def __init__(self, kind: str, num_timesteps: int, dim: int = 32) -> None:
        super().__init__()
        if kind not in TIME_ENCODINGS:
            raise ConfigError(f"time_encoding must be one of {', '.join(TIME_ENCODINGS)}, got {kind!r}")
        self.kind = kind
        self.num_timesteps = num_timesteps
        self.dim = dim if kind == "sinusoidal" else 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, dim) features (dim = 1 for ``centered`` and ``raw``)."""
        t = t.float()
        if self.kind == "centered":
            return (2 * (t - self.num_timesteps / 2) / self.num_timesteps)[:, None]
        if self.kind == "raw":
            return t[:, None]
        return sinusoidal_embedding(t, self.dim)


class DenoiserMLP(nn.Module):
    """``eps_theta(x_t, t)`` for D-dimensional points: an MLP on ``[x_t, enc(t)]``.

    x: (B, D); t: (B,) int timesteps; optional ``y`` (B,) labels when ``num_classes`` is set
    (a learned embedding is concatenated; label ``num_classes`` is the null label for
    classifier-free guidance). Returns (B, D).
    """

    def __init__(
        self,
        data_dim: int = 2,
        hidden: Sequence[int] = (256, 256, 256, 256),
        num_timesteps: int = 1000,
        time_encoding: str = "centered",
        activation: str = "silu",
        num_classes: int | None = None,
        class_embedding_dim: int = 16,
    ) -> None:
        super().__init__()
        self.time = TimeEncoding(time_encoding, num_timesteps)
        self.num_classes = num_classes
        extra = 0
        if num_classes is not None:
            self.class_embedding = nn.Embedding(num_classes + 1, class_embedding_dim)
            extra = class_embedding_dim
        self.net = mlp(data_dim + self.time.dim + extra, hidden, data_dim, activation)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, D), t: (B,), y: (B,) int64 labels or None (the null label) -> eps (B, D)."""
        features = [x, self.time(t).to(x.dtype)]
        if self.num_classes is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            features.append(self.class_embedding(y))
        return self.net(torch.cat(features, dim=1))


class NoisyClassifierMLP(nn.Module):
    """``f_phi(y | x_t, t)``: class logits for noisy points. x: (B, D), t: (B,) -> (B, num_classes)."""

    def __init__(
        self,
        data_dim: int = 2,
        num_classes: int = 5,
        hidden: Sequence[int] = (100, 200, 500),
        num_timesteps: int = 1000,
        time_encoding: str = "centered",
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.time = TimeEncoding(time_encoding, num_timesteps)
        self.num_classes = num_classes
        self.net = mlp(data_dim + self.time.dim, hidden, num_classes, activation)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, D), t: (B,) -> logits (B, num_classes)."""
        return self.net(torch.cat([x, self.time(t).to(x.dtype)], dim=1))
