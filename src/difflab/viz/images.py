"""Image grids and PNG files for images in [-1, 1] (Pillow; matplotlib only for labelled panels).

``make_grid`` lays out (N, C, H, W) like torchvision's function of that name (rows of ``nrow`` images,
``padding`` pixels between them and around the border) without needing torchvision.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile images (N, C, H, W) into one image (C, H', W').

    ``min(nrow, N)`` images per row and ``ceil(N / nrow)`` rows, each cell (H + padding) x (W + padding)
    with ``padding`` extra on the top/left border: H' = rows (H + padding) + padding, W' likewise.
    The gaps are ``pad_value`` (same units as the images: 1.0 is white in [-1, 1]).
    """
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"make_grid needs images (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"nrow must be >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, columns * cell_w + padding), pad_value)
    for index in range(count):
        top, left = (index // columns) * cell_h + padding, (index % columns) * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def to_uint8_array(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1], C in {1, 3} -> (H, W) or (H, W, 3) uint8 (clipped, rounded)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (1 or 3, H, W), got {tuple(image.shape)}")
    levels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = levels.permute(1, 2, 0).numpy()
    return array[:, :, 0] if array.shape[2] == 1 else array


def save_image(image: torch.Tensor, path: Path | str, nrow: int | None = None) -> Path:
    """Write an image (C, H, W) or a batch (N, C, H, W) (tiled by :func:`make_grid`) in [-1, 1] as PNG.

    Grayscale (C = 1) is stored as 8-bit gray, C = 3 as RGB. The file is written atomically.
    """
    if image.ndim == 4:
        image = make_grid(image, nrow=nrow or math.ceil(math.sqrt(len(image))))
    picture = Image.fromarray(to_uint8_array(image))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_grid(images: torch.Tensor, path: Path | str, nrow: int = 8, padding: int = 2) -> Path:
    """:func:`make_grid` of images (N, C, H, W) in [-1, 1], saved as a PNG."""
    return save_image(make_grid(images, nrow=nrow, padding=padding), path)


def load_image(path: Path | str) -> torch.Tensor:
    """Read a PNG written by :func:`save_image` back as (C, H, W) float in [-1, 1] (C = 1 for gray)."""
    with Image.open(path) as picture:
        array = np.asarray(picture.convert("L" if picture.mode in ("1", "L", "I;16") else "RGB"))
    tensor = torch.from_numpy(array.copy()).float()
    tensor = tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def image_rows_figure(
    rows: Sequence[tuple[str, torch.Tensor]], path: Path | str, title: str = "", max_per_row: int = 16
) -> Path:
    """A figure with one labelled strip per row: ``rows[i] = (label, images (N_i, C, H, W) in [-1, 1])``.

    Each strip shows the first ``max_per_row`` images side by side; the label is written on its left.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("image_rows_figure needs at least one row")
    strips = [make_grid(images[:max_per_row], nrow=max_per_row, padding=1) for _, images in rows]
    width = max(strip.shape[2] for strip in strips)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(4.0, width / 28), 0.9 * len(rows) + 0.6), squeeze=False)
    for axis, (label, _), strip in zip(axes[:, 0], rows, strips):
        array = to_uint8_array(strip)
        axis.imshow(array, cmap="gray" if array.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlim(-0.5, width - 0.5)
        axis.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        for spine in axis.spines.values():
            spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
