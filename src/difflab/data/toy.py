"""Toy 2-D data sets from scikit-learn and a spiral, standardised with the training set's statistics."""

from __future__ import annotations

import numpy as np
import torch

from difflab.data.points import PointCloud
from difflab.errors import ConfigError

TOY_NAMES = ("swissroll", "spiral", "moons")


def _raw(name: str, n: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "swissroll":
        from sklearn.datasets import make_swiss_roll

        points, position = make_swiss_roll(n, noise=noise, random_state=seed)
        return points[:, [0, 2]], np.zeros(n, dtype=np.int64)  # the roll's cross-section (x, z)
    if name == "moons":
        from sklearn.datasets import make_moons

        points, labels = make_moons(n, noise=noise, random_state=seed)
        return points, labels.astype(np.int64)
    if name == "spiral":
        rng = np.random.default_rng(seed)
        theta = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi + 0.5 * np.pi  # uniform-ish in arc length
        points = np.stack([theta * np.cos(theta), theta * np.sin(theta)], axis=1) / (3.5 * np.pi)
        return points + rng.normal(0, noise, points.shape), np.zeros(n, dtype=np.int64)
    raise ConfigError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")


def make_toy(name: str, n: int, noise: float, seed: int, reference_seed: int = 0) -> PointCloud:
    """``n`` points of a toy set drawn with ``seed``, standardised by the mean and std of the set drawn
    with ``reference_seed`` (so training and held-out points share one frame). Shape (n, 2)."""
    if n < 10:
        raise ConfigError(f"a toy data set needs at least 10 points, got {n}")
    if not noise >= 0:  # also refuses NaN
        raise ConfigError(f"data.noise is the std of the Gaussian added to each point and must be >= 0, got {noise}")
    points, labels = _raw(name, n, noise, seed)
    reference, _ = _raw(name, n, noise, reference_seed)
    standardised = (points - reference.mean(axis=0)) / reference.std(axis=0)
    classes = int(labels.max()) + 1
    names = tuple(f"{name} {k}" for k in range(classes)) if classes > 1 else (name,)
    return PointCloud(torch.from_numpy(standardised.astype(np.float32)), torch.from_numpy(labels), names)
