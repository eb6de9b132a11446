"""InceptionV3 as used for the standard FID / IS (the TensorFlow 2015-12-05 graph), without torchvision.

The layer names follow the PyTorch port of the FID network (pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, the same file torch-fidelity and torchmetrics load as
``weights-inception-2015-12-05-6726825d.pth``), so that state dict loads as is: ``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch5x5_1.bn.running_mean``, ..., ``fc.weight`` (1008 x 2048). Nothing is downloaded: the
user passes a local file (``.pth`` read with ``torch.load(weights_only=True)``, or ``.safetensors``).

It differs from torchvision's classifier InceptionV3 where TensorFlow's graph did: average pools in the
A, C and first E blocks exclude the zero padding, the last E block max-pools, batch-norm eps is 1e-3,
and inputs on the 0..255 scale are resized to 299 x 299 and scaled by ``(x - 128) / 128``. Outputs: the
2048-d pool features (FID) and the 1008 "unbiased" logits ``pool @ fc.weight.T`` (IS), as
torch-fidelity defines them.

Resizing, ``resize=``: ``"torchmetrics"`` (default; torchmetrics >= 1.0 with its default
``antialias=True``): ``F.interpolate(bilinear, align_corners=False, antialias=True)``; ``"tf1"``
(torch-fidelity and the original TensorFlow code): TensorFlow 1.x bilinear without half-pixel centres.
They differ slightly for small images, so FIDs are comparable only under the same choice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import CheckpointError, torch_load_problem

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
RESIZE_MODES = ("torchmetrics", "tf1")


def tf1_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) float to (N, C, size, size) as TensorFlow 1.x ``resize_bilinear``
    with ``align_corners=False``: output pixel ``i`` samples input position ``i * H / size`` (no half-pixel
    centres), interpolating between ``floor`` and ``min(floor + 1, H - 1)``."""

    def axis(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per output pixel along one axis: ``(floor, floor + 1 clamped, fraction)``, each (size,) (int64, int64,
        the images' dtype)."""
        position = torch.arange(size, dtype=torch.float32, device=images.device) * torch.tensor(
            in_size / size, dtype=torch.float32
        )
        low = position.long()
        high = (low + 1).clamp(max=in_size - 1)
        return low, high, (position - low.float()).to(images.dtype)

    y_low, y_high, y_frac = axis(images.shape[2])
    x_low, x_high, x_frac = axis(images.shape[3])
    top, bottom = images[:, :, y_low, :], images[:, :, y_high, :]
    rows = top + (bottom - top) * y_frac.view(1, 1, -1, 1)
    left, right = rows[:, :, :, x_low], rows[:, :, :, x_high]
    return left + (right - left) * x_frac.view(1, 1, 1, -1)


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; parameters named ``conv.*`` and ``bn.*``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], **kwargs: int | tuple
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) -> (N, out_channels, H', W'), H' and W' as the convolution's kernel, stride and
        padding give them."""
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3 x 3 average pool, stride 1, padding excluded from the mean: (N, C, H, W) -> (N, C, H, W)."""
    # TensorFlow's 3x3/1 'SAME' average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) -> (N, 224 + pool_features, H, W)."""
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_avg_pool_same(x)),
            ],
            dim=1,
        )


class BlockB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C + 480, (H - 3) // 2 + 1, (W - 3) // 2 + 1): 35 x 35 -> 17 x 17 in the network."""
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1) -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        row, col = {"padding": (0, 3)}, {"padding": (3, 0)}
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), **row)
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), **col)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), **col)
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), **row)
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), **col)
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), **row)
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) -> (N, 768, H, W)."""
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                double,
                self.branch_pool(_avg_pool_same(x)),
            ],
            dim=1,
        )


class BlockD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) -> (N, C + 512, (H - 3) // 2 + 1, (W - 3) // 2 + 1): 17 x 17 -> 8 x 8 in the network."""
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), seven, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1
        )


class BlockE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches -> 2048 channels; ``max_pool`` for the last block (Mixed_7c)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W) -> (N, 2048, H, W)."""
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_same(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(single),
                self.branch3x3_2b(single),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class InceptionV3FID(nn.Module):
    """The FID InceptionV3. ``forward(images)`` -> (pool features (N, 2048), unbiased logits (N, 1008)).

    images: (N, 3, H, W), uint8 or float on the 0..255 scale (any H, W: resized to 299 x 299 as ``resize`` says).
    """

    def __init__(self, resize: str = "torchmetrics") -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        self.resize = resize
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, channels_7x7=128)
        self.Mixed_6c = BlockC(768, channels_7x7=160)
        self.Mixed_6d = BlockC(768, channels_7x7=160)
        self.Mixed_6e = BlockC(768, channels_7x7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) on the 0..255 scale -> pool features (N, 2048), unbiased logits (N, 1008), float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if self.resize == "tf1":
            x = tf1_bilinear_resize(x, INPUT_SIZE)
        else:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
            x = block(x)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ends at 2048 x 8 x 8
        pool = x.mean(dim=(2, 3))
        return pool, pool @ self.fc.weight.T


def _is_counter(name: str) -> bool:
    return name.endswith("num_batches_tracked")


def load_inception_v3(path: Path | str, resize: str = "torchmetrics") -> InceptionV3FID:
    """An :class:`InceptionV3FID` (eval mode, no gradients) with the state dict in the local file ``path``.

    ``.safetensors`` files are read with safetensors, anything else with ``torch.load(weights_only=True)``
    (a plain state dict, e.g. ``pt_inception-2015-12-05-6726825d.pth``; never unpickles code). BatchNorm
    ``num_batches_tracked`` counters may be present or not. Missing, extra or mis-shaped tensors raise
    :class:`CheckpointError` naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"InceptionV3 weights {path} do not exist (nothing is downloaded: give a local file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read InceptionV3 weights {path} ({torch_load_problem(exc)})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"InceptionV3 weights {path} are not a state dict of tensors")
    model = InceptionV3FID(resize=resize)
    own = {k: v for k, v in model.state_dict().items() if not _is_counter(k)}
    given = {k: v for k, v in state.items() if not _is_counter(k)}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = sorted(k for k in set(own) & set(given) if own[k].shape != given[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes))
            if keys
        )
        raise CheckpointError(f"{path} is not an FID InceptionV3 state dict: {detail}")
    model.load_state_dict(given, strict=False)
    return model.eval().requires_grad_(False)
