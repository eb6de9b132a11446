"""Paired image folders (image-to-image translation): ``input/NAME.ext`` and ``target/NAME.ext`` are one pair.

Files are matched by name without suffix (``stem``); files with no partner are listed (and refused with
``strict=True``). Both images of a pair are centre-cropped to a square and resized to ``size`` together; a
target whose pixel size differs from its input's is first resized to the input's size, so the crops cover
the same scene. Inputs are RGB (3 channels: a grayscale input is refused), targets grayscale (1 channel,
``L``; a colour target is converted), both float32 in [-1, 1].

The train/test split is a fixed function of each file name: a pair is in the test split when
``sha256("<seed>:<name>")``, read as a number in [0, 1), is below ``test_fraction``. Adding or removing files
therefore never moves an existing pair from one split to the other.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.data.images import (
    IMAGE_SUFFIXES,
    _check_folder_fits,
    _depth_note,
    _normalised,
    _pixels,
    _read,
    _square,
    check_intensity,
    stretch_set,
)
from difflab.errors import DataError


@dataclass(frozen=True)
class PairedSet:
    """Aligned pairs: ``names`` (N,), ``inputs`` (N, 3, S, S) RGB and ``targets`` (N, 1, S, S) grayscale, in [-1, 1]."""

    names: tuple[str, ...]
    inputs: torch.Tensor
    targets: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.names)
        if self.inputs.shape[0] != n or self.targets.shape[0] != n:
            raise DataError(f"{n} names but {self.inputs.shape[0]} inputs and {self.targets.shape[0]} targets")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def size(self) -> int:
        return int(self.inputs.shape[-1])

    def subset(self, index: list[int]) -> PairedSet:
        rows = torch.tensor(index, dtype=torch.long)
        return PairedSet(tuple(self.names[i] for i in index), self.inputs[rows], self.targets[rows])


@dataclass(frozen=True)
class PairedData:
    """The train and test splits of a folder pair, the files that had no partner (names with suffix) and, with
    ``intensity="stretch"``, the band ``(low, high)`` of the targets' 0..1 range that was mapped to 0..1."""

    train: PairedSet
    test: PairedSet
    unmatched_inputs: tuple[str, ...]
    unmatched_targets: tuple[str, ...]
    target_intensity: tuple[float, float] | None = None

    @property
    def unmatched(self) -> int:
        return len(self.unmatched_inputs) + len(self.unmatched_targets)


def split_value(name: str, seed: int) -> float:
    """``sha256("<seed>:<name>")`` as a number in [0, 1): a pair is a test pair when this is < ``test_fraction``."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def name_seed(name: str, seed: int = 0) -> int:
    """A 63-bit seed derived from a file name (for the fixed noise of each image)."""
    digest = hashlib.sha256(f"noise:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _images_by_stem(folder: Path, role: str, echo: Callable[[str], object] = print) -> dict[str, Path]:
    """The images directly in ``folder`` by file name without suffix, Unicode-normalised (NFC, so a name macOS
    wrote decomposed matches its composed partner); subfolders and other files are skipped and counted."""
    if not folder.is_dir():
        raise DataError(
            f"{role} folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder"
        )
    found: dict[str, Path] = {}
    skipped: list[str] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(path.name + ("/" if path.is_dir() else ""))
            continue
        stem = unicodedata.normalize("NFC", path.stem)
        if stem in found:
            raise DataError(f"two {role} images named {stem!r} in {folder}: {found[stem].name} and {path.name}")
        found[stem] = path
    if not found:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in the {role} folder {folder}")
    if skipped:
        echo(f"[paired] skipped {len(skipped)} non-image file(s) or subfolder(s) in {folder} (e.g. {skipped[0]})")
    return found


def match_pairs(
    input_dir: str | Path, target_dir: str | Path, echo: Callable[[str], object] = print
) -> tuple[list[tuple[str, Path, Path]], list[str], list[str]]:
    """``(pairs, unmatched inputs, unmatched targets)``: pairs ``(stem, input path, target path)`` in sorted stem
    order (stems NFC-normalised), and the file names without a partner."""
    inputs = _images_by_stem(Path(input_dir), "input", echo)
    targets = _images_by_stem(Path(target_dir), "target", echo)
    pairs = [(stem, inputs[stem], targets[stem]) for stem in sorted(inputs) if stem in targets]
    lonely_inputs = [inputs[s].name for s in sorted(inputs) if s not in targets]
    lonely_targets = [targets[s].name for s in sorted(targets) if s not in inputs]
    return pairs, lonely_inputs, lonely_targets


def load_pair(input_path: Path, target_path: Path, size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """One pair as arrays on the 0..255 scale, (size, size, 3) and (size, size, 1) (uint8, or float32 for a 16-bit or
    float target), and whether the two differed in aspect ratio by more than 1%: the target is resized to the
    input's pixel size when they differ, then both are centre-cropped to a square and resized to ``size``."""
    original = _read(input_path)
    rgb = _normalised(original, input_path)
    if rgb.mode != "RGB":
        raise DataError(f"input image {input_path} is grayscale (mode {original.mode}); inputs must be RGB")
    gray = _normalised(_read(target_path), target_path)
    if gray.mode == "RGB":
        gray = gray.convert("L")
    (width, height), (target_width, target_height) = rgb.size, gray.size
    stretched = abs(width * target_height - height * target_width) > 0.01 * width * target_height
    if gray.size != rgb.size:
        gray = gray.resize(rgb.size, Image.Resampling.BICUBIC)
    return _pixels(_square(rgb, size), 3), _pixels(_square(gray, size), 1), stretched


def load_paired_folders(
    input_dir: str | Path,
    target_dir: str | Path,
    size: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
    max_pairs: int = 0,
    echo: Callable[[str], object] = print,
    intensity: str = "full",
) -> PairedData:
    """The pairs of ``input_dir`` / ``target_dir`` split into train and test (see the module docstring).

    ``strict``: a file without a partner raises a :class:`DataError` naming it (else it is skipped and reported
    through ``echo``). ``max_pairs`` keeps the first pairs in sorted name order (0 = all). ``intensity``: ``full``
    reads 16-bit targets on 0..65535 and float ones on [0, 1]; ``stretch`` maps them linearly from the 0.5th..99.5th
    percentile of the *training* split's 16-bit / float target pixels to the full range (one map for both splits,
    so no test image sets it), for raw thermal counts that fill a narrow band.
    """
    check_intensity(intensity)
    if size < 4:
        raise DataError(f"image size must be >= 4, got {size}")
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_pairs < 0:
        raise DataError(f"max_pairs must be >= 0 (0 = all), got {max_pairs}")
    pairs, lonely_inputs, lonely_targets = match_pairs(input_dir, target_dir, echo)
    if strict and (lonely_inputs or lonely_targets):
        if lonely_inputs:
            raise DataError(f"input image {Path(input_dir) / lonely_inputs[0]} has no partner in {target_dir}")
        raise DataError(f"target image {Path(target_dir) / lonely_targets[0]} has no partner in {input_dir}")
    if lonely_inputs or lonely_targets:
        example = (lonely_inputs or lonely_targets)[0]
        echo(
            f"[paired] {len(lonely_inputs)} input and {len(lonely_targets)} target image(s) have no partner and are "
            f"skipped (e.g. {example})"
        )
    if not pairs:
        raise DataError(f"no file names are shared by {input_dir} and {target_dir}: no pairs")
    pairs = pairs[: max_pairs or None]
    _check_folder_fits(2 * len(pairs), size, f"{input_dir} and {target_dir}")
    names, rgbs, grays, stretched = [], [], [], []
    for stem, input_path, target_path in pairs:
        rgb, gray, aspect_differs = load_pair(input_path, target_path, size)
        names.append(stem)
        rgbs.append(rgb)
        grays.append(gray)
        if aspect_differs:
            stretched.append(target_path.name)
    in_test = [split_value(name, seed) < test_fraction for name in names]
    target_intensity = None
    if intensity == "stretch":
        train_grays = [g for g, flag in zip(grays, in_test, strict=True) if not flag]
        grays, target_intensity, stretched = stretch_set(grays, f"the training split of {target_dir}", train_grays)
        if stretched:
            echo(f"[paired] {stretched} (and the test split)")
    note = _depth_note(grays, str(target_dir))
    if note:
        echo(f"[paired] {note}")
    if stretched:
        echo(
            f"[paired] {len(stretched)} target image(s) differ from their input in aspect ratio and are stretched to "
            f"it (e.g. {stretched[0]}): check that the pairs are aligned"
        )
    inputs = torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0
    targets = torch.from_numpy(np.stack([g.astype(np.float32) for g in grays])).permute(0, 3, 1, 2) * (2.0 / 255.0)
    targets = targets - 1.0
    everything = PairedSet(tuple(names), inputs.contiguous(), targets.contiguous())
    test = [i for i, flag in enumerate(in_test) if flag]
    train = [i for i, flag in enumerate(in_test) if not flag]
    if not train or not test:
        raise DataError(
            f"{len(names)} pair(s) give {len(train)} training and {len(test)} test pairs at "
            f"test_fraction={test_fraction}; both splits need at least one pair"
        )
    return PairedData(
        everything.subset(train),
        everything.subset(test),
        tuple(lonely_inputs),
        tuple(lonely_targets),
        target_intensity,
    )
