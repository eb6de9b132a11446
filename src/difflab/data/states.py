"""The STATES data set: five US state outlines as 2-D point clouds.

Labels (the reference's order): 0 Michigan, 1 Idaho, 2 Ohio, 3 Oklahoma, 4 Wisconsin; 1,000 points
each. The points are built from public-domain Census outlines (PyPI ``coord2loc-usa``): each state's
exterior ring (both peninsulas for Michigan) is projected with ``x = lon cos(mean lat), y = lat``,
mapped onto its box (axis by axis), sampled uniformly by arc length and jittered by N(0, 0.015^2)
for line thickness; the whole set is then standardised with fixed constants.

The generated arrays (training seed 0, held-out seed 1) ship with the package, so running needs
neither the outline package nor network access; :func:`build_states` regenerates them and a test
checks that the shipped files equal a fresh build.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import zlib
from pathlib import Path

import numpy as np
import torch

from difflab.data.points import PointCloud
from difflab.errors import DataError

STATE_NAMES: tuple[str, ...] = ("Michigan", "Idaho", "Ohio", "Oklahoma", "Wisconsin")
POINTS_PER_STATE = 1000
JITTER_STD = 0.015
TRAIN_SEED = 0
HELDOUT_SEED = 1

# (xmin, xmax, ymin, ymax) of each outline in standardised coordinates, in label order.
STATE_BOXES: dict[str, tuple[float, float, float, float]] = {
    "Michigan": (-2.082, -0.748, -0.157, 1.121),
    "Idaho": (-1.041, -0.208, -1.686, -0.531),
    "Ohio": (-0.454, 0.460, 0.572, 1.514),
    "Oklahoma": (-0.114, 1.307, -1.861, -0.506),
    "Wisconsin": (0.773, 1.841, 0.043, 1.140),
}
# Number of polygon parts kept per state, largest first (Michigan: Lower and Upper Peninsula).
_PARTS_KEPT = {"Michigan": 2}

# Fixed standardisation constants: the mean and standard deviation (per axis) of the training set
# (seed 0) before standardisation. Held-out data uses the same constants so both live in one frame.
STANDARDISE_MEAN = (0.01092301, -0.02131577)
STANDARDISE_STD = (1.0156823, 1.03896753)

_DATA_PACKAGE = "difflab.data"
_SPLIT_FILES = {"train": "states_train.safetensors", "heldout": "states_heldout.safetensors"}


def _state_rings() -> dict[str, list[np.ndarray]]:
    """Exterior rings, (M, 2) arrays of (lon, lat), of the parts kept for each state."""
    try:
        import msgpack
        import shapely
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise DataError(f"building STATES needs msgpack and shapely ({exc})") from None
    try:
        root = importlib.resources.files("coord2loc_usa") / "data"
        polygons = msgpack.unpackb(zlib.decompress((root / "polygons.msgpack").read_bytes()))
        meta = msgpack.unpackb(zlib.decompress((root / "meta.msgpack").read_bytes()))
    except ModuleNotFoundError:
        raise DataError(
            "building STATES from outlines needs the package coord2loc-usa "
            "(pip install coord2loc-usa); the shipped arrays need nothing"
        ) from None
    names = [m["administrative_region"] for m in meta]
    rings: dict[str, list[np.ndarray]] = {}
    for state in STATE_NAMES:
        geometry = shapely.from_wkb(polygons[names.index(state)])
        parts = list(getattr(geometry, "geoms", [geometry]))
        parts.sort(key=lambda part: part.area, reverse=True)
        kept = parts[: _PARTS_KEPT.get(state, 1)]
        rings[state] = [np.asarray(part.exterior.coords, dtype=np.float64) for part in kept]
    return rings


def _sample_outline(
    rings: list[np.ndarray], box: tuple[float, float, float, float], n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` points uniform by arc length on the rings, after projecting and fitting them to ``box``."""
    mean_lat = np.concatenate([ring[:, 1] for ring in rings]).mean()
    projected = [np.stack([r[:, 0] * np.cos(np.deg2rad(mean_lat)), r[:, 1]], axis=1) for r in rings]
    stacked = np.concatenate(projected)
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    box_low = np.array([box[0], box[2]])
    box_high = np.array([box[1], box[3]])
    fitted = [box_low + (p - low) / (high - low) * (box_high - box_low) for p in projected]
    # Segments of every ring, with their lengths: a point at arc length u lies on the segment
    # whose cumulative length first exceeds u.
    starts = np.concatenate([ring[:-1] for ring in fitted])
    ends = np.concatenate([ring[1:] for ring in fitted])
    lengths = np.linalg.norm(ends - starts, axis=1)
    cumulative = np.cumsum(lengths)
    u = rng.uniform(0.0, cumulative[-1], size=n)
    segment = np.searchsorted(cumulative, u, side="right").clip(max=len(lengths) - 1)
    fraction = (u - (cumulative[segment] - lengths[segment])) / np.maximum(lengths[segment], 1e-12)
    points = starts[segment] + fraction[:, None] * (ends[segment] - starts[segment])
    return points + rng.normal(0.0, JITTER_STD, size=points.shape)


def build_states(seed: int, standardise: bool = True) -> PointCloud:
    """Build STATES from the Census outlines (needs ``coord2loc-usa``).

    Returns 5 x 1,000 points, labels in :data:`STATE_NAMES` order. ``seed`` fixes the arc-length
    positions and the jitter (0 for training, 1 for held-out data).
    """
    rings = _state_rings()
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for label, state in enumerate(STATE_NAMES):
        points.append(_sample_outline(rings[state], STATE_BOXES[state], POINTS_PER_STATE, rng))
        labels.append(np.full(POINTS_PER_STATE, label, dtype=np.int64))
    data = np.concatenate(points)
    if standardise:
        data = (data - np.array(STANDARDISE_MEAN)) / np.array(STANDARDISE_STD)
    return PointCloud(torch.from_numpy(data.astype(np.float32)), torch.from_numpy(np.concatenate(labels)), STATE_NAMES)


def shipped_states_path(split: str) -> Path:
    """Path of the shipped safetensors file of a split (``train`` or ``heldout``)."""
    if split not in _SPLIT_FILES:
        raise DataError(f"unknown STATES split {split!r}; choose one of {sorted(_SPLIT_FILES)}")
    return Path(str(importlib.resources.files(_DATA_PACKAGE) / _SPLIT_FILES[split]))


def load_states(split: str = "train") -> PointCloud:
    """The shipped STATES arrays: ``split`` is ``train`` (seed 0) or ``heldout`` (seed 1)."""
    from safetensors.torch import load_file

    path = shipped_states_path(split)
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # a missing or damaged package file
        raise DataError(f"cannot read the shipped STATES file {path}: {exc}") from None
    return PointCloud(tensors["data"], tensors["labels"], STATE_NAMES)


def write_shipped_states(directory: Path) -> dict[str, str]:
    """Regenerate the shipped files into ``directory``; returns their sha256 digests."""
    from safetensors.torch import save_file

    digests = {}
    for split, seed in (("train", TRAIN_SEED), ("heldout", HELDOUT_SEED)):
        cloud = build_states(seed)
        path = directory / _SPLIT_FILES[split]
        save_file({"data": cloud.data.contiguous(), "labels": cloud.labels.contiguous()}, str(path))
        digests[split] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests
