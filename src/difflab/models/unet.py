"""A time- and class-conditioned U-Net for small images (Ho et al. 2020; Nichol & Dhariwal 2021).

Encoder levels of residual blocks with a strided-conv downsample between them, a bottleneck (res,
optional attention, res), and a decoder that concatenates the encoder's skip activations. The
timestep enters through a sinusoidal embedding and an MLP; each residual block maps it to its own
channels and either *adds* it to the features (``time_conditioning="add"``, the "Micro-UNet" of the
DDPM walkthrough) or uses it as a per-channel scale and shift after the normalisation
(``"film"``, improved DDPM's scale-shift norm / FiLM). ``"none"`` is the ablation without any time input:
no time embedding at all, so the network must infer the noise level from ``x_t`` alone (t is accepted and
ignored). With ``num_classes = K`` a learned embedding of K + 1 labels (label K is the null label of
classifier-free guidance) is added to the time embedding (with ``"none"``: it is the embedding, added to
the features of every block).

Cross-attention (Rombach et al. 2022, the LDM U-Net) is optional: at the levels in ``cross_attention_levels`` (and
in the bottleneck with ``mid_cross_attention``) each stage ends with a block whose queries are the pixels and whose
keys and values are a context sequence (B, L, context_dim). With ``class_conditioning="cross"`` (or ``"both"``,
which also keeps the additive embedding) the context is a learned embedding of the label as ``context_tokens``
tokens (the null label has its own); any other context can be passed as ``forward(x, t, context=...)``. With none
of these options set the network, its parameters and its outputs are exactly those of the plain U-Net.

With channels-last weights (``model.to(memory_format=torch.channels_last)``) inputs are converted to NHWC inside
``forward``. Which layout is faster depends on the precision: on CPU, oneDNN's bf16 convolutions run faster NCHW
(1.5x a channels-last step here), while in fp32 the two layouts were within 20% of each other on these hosts;
``difflab.training.precision.to_fast_layout`` keeps fp32 channels-last and bf16 NCHW.

Sizes that the downsampling does not divide (28 x 28 with three downsamples) are padded up to the next
multiple inside ``forward`` and cropped back, so any size works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import ConfigError
from difflab.models.mlp import sinusoidal_embedding

TIME_CONDITIONINGS = ("add", "film", "none")
CLASS_CONDITIONINGS = ("add", "cross", "both")


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a :class:`UNet`.

    ``channel_mults[i] * base_channels`` channels at level i (resolution ``size / 2**i``);
    ``attention_levels`` lists the levels with self-attention (the bottleneck has it when
    ``mid_attention``); ``time_scale`` multiplies t before the sinusoidal embedding (1 for integer
    timesteps, e.g. 1000 for continuous t in [0, 1]); ``time_conditioning="none"`` removes the time
    embedding (the ablation of an unconditioned-on-t denoiser). ``cross_attention_levels`` /
    ``mid_cross_attention`` add cross-attention to a context of width ``context_dim`` (0 = the time-embedding
    width); ``class_conditioning`` says how labels enter: ``add`` (to the time embedding), ``cross`` (as a
    context of ``context_tokens`` learned tokens) or ``both``.
    """

    in_channels: int = 1
    out_channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    attention_head_channels: int = 32
    dropout: float = 0.0
    time_conditioning: str = "film"
    time_embedding_dim: int = 0
    time_scale: float = 1.0
    num_classes: int = 0
    norm_groups: int = 8
    cross_attention_levels: tuple[int, ...] = ()
    mid_cross_attention: bool = False
    context_dim: int = 0
    context_tokens: int = 1
    class_conditioning: str = "add"

    def __post_init__(self) -> None:
        if self.time_conditioning not in TIME_CONDITIONINGS:
            raise ConfigError(f"unet.time_conditioning must be one of {', '.join(TIME_CONDITIONINGS)}")
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError(f"unet.channel_mults must be positive integers, got {list(self.channel_mults)}")
        if self.base_channels < 1 or self.num_res_blocks < 1:
            raise ConfigError("unet.base_channels and unet.num_res_blocks must be >= 1")
        if self.in_channels < 1 or self.out_channels < 1 or self.num_classes < 0:
            raise ConfigError(
                "unet.in_channels and unet.out_channels must be >= 1 and unet.num_classes >= 0, got "
                f"{self.in_channels}, {self.out_channels} and {self.num_classes}"
            )
        if self.time_embedding_dim < 0:
            raise ConfigError(f"unet.time_embedding_dim must be >= 0 (0 = 4 x base), got {self.time_embedding_dim}")
        if not (0 < self.time_scale < math.inf):
            raise ConfigError(
                f"unet.time_scale must be a positive finite number, got {self.time_scale} "
                "(unet.time_conditioning=none drops t)"
            )
        if self.norm_groups < 1 or self.attention_head_channels < 1:
            raise ConfigError(
                f"unet.norm_groups and unet.attention_head_channels must be >= 1, got {self.norm_groups} and "
                f"{self.attention_head_channels}"
            )
        for mult in self.channel_mults:
            if (mult * self.base_channels) % self.norm_groups:
                raise ConfigError(
                    f"unet channels {mult * self.base_channels} are not divisible by norm_groups={self.norm_groups}"
                )
        bad = [level for level in self.attention_levels if not 0 <= level < len(self.channel_mults)]
        if bad:
            raise ConfigError(f"unet.attention_levels {bad} outside 0..{len(self.channel_mults) - 1}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("unet.dropout must be in [0, 1)")
        bad = [level for level in self.cross_attention_levels if not 0 <= level < len(self.channel_mults)]
        if bad:
            raise ConfigError(f"unet.cross_attention_levels {bad} outside 0..{len(self.channel_mults) - 1}")
        if self.class_conditioning not in CLASS_CONDITIONINGS:
            raise ConfigError(f"unet.class_conditioning must be one of {', '.join(CLASS_CONDITIONINGS)}")
        if self.class_conditioning != "add" and not self.has_cross_attention:
            raise ConfigError(
                f"unet.class_conditioning={self.class_conditioning} needs cross-attention "
                "(unet.cross_attention_levels or unet.mid_cross_attention)"
            )
        if self.class_conditioning != "add" and self.num_classes < 1:
            raise ConfigError(f"unet.class_conditioning={self.class_conditioning} needs unet.num_classes > 0")
        if self.context_tokens < 1 or self.context_dim < 0:
            raise ConfigError("unet.context_tokens must be >= 1 and unet.context_dim >= 0")
        attended = {*self.attention_levels, *self.cross_attention_levels}
        if self.mid_attention or self.mid_cross_attention:
            attended.add(len(self.channel_mults) - 1)
        for level in sorted(attended):
            channels = self.channel_mults[level] * self.base_channels
            heads = attention_heads(channels, self.attention_head_channels)
            if channels % heads:
                raise ConfigError(
                    f"unet.attention_head_channels={self.attention_head_channels} splits the {channels} channels of "
                    f"attention level {level} into {heads} heads unevenly: use a head width that divides {channels}"
                )

    @property
    def has_cross_attention(self) -> bool:
        return bool(self.cross_attention_levels) or self.mid_cross_attention

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)


class ResBlock(nn.Module):
    """``GN -> SiLU -> conv -> (+t | GN * (1 + scale) + shift) -> SiLU -> dropout -> conv`` plus a skip.

    ``emb_dim = 0``: no embedding enters the block (a U-Net with neither time nor class input).
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float, film: bool) -> None:
        super().__init__()
        self.film = film
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch * 2 if film else out_ch) if emb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        """x: (B, in_ch, H, W), emb: (B, emb_dim) or None -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is None or emb is None:
            h = self.norm2(h)
        elif self.film:
            e = self.emb(emb)[:, :, None, None]
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.emb(emb)[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def attention_heads(channels: int, head_channels: int) -> int:
    """The number of attention heads of ``channels`` channels at ``head_channels`` per head (at least one)."""
    return max(1, channels // head_channels)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels with ``scaled_dot_product_attention``."""

    def __init__(self, channels: int, groups: int, head_channels: int) -> None:
        super().__init__()
        self.heads = attention_heads(channels, head_channels)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), residual."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class CrossAttention(nn.Module):
    """Multi-head attention from the pixels (queries) to a context sequence (keys and values), with
    ``scaled_dot_product_attention``: x (B, C, H, W), context (B, L, context_dim) -> (B, C, H, W), residual."""

    def __init__(self, channels: int, context_dim: int, groups: int, head_channels: int) -> None:
        super().__init__()
        self.heads = attention_heads(channels, head_channels)
        self.norm = nn.GroupNorm(groups, channels)
        self.context_norm = nn.LayerNorm(context_dim)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key_value = nn.Linear(context_dim, channels * 2)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), context: (B, L, context_dim) -> (B, C, H, W), residual."""
        b, c, h, w = x.shape
        d = c // self.heads
        q = self.query(self.norm(x)).reshape(b, self.heads, d, h * w).transpose(-1, -2)  # (B, heads, HW, d)
        kv = self.key_value(self.context_norm(context)).reshape(b, context.shape[1], 2, self.heads, d)
        k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, d)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """``eps_theta(x_t, t[, y][, context])``: x (B, C, H, W), t (B,) int or float, y (B,) int labels or None,
    context (B, L, context_dim) or None (the label tokens are used when the model has cross-attention).

    Returns (B, C_out, H, W).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        base = config.base_channels
        emb_dim = config.time_embedding_dim or 4 * base
        timed = config.time_conditioning != "none"
        self.time_mlp = (
            nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) if timed else None
        )
        additive = config.num_classes and config.class_conditioning in ("add", "both")
        self.class_embedding = nn.Embedding(config.num_classes + 1, emb_dim) if additive else None
        context_dim = config.context_dim or emb_dim
        self.context_dim = context_dim
        self.class_context = (
            nn.Embedding(config.num_classes + 1, config.context_tokens * context_dim)
            if config.class_conditioning in ("cross", "both")
            else None
        )
        if not timed and self.class_embedding is None:
            emb_dim = 0  # nothing to embed: the residual blocks get no embedding input
        film = config.time_conditioning == "film"
        groups = config.norm_groups

        def block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, groups, config.dropout, film)

        def cross(width: int) -> CrossAttention:
            return CrossAttention(width, context_dim, groups, config.attention_head_channels)

        self.stem = nn.Conv2d(config.in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [base]
        channels = base
        levels = len(config.channel_mults)
        for level, mult in enumerate(config.channel_mults):
            width = base * mult
            for _ in range(config.num_res_blocks):
                stage = nn.ModuleList([block(channels, width)])
                if level in config.attention_levels:
                    stage.append(SelfAttention(width, groups, config.attention_head_channels))
                if level in config.cross_attention_levels:
                    stage.append(cross(width))
                self.down.append(stage)
                channels = width
                skips.append(channels)
            if level < levels - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(channels, channels, 3, stride=2, padding=1)]))
                skips.append(channels)
        self.mid1 = block(channels, channels)
        self.mid_attention = (
            SelfAttention(channels, groups, config.attention_head_channels) if config.mid_attention else None
        )
        self.mid_cross_attention = cross(channels) if config.mid_cross_attention else None
        self.mid2 = block(channels, channels)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mults))):
            width = base * mult
            for _ in range(config.num_res_blocks + 1):
                stage = nn.ModuleList([block(channels + skips.pop(), width)])
                if level in config.attention_levels:
                    stage.append(SelfAttention(width, groups, config.attention_head_channels))
                if level in config.cross_attention_levels:
                    stage.append(cross(width))
                self.up.append(stage)
                channels = width
            if level > 0:
                # A 2 x 2 transposed convolution with stride 2: one tap per output pixel, so upsampling costs a
                # ninth of nearest-neighbour + 3 x 3 conv at the high resolution, with no checkerboard overlap.
                self.up.append(nn.ModuleList([nn.ConvTranspose2d(channels, channels, 2, stride=2)]))
        self.out_norm = nn.GroupNorm(groups, channels)
        self.out_conv = nn.Conv2d(channels, config.out_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def embed(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor | None:
        """Time (and class) embedding, (B, emb_dim); ``None`` for a U-Net with neither (``"none"``, no classes)."""
        emb = None
        if self.time_mlp is not None:
            emb = self.time_mlp(sinusoidal_embedding(t.float() * self.config.time_scale, self.config.base_channels))
        if self.class_embedding is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.config.num_classes, device=t.device, dtype=torch.long)
            label = self.class_embedding(y)
            emb = label if emb is None else emb + label
        return emb

    def label_context(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """The labels as a context sequence (B, context_tokens, context_dim) (None -> the null label)."""
        if self.class_context is None:
            raise ValueError("this U-Net has no label context (class_conditioning is 'add')")
        if y is None:
            y = torch.full((batch,), self.config.num_classes, device=device, dtype=torch.long)
        return self.class_context(y).reshape(batch, self.config.context_tokens, self.context_dim)

    def _stage_extras(self, stage: nn.ModuleList, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """The attention layers after a stage's residual block: h (B, C, H, W), context (B, L, context_dim) or None
        -> (B, C, H, W)."""
        for extra in stage[1:]:
            h = extra(h, context) if isinstance(extra, CrossAttention) else extra(h)
        return h

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,), y: (B,) or None, context: (B, L, context_dim) or None -> (B, C_out, H, W);
        H and W need not divide by the downsampling factor (the input is padded and the output cropped)."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"UNet expects (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if self.config.has_cross_attention and context is None:
            if self.class_context is None:
                raise ValueError("this U-Net has cross-attention: pass context (B, L, context_dim)")
            context = self.label_context(y, x.shape[0], x.device)
        height, width = x.shape[-2:]
        if self.stem.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # NHWC: oneDNN's fast path on CPU
        factor = self.config.downsample_factor
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h or pad_w:  # pad to a multiple of the downsampling factor, crop back at the end
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        emb = self.embed(t, y)
        h = self.stem(x)
        skips = [h]
        for stage in self.down:
            if isinstance(stage[0], ResBlock):
                h = self._stage_extras(stage, stage[0](h, emb), context)
            else:
                h = stage[0](h)
            skips.append(h)
        h = self.mid1(h, emb)
        if self.mid_attention is not None:
            h = self.mid_attention(h)
        if self.mid_cross_attention is not None:
            h = self.mid_cross_attention(h, context)
        h = self.mid2(h, emb)
        for stage in self.up:
            if isinstance(stage[0], ResBlock):
                h = self._stage_extras(stage, stage[0](torch.cat([h, skips.pop()], dim=1), emb), context)
            else:
                h = stage[0](h)
        h = self.out_conv(F.silu(self.out_norm(h)))
        return h[..., :height, :width] if (pad_h or pad_w) else h


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(config: UNetConfig, size: int) -> str:
    """A one-line summary: resolutions and channels per level, parameter count."""
    model = UNet(config)
    resolutions = [math.ceil(size / 2**i) for i in range(len(config.channel_mults))]
    levels = ", ".join(f"{r}x{r}:{m * config.base_channels}" for r, m in zip(resolutions, config.channel_mults))
    extras = ""
    if config.time_conditioning == "none":
        extras += ", no time input"
    if config.attention_levels:
        extras += ", self-attention at " + ", ".join(
            f"{resolutions[i]}x{resolutions[i]}" for i in sorted(config.attention_levels)
        )
    if config.cross_attention_levels:
        extras += ", cross-attention at " + ", ".join(
            f"{resolutions[i]}x{resolutions[i]}" for i in sorted(config.cross_attention_levels)
        )
    return f"U-Net [{levels}], {config.num_res_blocks} res blocks/level{extras}, {count_parameters(model):,} parameters"
