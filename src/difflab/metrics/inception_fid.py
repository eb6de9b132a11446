"""Standard InceptionV3 FID and IS from a local weights file (optional; slow on a CPU).

Conventions (torchmetrics' FrechetInceptionDistance / InceptionScore, built on torch-fidelity's
network): images in [-1, 1] become 8-bit RGB (``round(255 (x + 1) / 2)``; grayscale is repeated over
3 channels), the network resizes them to 299 x 299 (``resize="torchmetrics"``: torch bilinear with
antialias, torchmetrics' default; ``"tf1"``: torch-fidelity's TensorFlow 1.x resize) and the FID uses
the 2048-d pool features with unbiased covariances; the IS uses the softmax of the 1008 unbiased
logits in 10 splits (taken in sample order: torch-fidelity shuffles with a fixed seed first,
torchmetrics with a random one). torchmetrics' ``normalize=True`` truncates ``x * 255`` to uint8
where this rounds: at most one gray level apart.

CPU cost: ~5.7 G multiply-adds per image, measured ~0.6 s per image on one core (so ~1.5 hours for the
10k MNIST test reference, which is then cached; a GPU takes seconds). The reference set's
statistics are cached on disk per weights checksum, resize mode and reference name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflab.data.images import to_unit
from difflab.errors import CheckpointError
from difflab.metrics.frechet import feature_statistics, inception_score, psd_sqrt, reference_fid
from difflab.models.inception import load_inception_v3
from difflab.progress import progress_bar
from difflab.training import checkpoint as ckpt

IS_SPLITS = 10


def to_uint8_rgb(images: torch.Tensor) -> torch.Tensor:
    """images (N, 1 or 3, H, W) in [-1, 1] -> (N, 3, H, W) uint8 0..255 (rounded, clipped)."""
    levels = (to_unit(images.clamp(-1.0, 1.0)) * 255.0).round().to(torch.uint8)
    return levels.expand(-1, 3, -1, -1) if levels.shape[1] == 1 else levels


class InceptionClassifier(torch.nn.Module):
    """The FID InceptionV3 as the classifier of an :class:`~difflab.metrics.image_eval.ImageEvaluator` (for data
    without a classifier of its own): ``features_and_logits(images (B, C, H, W) in [-1, 1])`` -> (pool features
    (B, 2048), logits (B, 1008)), the images made 8-bit RGB first as :func:`to_uint8_rgb` does."""

    def __init__(self, weights: Path | str, resize: str = "torchmetrics") -> None:
        super().__init__()
        self.network = load_inception_v3(weights, resize=resize)
        self.resize = resize

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) in [-1, 1], C = 1 or 3 -> pool features (B, 2048), logits (B, 1008)."""
        return self.network(to_uint8_rgb(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> pool features (B, 2048)."""
        return self.features_and_logits(images)[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> logits (B, 1008)."""
        return self.features_and_logits(images)[1]


class InceptionScorer:
    """FID / IS with the InceptionV3 FID network loaded from the local file ``weights``."""

    def __init__(
        self,
        weights: Path | str,
        device: torch.device | str = "cpu",
        cache_dir: Path | str | None = None,
        batch_size: int = 50,
        echo: Callable[[str], object] = print,
        resize: str = "torchmetrics",
    ) -> None:
        self.model = load_inception_v3(weights, resize=resize).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.echo = echo
        self.weights_digest = ckpt.tensor_digest(self.model.state_dict())[:16]
        self._reference: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._reference_roots: dict[tuple[str, int], torch.Tensor] = {}  # psd_sqrt of each reference covariance

    @torch.inference_mode()
    def features_and_probs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [-1, 1] -> pool features (N, 2048) and class probabilities (N, 1008)."""
        features, probs = [], []
        starts = range(0, len(images), self.batch_size)
        for start in progress_bar(starts, desc="InceptionV3", disable=len(starts) < 4):
            batch = to_uint8_rgb(images[start : start + self.batch_size]).to(self.device)
            pool, logits = self.model(batch)
            features.append(pool.double().cpu())
            probs.append(torch.softmax(logits.double(), dim=1).cpu())
        return torch.cat(features), torch.cat(probs)

    def reference_statistics(self, reference: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (2048,) and covariance (2048, 2048), float64, of the pool features of the reference images
        (N, C, H, W) in [-1, 1]; cached in memory and on disk."""
        key = (name, len(reference))
        if key in self._reference:
            return self._reference[key]
        path = None
        if self.cache_dir is not None:
            stem = f"{name}-{len(reference)}-{self.model.resize}-{self.weights_digest}"
            path = self.cache_dir / "inception_stats" / f"{stem}.safetensors"
        stats = None
        if path is not None and path.is_file():
            try:
                tensors, _ = ckpt.verified_tensors(path)
                stats = (tensors["mu"], tensors["sigma"])
            except (CheckpointError, KeyError) as exc:
                self.echo(f"recomputing InceptionV3 reference statistics: {exc}")
        if stats is None:
            self.echo(f"InceptionV3 features of {len(reference)} reference images ({name}); slow on a CPU")
            stats = feature_statistics(self.features_and_probs(reference)[0])
            if path is not None:
                tensors = {"mu": stats[0], "sigma": stats[1]}
                ckpt.atomic_save_tensors(tensors, path, {"sha256": ckpt.tensor_digest(tensors), "reference": name})
        self._reference[key] = stats
        return stats

    def evaluate(self, samples: torch.Tensor, reference: torch.Tensor, reference_name: str) -> dict[str, Any]:
        """``fid_inception`` (vs the reference images) and ``inception_score_inception`` of samples in [-1, 1]."""
        features, probs = self.features_and_probs(samples)
        splits = min(IS_SPLITS, len(samples))
        mean, cov = self.reference_statistics(reference, reference_name)
        root = None
        if len(features) >= features.shape[1]:  # reference_fid needs R^(1/2) there: one per reference, not per call
            key = (reference_name, len(reference))
            if key not in self._reference_roots:
                self._reference_roots[key] = psd_sqrt(cov)
            root = self._reference_roots[key]
        return {
            "fid_inception": reference_fid(features, mean, cov, root),
            "inception_score_inception": inception_score(probs, splits=splits),
        }
