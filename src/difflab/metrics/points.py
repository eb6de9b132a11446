"""Sample-quality metrics for 2-D point clouds.

- ``nll_course``: the reference course's grading: ``scipy.stats.gaussian_kde`` (Scott's rule) fitted to
  the training points of all classes; the score is the mean of ``-logpdf(samples)``. It is one-sided:
  samples piled on the densest part of the data score well, so it is always read beside
- ``nll_reverse``: held-out real points under a KDE fitted to the samples (punishes dropped modes), and
- ``nll_heldout``: the samples under a KDE of held-out real points.
- ``nearest_label_fraction``: the share of samples whose nearest real point carries the intended label
  (for outlines sampled densely, "nearest to the intended outline") and lies within reach of the sample (a tenth
  of the data's bounding-box diagonal, :func:`reach`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import gaussian_kde

from difflab.errors import DataError

# A sample counts as on a class's data when its nearest data point is at most this fraction of the data's
# bounding-box diagonal away (0.51 for the STATES map; its guided samples lie within 0.45, held-out points 0.05).
NEAR_FRACTION = 0.1


def _as_array(points: torch.Tensor | np.ndarray) -> np.ndarray:
    array = points.detach().cpu().double().numpy() if isinstance(points, torch.Tensor) else np.asarray(points, float)
    if array.ndim != 2:
        raise DataError(f"expected points of shape (N, D), got {array.shape}")
    return array


def check_finite(points: torch.Tensor | np.ndarray, what: str = "samples") -> None:
    """Raise a clear error when samples contain NaN or inf (a KDE would return NaN silently)."""
    array = _as_array(points)
    bad = int((~np.isfinite(array)).any(axis=1).sum())
    if bad:
        raise DataError(f"{bad} of {len(array)} {what} are NaN or infinite: the sampler diverged")


class KDE:
    """A Gaussian KDE (Scott's rule bandwidth) of reference points (N, D); ``nll(x)`` is ``mean(-log p(x))``."""

    def __init__(self, reference: torch.Tensor | np.ndarray) -> None:
        array = _as_array(reference)
        if len(array) <= array.shape[1]:
            raise DataError(f"a KDE needs more than {array.shape[1]} points, got {len(array)}")
        self.kde = gaussian_kde(array.T)

    def log_density(self, points: torch.Tensor | np.ndarray) -> np.ndarray:
        """``log p(x)`` for each point, shape (N,)."""
        return self.kde.logpdf(_as_array(points).T)

    def nll(self, points: torch.Tensor | np.ndarray) -> float:
        """Mean ``-log p(x)`` over ``points`` (M, D); refuses NaN or infinite points."""
        check_finite(points)
        return float(-self.log_density(points).mean())


def nll_course(samples: torch.Tensor, train_points: torch.Tensor) -> float:
    """Mean ``-log p_KDE(samples)`` of samples (M, 2) under a KDE of all training points (N, 2) (the reference's
    grade)."""
    return KDE(train_points).nll(samples)


def nll_reverse(samples: torch.Tensor, heldout_points: torch.Tensor) -> float:
    """Mean ``-log q_KDE(heldout)`` of held-out points (N, 2) under a KDE of the samples (M, 2): low only if the
    samples cover the data."""
    check_finite(samples)
    return KDE(samples).nll(heldout_points)


def nearest(points: torch.Tensor, reference: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point (N, D): the Euclidean distance to its nearest reference point (R, D) and that point's index,
    ((N,) float32, (N,) int64), by ``cdist`` over chunks of points."""
    points = points.detach().float().cpu()
    reference = reference.float().cpu()
    distances, indices = [], []
    for start in range(0, len(points), chunk):
        found = torch.cdist(points[start : start + chunk], reference).min(dim=1)
        distances.append(found.values)
        indices.append(found.indices)
    if not distances:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(distances), torch.cat(indices)


def nearest_labels(
    points: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor, chunk: int = 4096
) -> torch.Tensor:
    """Label of the nearest reference point (R, D) with labels (R,) for each point (N, D): (N,) int64."""
    return reference_labels.cpu()[nearest(points, reference, chunk)[1]]


def nearest_distances(points: torch.Tensor, reference: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance from each point (N, D) to its nearest reference point (R, D): (N,) float32."""
    return nearest(points, reference, chunk)[0]


def reach(reference: torch.Tensor, fraction: float = NEAR_FRACTION) -> float:
    """``fraction`` of the diagonal of the bounding box of ``reference`` (R, D): how far from the data a point may
    lie and still count as on it in :func:`nearest_label_fraction`."""
    extent = reference.float().amax(dim=0) - reference.float().amin(dim=0)
    return fraction * float(extent.norm())


def nearest_label_fraction(
    samples: torch.Tensor,
    label: int,
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    max_distance: float = math.inf,
) -> float:
    """Share of ``samples`` (N, D) whose nearest reference point (R, D), labels (R,), has label ``label`` and lies
    within ``max_distance`` of the sample (e.g. :func:`reach` of the reference), so that samples thrown far off the
    data do not count as on the intended class however their nearest point is labelled."""
    distances, indices = nearest(samples, reference)
    hit = (reference_labels.cpu()[indices] == label) & (distances <= max_distance)
    return float(hit.float().mean())


def label_histogram(
    samples: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor, num_classes: int
) -> list[float]:
    """Fraction of samples (N, D) nearest to each class, (num_classes,) as a list (mode coverage of unconditional
    samples); reference (R, D), reference_labels (R,)."""
    labels = nearest_labels(samples, reference, reference_labels)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return (counts / max(len(labels), 1)).tolist()
