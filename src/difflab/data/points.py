"""Labelled 2-D point clouds: the container, a safe loader for a user's file, seeded splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.errors import ConfigError, DataError, torch_load_problem
from difflab.seeding import mix_seed, seeded_generator


@dataclass(frozen=True)
class PointCloud:
    """Labelled 2-D points. ``data``: (N, 2) float32; ``labels``: (N,) int64."""

    data: torch.Tensor
    labels: torch.Tensor
    names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.data.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.names) if self.names else int(self.labels.max()) + 1 if len(self.labels) else 0


def split_points(cloud: PointCloud, fraction: float, seed: int) -> tuple[PointCloud, PointCloud]:
    """A seeded random split into ``(rest, part)`` with ``fraction`` of the points in ``part``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"a split fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(cloud), generator=seeded_generator(mix_seed(seed, 0, 21)))
    size = max(1, int(round(len(cloud) * fraction)))
    part, rest = order[:size], order[size:]
    return (
        PointCloud(cloud.data[rest], cloud.labels[rest], cloud.names),
        PointCloud(cloud.data[part], cloud.labels[part], cloud.names),
    )


def load_point_file(path: str | Path, names: tuple[str, ...] | None = None) -> PointCloud:
    """A user's own labelled point file: a ``.pt`` dict ``{"data": (N, 2) float, "labels": (N,) int}``.

    Loaded with ``torch.load(..., weights_only=True)`` (nothing is unpickled) and checked; any
    problem raises :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(f"cannot read {path} as a torch file of tensors: {torch_load_problem(exc)}") from None
    if not isinstance(content, dict) or "data" not in content or "labels" not in content:
        raise DataError(f'{path} must hold a dict {{"data": (N, 2) float, "labels": (N,) int}}')
    data, labels = content["data"], content["labels"]
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or data.shape[1] != 2:
        raise DataError(f"{path}: 'data' must be a float tensor of shape (N, 2), got {_describe(data)}")
    if not data.is_floating_point():
        raise DataError(f"{path}: 'data' must be a float tensor, got dtype {data.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (data.shape[0],):
        raise DataError(f"{path}: 'labels' must be an int tensor of shape ({data.shape[0]},), got {_describe(labels)}")
    if labels.is_floating_point() or labels.is_complex():
        raise DataError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    if not torch.isfinite(data).all():
        raise DataError(f"{path}: 'data' holds NaN or infinite values")
    if data.shape[0] == 0 or labels.min() < 0:
        raise DataError(f"{path}: needs at least one point and labels >= 0")
    present = labels.unique()
    num_classes = int(present[-1]) + 1
    if len(present) != num_classes:  # labels {1000000, 1000001} once built a classifier of a million classes
        shown = ", ".join(str(int(v)) for v in present[:5]) + (", ..." if len(present) > 5 else "")
        raise DataError(
            f"{path}: 'labels' must number the classes 0 to K-1 with a point in each; found {len(present)} "
            f"distinct labels ({shown}) up to {num_classes - 1}: renumber them 0 to {len(present) - 1}"
        )
    if names is None or len(names) != num_classes:
        names = tuple(f"class {i}" for i in range(num_classes))
    return PointCloud(data.float(), labels.long(), names)


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}"
    return type(value).__name__
