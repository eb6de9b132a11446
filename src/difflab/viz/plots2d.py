"""Figures for 2-D experiments (matplotlib, Agg backend). Every function writes one PNG and returns its path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA_COLOUR = "#bbbbbb"
POINT_SIZE = 1.0
SAMPLE_SIZE = 0.3  # samples are drawn small and translucent so that density, not overplotting, shows


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _limits(*clouds: torch.Tensor, margin: float = 0.25) -> tuple[tuple[float, float], tuple[float, float]]:
    points = torch.cat([c.detach().float().cpu() for c in clouds])
    low = torch.quantile(points, 0.001, dim=0) - margin
    high = torch.quantile(points, 0.999, dim=0) + margin
    return (float(low[0]), float(high[0])), (float(low[1]), float(high[1]))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def scatter_over_data(samples: torch.Tensor, data: torch.Tensor, path: Path, title: str) -> Path:
    """Samples (blue) drawn over the training data (grey). samples, data: (N, 2)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(*_np(data).T, s=POINT_SIZE, c=DATA_COLOUR, label="training data")
    ax.scatter(*_np(samples).T, s=SAMPLE_SIZE, c="tab:blue", alpha=0.4, label=f"samples (n={len(samples)})")
    xlim, ylim = _limits(data)
    ax.set(xlim=xlim, ylim=ylim, title=title, aspect="equal")
    ax.legend(loc="lower left", markerscale=15, fontsize=8)
    return _save(fig, path)


def scatter_per_class(
    samples: Sequence[torch.Tensor],
    data: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    path: Path,
    title: str,
) -> Path:
    """One panel per class (its samples over that class's data) and a combined panel. samples[k]: (N_k, 2)."""
    count = len(samples)
    columns = min(count + 1, 3)
    rows = -(-(count + 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    xlim, ylim = _limits(data)
    for k, points in enumerate(samples):
        ax = axes.flat[k]
        ax.scatter(*_np(data).T, s=POINT_SIZE, c=DATA_COLOUR)
        ax.scatter(*_np(points).T, s=SAMPLE_SIZE, color=colours(k), alpha=0.4)
        ax.set(xlim=xlim, ylim=ylim, aspect="equal", title=f"{k} {names[k]}")
    ax = axes.flat[count]
    ax.scatter(*_np(data).T, s=POINT_SIZE, c=DATA_COLOUR)
    for k, points in enumerate(samples):
        ax.scatter(*_np(points).T, s=SAMPLE_SIZE, color=colours(k), alpha=0.3, label=names[k])
    ax.set(xlim=xlim, ylim=ylim, aspect="equal", title="all classes")
    ax.legend(loc="lower left", markerscale=15, fontsize=7)
    for ax in axes.flat[count + 1 :]:
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def panels(
    snapshots: Sequence[tuple[str, torch.Tensor]],
    path: Path,
    title: str,
    reference: torch.Tensor | None = None,
    limits: float | None = None,
) -> Path:
    """A row of scatter panels, one per ``(caption, points)``; ``reference`` drawn in grey behind each."""
    fig, axes = plt.subplots(1, len(snapshots), figsize=(3.3 * len(snapshots), 3.4), squeeze=False)
    bound = limits or 3.5
    for ax, (caption, points) in zip(axes.flat, snapshots, strict=True):
        if reference is not None:
            ax.scatter(*_np(reference).T, s=POINT_SIZE, c=DATA_COLOUR)
        ax.scatter(*_np(points).T, s=SAMPLE_SIZE * 3, c="tab:blue", alpha=0.5)
        ax.set(xlim=(-bound, bound), ylim=(-bound, bound), aspect="equal", title=caption)
        ax.tick_params(labelsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def curves(
    series: dict[str, tuple[Sequence[int], Sequence[float]]],
    path: Path,
    title: str,
    ylabel: str = "loss",
    log_y: bool = True,
) -> Path:
    """Line plot of named ``(steps, values)`` series."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (steps, values) in series.items():
        if len(steps):
            ax.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None, markersize=3)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    if log_y and all(v > 0 for _, values in series.values() for v in values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def prediction_map(
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    timesteps: Sequence[int],
    names: Sequence[str],
    path: Path,
    data: torch.Tensor,
    labels: torch.Tensor,
    resolution: int = 200,
) -> Path:
    """The plane coloured by the predicted class at several timesteps.

    ``predict(points (M, 2), t) -> (M,) int`` labels. Training data is overlaid in its class colours.
    """
    (x0, x1), (y0, y1) = _limits(data, margin=0.6)
    xs, ys = torch.linspace(x0, x1, resolution), torch.linspace(y0, y1, resolution)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    colours = plt.get_cmap("tab10")
    cmap = matplotlib.colors.ListedColormap([colours(k) for k in range(len(names))])
    fig, axes = plt.subplots(1, len(timesteps), figsize=(3.6 * len(timesteps), 3.6), squeeze=False)
    for ax, t in zip(axes.flat, timesteps, strict=True):
        predicted = predict(grid, t).reshape(resolution, resolution)
        ax.imshow(
            _np(predicted),
            origin="lower",
            extent=(x0, x1, y0, y1),
            cmap=cmap,
            alpha=0.45,
            vmin=-0.5,
            vmax=len(names) - 0.5,
            interpolation="nearest",
        )
        ax.scatter(*_np(data).T, s=0.3, c=[colours(int(k)) for k in labels], alpha=0.8)
        ax.set(title=f"t = {t}", aspect="equal", xlim=(x0, x1), ylim=(y0, y1))
        ax.tick_params(labelsize=7)
    handles = [matplotlib.patches.Patch(color=colours(k), label=name) for k, name in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), fontsize=8)
    fig.suptitle("Noisy classifier: predicted class over the plane")
    return _save(fig, path)


def score_field(
    fields: Sequence[tuple[str, torch.Tensor, torch.Tensor]], data: torch.Tensor, path: Path, title: str
) -> Path:
    """Arrow plots: each entry ``(caption, points (M, 2), vectors (M, 2))`` over the data."""
    fig, axes = plt.subplots(1, len(fields) + 1, figsize=(3.8 * (len(fields) + 1), 3.8), squeeze=False)
    xlim, ylim = _limits(data, margin=0.6)
    axes.flat[0].scatter(*_np(data).T, s=POINT_SIZE, c="black")
    axes.flat[0].set(title="data", aspect="equal", xlim=xlim, ylim=ylim)
    for ax, (caption, points, vectors) in zip(axes.flat[1:], fields, strict=True):
        ax.scatter(*_np(data).T, s=POINT_SIZE, c=DATA_COLOUR)
        norm = vectors.norm(dim=1, keepdim=True).clamp(min=1e-8)
        direction = vectors / norm
        ax.quiver(
            *_np(points).T,
            *_np(direction).T,
            _np(norm.squeeze(1).log()),
            angles="xy",
            scale=28,
            width=0.004,
            cmap="viridis",
        )
        ax.set(title=caption, aspect="equal", xlim=xlim, ylim=ylim)
    fig.suptitle(title)
    return _save(fig, path)
