"""The built-in image evaluator: FID, classifier inception score, class histogram and accuracy from a
small reference CNN trained once per machine (MNIST), or FID / IS with a local InceptionV3 (any folder of
images, :meth:`ImageEvaluator.for_image_folder`), plus calibration rows that say what the numbers mean.

The reference CNN (:class:`~difflab.models.classifiers.ReferenceCNN`) is trained on the 50k MNIST
training split to >= 99.0% test accuracy the first time it is needed and cached as
``reference_cnn.safetensors`` + ``reference_cnn.json`` in ``$DIFFLAB_CACHE`` (default
``~/.cache/difflab``). Its 128-d penultimate activations are the features of the FID; its softmax
gives the inception score (1 .. 10) and the class histogram. These numbers are comparable only with
other numbers from the same reference CNN (the JSON records its checksum); they are *not* the
InceptionV3 FID/IS of papers. Those are computed too when a local InceptionV3 weights file is given
(:mod:`difflab.models.inception`; nothing is downloaded), and are slow on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from difflab.data.images import ImageSet, from_unit, to_unit
from difflab.data.mnist import MNIST_SHA256, load_mnist
from difflab.errors import CheckpointError, DataError, DifflabError
from difflab.metrics.frechet import bootstrap_fid_std, feature_statistics, inception_score, psd_sqrt, reference_fid
from difflab.models.classifiers import ReferenceCNN
from difflab.progress import progress_bar
from difflab.training import checkpoint as ckpt

REFERENCE_NAME = "reference_cnn"
MIN_TEST_ACCURACY = 0.99
# Everything that decides the trained weights; a cached model trained with other settings is retrained.
REFERENCE_RECIPE: dict[str, Any] = {
    "version": 1,
    "model": {"in_channels": 1, "num_classes": 10, "width": 16, "feature_dim": 128, "image_size": 28, "dropout": 0.25},
    "data": "mnist train (50,000), no augmentation",
    "epochs": 3,
    "batch_size": 128,
    "optimizer": "Adam",
    "lr": 2e-3,
    "warmup_steps": 100,
    "lr_schedule": "linear warmup, cosine to 0",
    "seed": 0,
}


def default_cache_dir() -> Path:
    """``$DIFFLAB_CACHE`` if set, else ``~/.cache/difflab``."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab").expanduser()


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock (``flock``) so that two processes do not both train; a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic renames alone keep the files whole
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.inference_mode()
def classifier_accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Fraction of images (N, C, H, W) in [-1, 1] whose argmax logit equals the label (N,)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for part in _batches(len(images), batch_size):
        logits = model(images[part].to(device))
        correct += int((logits.argmax(dim=1).cpu() == labels[part]).sum())
    model.train(was_training)
    return correct / max(len(images), 1)


def train_reference_cnn(
    device: torch.device | str = "cpu", echo: Callable[[str], object] = print, epochs: int | None = None
) -> tuple[ReferenceCNN, dict[str, Any]]:
    """Train a :class:`ReferenceCNN` on MNIST train with :data:`REFERENCE_RECIPE`; returns it (eval mode) and
    an info dict with the test accuracy. ``epochs`` overrides the recipe (tests of the loop only)."""
    recipe = REFERENCE_RECIPE
    train, test = load_mnist("train"), load_mnist("test")
    epochs = recipe["epochs"] if epochs is None else epochs
    steps_per_epoch = math.ceil(len(train) / recipe["batch_size"])
    total_steps = epochs * steps_per_epoch
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator: seed it, restore after
        torch.manual_seed(recipe["seed"])
        model = ReferenceCNN(**recipe["model"]).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=recipe["lr"])

        def lr_at(step: int) -> float:
            warm = min(1.0, (step + 1) / recipe["warmup_steps"])
            return recipe["lr"] * warm * 0.5 * (1 + math.cos(math.pi * step / total_steps))

        generator = torch.Generator().manual_seed(recipe["seed"])
        model.train()
        step = 0
        bar = progress_bar(total=total_steps, desc="reference CNN")
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            for part in _batches(len(train), recipe["batch_size"]):
                index = order[part]
                images, labels = train.images[index].to(device), train.labels[index].to(device)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step)
                loss = F.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                bar.update(1)
                if step % 100 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    accuracy = classifier_accuracy(model, test.images, test.labels)
    info = {
        "test_accuracy": accuracy,
        "train_seconds": round(seconds, 1),
        "recipe": recipe,
        "mnist_sha256": MNIST_SHA256,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    echo(f"reference CNN trained in {seconds:.0f} s: MNIST test accuracy {accuracy:.2%}")
    return model, info


def _load_cached(path: Path, device: torch.device | str) -> ReferenceCNN:
    """The cached reference CNN if it verifies, was trained with the current recipe and is accurate enough."""
    model = ReferenceCNN(**REFERENCE_RECIPE["model"])
    info = ckpt.load_weights(model, path)  # checks the tensors' sha256, the keys and that the record is theirs
    if not info.get("sha256"):
        raise CheckpointError(f"{path.with_suffix('.json')} is missing: {path} has no record of how it was trained")
    if info.get("recipe") != REFERENCE_RECIPE:
        raise CheckpointError(f"{path} was trained with other settings")
    if float(info.get("test_accuracy", 0.0)) < MIN_TEST_ACCURACY:
        raise CheckpointError(f"{path} records a test accuracy below {MIN_TEST_ACCURACY:.1%}")
    model.reference_info = info  # type: ignore[attr-defined]
    return model.to(device).eval()


def load_or_train_reference(
    cache_dir: Path | str | None = None, device: torch.device | str = "cpu", echo: Callable[[str], object] = print
) -> ReferenceCNN:
    """The MNIST reference CNN from ``cache_dir`` (default :func:`default_cache_dir`), trained there first if
    missing, damaged or made with another recipe. Returns it in eval mode; ``model.reference_info`` is its JSON.

    Safe with concurrent callers: training happens under a file lock and both files are written atomically.
    Raises :class:`DifflabError` if the trained network stays below 99.0% test accuracy.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"{REFERENCE_NAME}.safetensors"
    if path.is_file():
        with contextlib.suppress(CheckpointError):
            return _load_cached(path, device)
    with _exclusive(folder / f".{REFERENCE_NAME}.lock"):
        if path.is_file():  # another process may have finished training while this one waited
            try:
                return _load_cached(path, device)
            except CheckpointError as exc:
                echo(f"retraining the reference CNN: {exc}")
        echo(f"training the MNIST reference CNN once (a few minutes on 2 CPU cores) -> {path}")
        model, info = train_reference_cnn(device=device, echo=echo)
        if info["test_accuracy"] < MIN_TEST_ACCURACY:
            raise DifflabError(
                f"the reference CNN reached only {info['test_accuracy']:.2%} MNIST test accuracy "
                f"(< {MIN_TEST_ACCURACY:.1%}); not caching it"
            )
        ckpt.export_weights(path, model.state_dict(), info)
    return _load_cached(path, device)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W), std ``sigma`` pixels (radius ceil(3 sigma), edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = images.shape[1]
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    horizontal = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(horizontal, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


# Fewer resamples for the 2048-d Inception features than the CNN's 50: one FID there costs an n x n or 2048 x 2048
# eigendecomposition (~1 s at n = 2,000 on two cores, benchmarks/fid_speed.py); 20 rounds give the sd to ~ +-16%.
INCEPTION_BOOTSTRAP_ROUNDS = 20
INCEPTION_FEATURES = 2048


class ImageEvaluator:
    """Scores image samples against a reference image set with a classifier's features and softmax.

    model: a classifier with ``features(x) -> (B, D)`` and ``forward(x) -> logits (B, K)`` (eval mode).
    reference: the real images the FID compares with (default for :meth:`for_mnist`: MNIST test, 10k).
    heldout: real images for :meth:`calibration`, disjoint from ``reference`` (MNIST val for MNIST).
    train: real images for :meth:`real_vs_real_floor` (MNIST train for MNIST). Both may be given as
    zero-argument loaders, called on first use.
    inception_weights: optional local InceptionV3 (FID) weights; then :meth:`evaluate` adds the standard
    ``fid_inception`` / ``inception_score_inception`` (torchmetrics conventions; ``inception_resize="tf1"``
    for torch-fidelity's resize), see :mod:`difflab.metrics.inception_fid`.
    fid_bootstrap_rounds: resamples of :func:`~difflab.metrics.frechet.bootstrap_fid_std` behind each result's
    ``fid_std`` (the FID's sampling noise at that n; 0 = not computed).
    classes_are_labels: the classifier's classes are the data's labels (the MNIST CNN's are; InceptionV3's 1008
    are not): only then are ``accuracy`` and ``class_histogram`` reported.
    floor_name: the name of the first calibration row (real images outside the reference set).
    description: one sentence on what the features are and what the reference set is, for reports.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        reference: ImageSet,
        reference_name: str,
        *,
        heldout: ImageSet | Callable[[], ImageSet] | None = None,
        train: ImageSet | Callable[[], ImageSet] | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 500,
        inception_weights: Path | str | None = None,
        inception_resize: str = "torchmetrics",
        cache_dir: Path | str | None = None,
        echo: Callable[[str], object] = print,
        fid_bootstrap_rounds: int = 50,
        classes_are_labels: bool = True,
        floor_name: str = "real held-out",
        description: str = "",
    ) -> None:
        self.model = model.to(device).eval()
        self.classes_are_labels = classes_are_labels
        self.floor_name = floor_name
        self.description = description or f"features of {type(model).__name__} against {reference_name}"
        self.reference = reference
        self.reference_name = reference_name
        self._heldout = heldout
        self._train = train
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.echo = echo
        if fid_bootstrap_rounds == 1 or fid_bootstrap_rounds < 0:
            raise DataError(f"fid_bootstrap_rounds must be 0 or >= 2, got {fid_bootstrap_rounds}")
        self.fid_bootstrap_rounds = fid_bootstrap_rounds
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self._reference_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference_root: torch.Tensor | None = None
        self.inception = None
        if inception_weights is not None:
            from difflab.metrics.inception_fid import InceptionScorer

            self.inception = InceptionScorer(
                inception_weights, device=device, cache_dir=self.cache_dir, echo=echo, resize=inception_resize
            )

    @property
    def heldout(self) -> ImageSet | None:
        """Real images for :meth:`calibration` (a loader given to the constructor is called on first use)."""
        if callable(self._heldout):
            self._heldout = self._heldout()
        return self._heldout

    @property
    def train(self) -> ImageSet | None:
        """Real images for :meth:`real_vs_real_floor` (loaded on first use, like :attr:`heldout`)."""
        if callable(self._train):
            self._train = self._train()
        return self._train

    @classmethod
    def for_mnist(
        cls,
        cache_dir: Path | str | None = None,
        device: torch.device | str = "cpu",
        inception_weights: Path | str | None = None,
        echo: Callable[[str], object] = print,
    ) -> ImageEvaluator:
        """The MNIST evaluator: reference CNN (trained once per machine), reference set = MNIST test (10k)."""
        model = load_or_train_reference(cache_dir, device=device, echo=echo)
        return cls(
            model,
            load_mnist("test"),
            "mnist-test",
            heldout=lambda: load_mnist("val"),
            train=lambda: load_mnist("train"),
            device=device,
            inception_weights=inception_weights,
            cache_dir=cache_dir,
            echo=echo,
            description=(
                "The project's MNIST evaluator: FID and IS in the feature space of its reference digit CNN against "
                "the 10k test digits; the `floor:` rows score real held-out digits (and degraded copies) at the same "
                "n, so a sample set is read against what real data gets with as many images."
            ),
        )

    @classmethod
    def for_image_folder(
        cls,
        train: ImageSet,
        heldout: ImageSet,
        name: str,
        inception_weights: Path | str,
        device: torch.device | str = "cpu",
        inception_resize: str = "torchmetrics",
        cache_dir: Path | str | None = None,
        echo: Callable[[str], object] = print,
    ) -> ImageEvaluator:
        """The evaluator of a folder of images: FID / IS with the InceptionV3 loaded from ``inception_weights``
        (the standard features; nothing is downloaded) against the held-out split ``heldout``; the calibration
        rows and the real-vs-real floor take real images from ``train`` (outside the reference set). The
        Inception classes are not the folder's, so there is no accuracy or class histogram; ``fid_std`` comes from
        ``INCEPTION_BOOTSTRAP_ROUNDS`` resamples."""
        from difflab.metrics.inception_fid import InceptionClassifier

        if len(heldout) < 2 or len(train) < 2:
            raise DataError(
                f"FID of {name} needs at least 2 held-out and 2 training images, got {len(heldout)} and {len(train)}"
            )
        if len(heldout) < INCEPTION_FEATURES:
            echo(
                f"note: {name} holds {len(heldout):,} held-out images, fewer than Inception's {INCEPTION_FEATURES:,} "
                "features: its FIDs carry much sampling noise; read them against the floor rows at the same n"
            )
        return cls(
            InceptionClassifier(inception_weights, resize=inception_resize),
            heldout,
            name,
            heldout=train,
            train=train,
            device=device,
            batch_size=50,
            cache_dir=cache_dir,
            echo=echo,
            classes_are_labels=False,
            floor_name="real training images",
            fid_bootstrap_rounds=INCEPTION_BOOTSTRAP_ROUNDS,
            description=(
                "FID and IS with InceptionV3's 2048-d pool features and 1008-class softmax "
                f"(`metrics.inception_weights`) against the {len(heldout):,} held-out images of {name}; the `floor:` "
                "rows score real training images (and degraded copies) at the same n, so a sample set is read against "
                "what real data gets with as many images. The Inception classes are not the folder's: no accuracy."
            ),
        )

    def summary(self) -> dict[str, Any]:
        """What the scores mean: ``description``, ``reference`` (name, n) and ``floor`` (the first calibration row)."""
        return {
            "description": self.description,
            "reference": {"name": self.reference_name, "n": len(self.reference)},
            "floor": self.floor_name,
            "classes_are_labels": self.classes_are_labels,
        }

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) with the reference's (C, H, W), N >= 2, all finite (else a :class:`DataError`),
        returned as they are."""
        expected = tuple(self.reference.images.shape[1:])
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise DataError(f"images must have shape (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if len(images) < 2:
            raise DataError(f"need at least 2 images to evaluate, got {len(images)}")
        bad = int((~torch.isfinite(images.reshape(len(images), -1))).any(dim=1).sum())
        if bad:
            raise DataError(f"{bad} of {len(images)} images contain NaN or inf: the sampler diverged")
        return images

    @staticmethod
    def quantize(images: torch.Tensor) -> torch.Tensor:
        """Clip to [-1, 1] and round to the 256 levels an 8-bit image file would store (as real data has).
        images: any shape, e.g. (N, C, H, W) -> the same shape."""
        return from_unit((to_unit(images.clamp(-1.0, 1.0)) * 255.0).round() / 255.0)

    @torch.inference_mode()
    def features_and_probs(
        self, images: torch.Tensor, batch_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, H, W) in [-1, 1] -> features (N, D) float32 and class probabilities (N, K)."""
        self._check(images)
        features, probs = [], []
        for part in _batches(len(images), batch_size or self.batch_size):
            batch = images[part].to(self.device, torch.float32)
            if hasattr(self.model, "features_and_logits"):
                feats, logits = self.model.features_and_logits(batch)
            else:
                feats, logits = self.model.features(batch), self.model(batch)
            features.append(feats.float().cpu())
            probs.append(torch.softmax(logits.double(), dim=1).cpu())
        return torch.cat(features), torch.cat(probs)

    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """images (N, C, H, W) in [-1, 1] -> classifier features (N, D)."""
        return self.features_and_probs(images, batch_size)[0]

    @property
    def reference_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and covariance (D, D) of the reference set's features (computed once)."""
        if self._reference_stats is None:
            self._reference_stats = feature_statistics(self.features(self.reference.images, self.batch_size))
        return self._reference_stats

    def _fid(self, features: torch.Tensor) -> float:
        mean, cov = self.reference_statistics
        if len(features) >= features.shape[1] and self._reference_root is None:
            self._reference_root = psd_sqrt(cov)
        return reference_fid(features, mean, cov, self._reference_root)

    def evaluate(
        self, samples: torch.Tensor, intended_labels: torch.Tensor | None = None, quantize: bool = True
    ) -> dict[str, Any]:
        """Metrics of samples (N, C, H, W) in [-1, 1] (values outside are clipped, see :meth:`quantize`).

        Returns ``n``; ``fid`` (Frechet distance of the classifier features to the reference set's);
        ``inception_score`` (classifier IS, 1 .. K); ``class_histogram`` (fraction predicted per class);
        ``mean_confidence`` (mean max softmax); ``clipped_fraction`` (pixels outside [-1, 1]);
        ``accuracy`` (fraction classified as ``intended_labels`` (N,), when given) -- histogram and accuracy only
        when the classifier's classes are the data's (``classes_are_labels``); ``fid_std`` (the FID's sampling
        noise at this n: bootstrap standard deviation, resampled within each intended class when labels are given,
        as balanced conditional sample sets have fixed class counts); ``reference``
        (name and size); plus ``fid_inception`` / ``inception_score_inception`` when InceptionV3 weights were given.
        """
        self._check(samples)
        clipped = float((samples.abs() > 1.0 + 1e-6).float().mean())
        images = self.quantize(samples) if quantize else samples.clamp(-1.0, 1.0)
        features, probs = self.features_and_probs(images)
        result: dict[str, Any] = {
            "n": len(samples),
            "fid": self._fid(features),
            "inception_score": inception_score(probs),
            "mean_confidence": float(probs.max(dim=1).values.mean()),
            "clipped_fraction": clipped,
            "reference": {"name": self.reference_name, "n": len(self.reference)},
        }
        if self.classes_are_labels:
            histogram = torch.bincount(probs.argmax(dim=1), minlength=probs.shape[1]).double() / len(probs)
            result["class_histogram"] = [round(float(v), 4) for v in histogram]
        intended = None
        if intended_labels is not None:
            intended = torch.as_tensor(intended_labels).reshape(-1).cpu().long()
            if len(intended) != len(samples):
                raise DataError(f"{len(intended)} intended labels for {len(samples)} samples")
            classes = probs.shape[1]
            if (
                self.classes_are_labels
                and len(intended)
                and not 0 <= int(intended.min()) <= int(intended.max()) < classes
            ):
                raise DataError(
                    f"intended labels must lie in 0..{classes - 1} (the classifier's classes), got "
                    f"{int(intended.min())}..{int(intended.max())}"
                )
            if self.classes_are_labels:
                result["accuracy"] = float((probs.argmax(dim=1) == intended).double().mean())
        if self.fid_bootstrap_rounds:
            result["fid_std"] = bootstrap_fid_std(
                features,
                *self.reference_statistics,
                strata=intended,
                rounds=self.fid_bootstrap_rounds,
                reference_root=self._reference_root,
            )
        if self.inception is not None:
            result.update(self.inception.evaluate(images, self.reference.images, self.reference_name))
        return result

    def calibration_sets(self, n: int, seed: int = 0) -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
        """The image sets of :meth:`calibration`: ``([(name, images (n, C, H, W) in [-1, 1]), ...], labels (n,))``.

        Rows: real images outside the reference set (``floor_name``; the floor: only the sampling noise of n
        images), the same images with
        Gaussian pixel noise of std 0.1 and 0.3 (in [0, 1] pixel units, then clipped to [0, 1]), the same
        images blurred by a Gaussian of sigma 1 px, and pure noise: pixels i.i.d. uniform on [0, 1].
        ``seed`` picks the images and the noise.
        """
        if self.heldout is None:
            raise DataError("calibration needs held-out real images (ImageEvaluator(heldout=...))")
        if not 2 <= n <= len(self.heldout):
            raise DataError(f"calibration n must be in [2, {len(self.heldout)}], got {n}")
        generator = torch.Generator().manual_seed(seed)
        index = torch.randperm(len(self.heldout), generator=generator)[:n]
        real, labels = self.heldout.images[index], self.heldout.labels[index]
        unit = to_unit(real)

        def noisy(std: float) -> torch.Tensor:
            """The real images plus N(0, std^2) pixel noise in [0, 1] units, clipped: (n, C, H, W) in [-1, 1]."""
            return from_unit((unit + std * torch.randn(unit.shape, generator=generator)).clamp(0, 1))

        rows = [
            (self.floor_name, real),
            ("real + noise std 0.1", noisy(0.1)),
            ("real + noise std 0.3", noisy(0.3)),
            ("real blurred sigma 1px", from_unit(gaussian_blur(unit, 1.0))),
            ("pure noise uniform[0,1]", from_unit(torch.rand(unit.shape, generator=generator))),
        ]
        return rows, labels

    def calibration_count(self, n: int) -> int:
        """The calibration rows' size for ``n`` samples: ``n``, at least 2 and at most the held-out images there are
        (rows print their own ``n``, so a smaller real set than the samples is visible)."""
        if self.heldout is None:
            raise DataError("calibration needs held-out real images (ImageEvaluator(heldout=...))")
        return min(max(n, 2), len(self.heldout))

    def calibration(self, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """:meth:`evaluate` of each :meth:`calibration_sets` row at the same ``n``, with a ``name`` per row:
        what good and bad sample sets score. Accuracy uses the held-out labels (pure noise: chance level)."""
        rows, labels = self.calibration_sets(n, seed)
        return [{"name": name, **self.evaluate(images, labels)} for name, images in rows]

    def real_vs_real_floor(self, n: int = 10_000, seed: int = 0) -> dict[str, Any]:
        """Metrics of ``n`` real training images against the reference set (the floor at that n)."""
        if self.train is None:
            raise DataError("the real-vs-real floor needs training images (ImageEvaluator(train=...))")
        if not 2 <= n <= len(self.train):
            raise DataError(f"n must be in [2, {len(self.train)}], got {n}")
        index = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:n]
        return {
            "name": f"real train vs {self.reference_name}",
            **self.evaluate(self.train.images[index], self.train.labels[index]),
        }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of metric rows (name, n, fid, inception_score, accuracy)."""
    lines = [f"{'row':<28} {'n':>6} {'FID':>9} {'IS':>6} {'acc':>6}"]
    for row in rows:
        accuracy = f"{row['accuracy']:.3f}" if "accuracy" in row else "-"
        lines.append(
            f"{row.get('name', ''):<28} {row['n']:>6} {row['fid']:>9.3f} {row['inception_score']:>6.2f} {accuracy:>6}"
        )
    return "\n".join(lines)


def save_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Write metric rows as JSON (atomically)."""
    ckpt.atomic_write_bytes(Path(path), (json.dumps(rows, indent=2) + "\n").encode())
