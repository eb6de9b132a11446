"""Frames of a denoising trajectory as PNG bytes: points as two scatters (x_t, predicted x_0), images as two
grids. Built on matplotlib's object API (no pyplot state), so a threaded server can render frames."""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from difflab.sampling.trajectory import Trajectory

GRID_ITEMS = 16


def point_limits(trajectory: Trajectory, margin: float = 0.3) -> tuple[float, float, float, float]:
    """Fixed axes for every frame: the spread of the start (x_T) and of the final prediction (the samples),
    so early predictions of x_0, which can be far off, do not rescale the view. Returns (x0, x1, y0, y1)."""
    start = trajectory.x_t[0].reshape(-1, trajectory.x_t.shape[-1])[:, :2]
    end = trajectory.x0_pred[-1].reshape(-1, trajectory.x0_pred.shape[-1])[:, :2]
    points = torch.cat([start, end]).float()
    low = torch.quantile(points, 0.002, dim=0) - margin
    high = torch.quantile(points, 0.998, dim=0) + margin
    return float(low[0]), float(high[0]), float(low[1]), float(high[1])


def _points_png(trajectory: Trajectory, frame: int, dpi: int) -> bytes:
    x0, x1, y0, y1 = point_limits(trajectory)
    t = int(trajectory.timesteps[frame])
    figure = Figure(figsize=(8, 4), dpi=dpi)
    FigureCanvasAgg(figure)
    for k, (name, tensor) in enumerate((("x_t", trajectory.x_t), ("predicted x_0", trajectory.x0_pred))):
        ax = figure.add_subplot(1, 2, k + 1)
        points = tensor[frame].float().numpy()
        ax.scatter(points[:, 0], points[:, 1], s=3, c="tab:blue" if k == 0 else "tab:orange", alpha=0.6)
        ax.set(xlim=(x0, x1), ylim=(y0, y1), aspect="equal", title=f"{name} at t = {t}")
        ax.tick_params(labelsize=7)
    figure.suptitle(f"frame {frame + 1} of {trajectory.num_frames}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def image_grid(images: torch.Tensor, columns: int = 4, scale: int = 0) -> np.ndarray:
    """images (B, C, H, W) in [-1, 1] -> one (rows*H, columns*W, 3) uint8 grid (C is 1 or 3)."""
    images = images[:GRID_ITEMS].float().clamp(-1, 1)
    count, channels, height, width = images.shape
    if channels == 1:
        images = images.expand(count, 3, height, width)
    elif channels != 3:
        images = images[:, :1].expand(count, 3, height, width)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = -(-count // columns)
    grid = np.full((rows * (height + 2), columns * (width + 2), 3), 255, dtype=np.uint8)
    for k in range(count):
        r, c = divmod(k, columns)
        grid[
            r * (height + 2) + 1 : r * (height + 2) + 1 + height, c * (width + 2) + 1 : c * (width + 2) + 1 + width
        ] = pixels[k]
    scale = scale or max(1, 112 // max(height, width))
    return np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)


def _images_png(trajectory: Trajectory, frame: int) -> bytes:
    left, right = image_grid(trajectory.x_t[frame]), image_grid(trajectory.x0_pred[frame])
    gap = np.full((left.shape[0], 16, 3), 255, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.concatenate([left, gap, right], axis=1)).save(buffer, format="PNG")
    return buffer.getvalue()


def render_frame(trajectory: Trajectory, frame: int, dpi: int = 80) -> bytes:
    """PNG bytes of ``frame`` (0-based): x_t beside the predicted x_0."""
    if not 0 <= frame < trajectory.num_frames:
        raise IndexError(f"frame {frame} out of range 0..{trajectory.num_frames - 1}")
    if trajectory.kind == "images" and trajectory.x_t.dim() == 5:
        return _images_png(trajectory, frame)
    return _points_png(trajectory, frame, dpi)
