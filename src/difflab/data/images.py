"""Image data sets as tensors: a folder of class subfolders, sklearn's 8x8 digits, range helpers.

Every loader returns an :class:`ImageSet` with images (N, C, H, W) float32 in [-1, 1] (the range the
diffusion models work in) and int64 labels indexing ``class_names``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from difflab.errors import DataError
from difflab.memory import refuse_unless_fits

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})


@dataclass(frozen=True)
class ImageSet:
    """Labelled images.

    images: (N, C, H, W) float32 in [-1, 1]; labels: (N,) int64 in [0, len(class_names)).
    intensity_range: the band ``(low, high)`` of the 0..1 range that an image folder's ``intensity="stretch"``
    mapped to 0..1 (None when nothing was stretched), so samples can be taken back to the sensor's scale.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    intensity_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        """Height (= width for the square images the loaders make)."""
        return int(self.images.shape[2])

    def subset(self, index: torch.Tensor | slice) -> ImageSet:
        """The images and labels at ``index`` (a slice or an index tensor), same class names and intensity range."""
        return ImageSet(self.images[index], self.labels[index], self.class_names, self.intensity_range)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]: ``(x + 1) / 2`` (no clipping). x: any shape, e.g. (B, C, H, W) -> the same shape."""
    return (x + 1.0) / 2.0


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: ``2 x - 1`` (no clipping). x: any shape, e.g. (B, C, H, W) -> the same shape."""
    return x * 2.0 - 1.0


def _read(path: Path) -> Image.Image:
    """Open and fully decode ``path``, turned upright by its EXIF orientation tag (as photo viewers show it, so a
    camera's rotated JPEG lines up with its partner); anything Pillow cannot read, or an image over Pillow's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), raises a DataError naming the file."""
    try:
        with Image.open(path) as handle:
            handle.load()
            return ImageOps.exif_transpose(handle)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read image {path} ({exc.__class__.__name__}: {exc})") from None


# Integer grayscale modes deeper than 8 bits, read as intensities on their full 16-bit range 0..65535 (a 32-bit ``I``
# image is a 16-bit PNG as Pillow opens it); ``F`` (32-bit float) images are read as intensities in [0, 1].
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "F"})


def _normalised(image: Image.Image, path: Path | None = None) -> Image.Image:
    """``L`` for 8-bit grayscale, ``RGB`` for colour, ``F`` (float, 0..255 scale) for deeper grayscale; transparency is
    composited onto black.

    One scale serves every image of a data set whatever its content: 16-bit values v map to ``255 v / 65535`` and
    float values to ``255 v`` (no per-image stretch, which would give equal images different brightness); values
    outside 0..65535 or [0, 1] raise a DataError naming ``path``. A palette image whose colours are all grey is
    grayscale."""
    if image.mode in HIGH_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        top = 1.0 if image.mode == "F" else 65535.0
        low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if not (np.isfinite(array).all() and low >= 0 and high <= top):
            kind = "float" if image.mode == "F" else "integer"
            raise DataError(
                f"{kind} image {path or 'image'} holds values in [{low:g}, {high:g}]; difflab reads {kind} images as "
                f"intensities in [0, {top:g}]: rescale it to that range"
            )
        return Image.fromarray((array * (255.0 / top)).astype(np.float32), mode="F")
    if image.mode in ("1", "L"):
        return image.convert("L")
    if image.mode in ("LA", "PA", "RGBA", "P"):
        rgba = image.convert("RGBA")
        composed = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        if image.mode == "LA":
            return composed.convert("L")
        pixels = np.asarray(composed)
        gray = (
            image.mode in ("P", "PA")
            and (pixels[..., 0] == pixels[..., 1]).all()
            and (pixels[..., 1] == pixels[..., 2]).all()
        )
        return composed.convert("L") if gray else composed
    return image.convert("RGB")


def _pixels(image: Image.Image, channels: int) -> np.ndarray:
    """An image of :func:`_normalised` (after :func:`_square`) as (H, W, channels) on the 0..255 scale: uint8 for 8-bit
    images, float32 (clipped to 0..255 after the bicubic resize) for deeper ones."""
    if image.mode == "F":
        array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0)
        return np.repeat(array[..., None], channels, axis=2)
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array.reshape(array.shape[0], array.shape[1], channels)


def _depth_note(arrays: list[np.ndarray], where: str) -> str | None:
    """A warning when the deeper-than-8-bit images among ``arrays`` (the :func:`_pixels` of a set; float32 for those)
    use under a quarter of their intensity range (raw 16-bit thermal counts, say 7,000..8,000 of 0..65,535, load as a
    narrow band of grey), else None."""
    deep = [a for a in arrays if a.dtype == np.float32]
    if not deep:
        return None
    low, high = min(float(a.min()) for a in deep), max(float(a.max()) for a in deep)
    if high - low >= 255 / 4 or high == low:  # full enough, or constant (a blank image is no narrow band)
        return None
    return (
        f"the {len(deep)} 16-bit or float image(s) in {where} use only {low / 255:.3f}..{high / 255:.3f} of their "
        "intensity range 0..1, so they load as a narrow band of grey; data.intensity=stretch maps them to the full "
        "range if that is not intended"
    )


# How deeper-than-8-bit images map to intensities: ``full`` on their type's whole range (16-bit 0..65535, float
# [0, 1]); ``stretch`` linearly from the set's 0.5th..99.5th percentile to 0..1, one map for the whole set.
INTENSITY_MODES = ("full", "stretch")
STRETCH_PERCENTILES = (0.5, 99.5)


def deep_intensity_range(arrays: list[np.ndarray], where: str) -> tuple[float, float] | None:
    """The 0.5th and 99.5th percentile (``STRETCH_PERCENTILES``) of the pixels of the deeper-than-8-bit images among
    ``arrays`` (the :func:`_pixels` of a set; float32 for those), on the 0..255 scale, or None when there are none.
    Percentiles rather than the extremes, so a few hot or dead pixels do not set the scale. A set whose deep pixels
    hold a single value there raises a :class:`DataError` (nothing to stretch)."""
    deep = [a.ravel() for a in arrays if a.dtype == np.float32]
    if not deep:
        return None
    low, high = (float(v) for v in np.percentile(np.concatenate(deep), STRETCH_PERCENTILES))
    if not high > low:
        raise DataError(
            f"data.intensity=stretch: the {len(deep)} 16-bit or float image(s) of {where} hold a single intensity "
            f"({low / 255:.4f} of 0..1) between their 0.5th and 99.5th percentile, so there is no range to stretch"
        )
    return low, high


def stretch_deep(arrays: list[np.ndarray], low: float, high: float) -> list[np.ndarray]:
    """``arrays`` (each (H, W, C) on the 0..255 scale) with every float32 (deeper-than-8-bit) one mapped linearly so
    that ``low`` -> 0 and ``high`` -> 255, clipped to 0..255; 8-bit (uint8) arrays are returned as they are."""
    scale = 255.0 / (high - low)
    return [
        np.clip((a - np.float32(low)) * np.float32(scale), 0.0, 255.0).astype(np.float32)
        if a.dtype == np.float32
        else a
        for a in arrays
    ]


def check_intensity(intensity: str, name: str = "intensity", error: type[Exception] = DataError) -> None:
    """Raise ``error`` (a :class:`DataError` for the loaders, a ``ConfigError`` for the configs' ``data.intensity``)
    naming ``name`` unless ``intensity`` is one of ``INTENSITY_MODES``."""
    if intensity not in INTENSITY_MODES:
        raise error(f"{name} must be one of {', '.join(INTENSITY_MODES)}, got {intensity!r}")


def stretch_set(
    arrays: list[np.ndarray], where: str, reference: list[np.ndarray] | None = None
) -> tuple[list[np.ndarray], tuple[float, float] | None, str | None]:
    """``intensity="stretch"`` for a set: ``(arrays stretched, (low, high) on the 0..1 scale, the line to report)``,
    the map taken from the deep images of ``reference`` (default: ``arrays`` themselves; a paired set passes its
    training split) by :func:`deep_intensity_range` and applied by :func:`stretch_deep`. With no deep images in
    ``reference``: ``(arrays, None, None)``."""
    source = arrays if reference is None else reference
    bounds = deep_intensity_range(source, where)
    if bounds is None:
        return arrays, None, None
    low, high = bounds
    count = sum(a.dtype == np.float32 for a in source)
    note = (
        f"data.intensity=stretch: {count} 16-bit or float image(s) of {where} mapped from "
        f"{low / 255:.4f}..{high / 255:.4f} of their range 0..1 (the 0.5th..99.5th percentile of their pixels) to "
        "0..1, one map for all of them"
    )
    return stretch_deep(arrays, low, high), (low / 255.0, high / 255.0), note


def _square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to the largest square, then resize to ``size`` x ``size`` (bicubic, antialiased)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((size, size), Image.Resampling.BICUBIC)


def _image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) below ``folder``, recursively, in sorted order; hidden files are ignored."""
    images, others = [], []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return images, others


def _folder_classes(root: Path, max_per_class: int = 0) -> tuple[list[tuple[str, list[Path]]], list[Path]]:
    """``([(class name, image files)], skipped files and subfolders without images)`` of an image folder, classes
    in sorted order (see :func:`load_image_folder`)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist" if not root.exists() else f"{root} is not a folder")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes: list[tuple[str, list[Path]]] = []
    skipped: list[Path] = []
    for folder in subfolders:
        files, others = _image_files(folder)
        skipped += others
        if files:
            classes.append((folder.name, files[: max_per_class or None]))
        else:
            skipped.append(folder)  # a subfolder without images is no class
    top_files = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    top_images = [p for p in top_files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not classes and top_images:
        classes.append((root.name, top_images[: max_per_class or None]))
        skipped += [p for p in top_files if p not in top_images]
    else:
        skipped += top_files
    if not classes:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root} or its class subfolders")
    return classes, skipped


def image_folder_classes(path: str | Path) -> tuple[str, ...]:
    """The class names of an image folder, in label order (as :func:`load_image_folder` numbers them), from
    the file listing alone."""
    return tuple(name for name, _ in _folder_classes(Path(path))[0])


def _check_folder_fits(count: int, size: int, where: str | Path) -> None:
    """A :class:`DataError` before reading any image when ``count`` images at ``size`` x ``size`` cannot be held:
    each is kept as an 8-bit RGB picture, then as float32 pixels twice over (the arrays and the stacked tensor), about
    27 bytes a pixel; a lower bound of what training needs, so it refuses only what cannot finish."""
    what = f"{count} images of {where} at data.size={size}"
    refuse_unless_fits(27 * count * size * size, what, "choose a smaller data.size", DataError)


def load_image_folder(
    path: str | Path,
    size: int,
    channels: int = 0,
    max_per_class: int = 0,
    echo: Callable[[str], object] = print,
    intensity: str = "full",
) -> ImageSet:
    """Images from ``path/<class name>/**/<file>`` with the sorted class folder names as labels.

    A folder with no class subfolders is one class named after the folder. Each image is centre
    cropped to a square and resized to ``size`` x ``size`` (Pillow, bicubic with antialiasing).
    channels: 1 (grayscale), 3 (RGB) or 0 (grayscale if every image is grayscale, else RGB).
    max_per_class: keep at most this many images of each class (the first in sorted order; 0 = all).
    Files without an image suffix are skipped and counted (reported through ``echo``); a file with
    an image suffix that Pillow cannot read raises a :class:`DataError` naming it.
    intensity: ``full`` reads 16-bit images on 0..65535 and float ones on [0, 1]; ``stretch`` maps them linearly
    from the 0.5th..99.5th percentile of all their pixels (one map for the whole folder, reported through
    ``echo``) to the full range, for raw sensor data such as thermal counts that fill a narrow band. 8-bit images
    are read as they are either way.
    Returns images (N, C, size, size) in [-1, 1].
    """
    root = Path(path)
    if channels not in (0, 1, 3):
        raise DataError(f"channels must be 0 (infer), 1 or 3, got {channels}")
    check_intensity(intensity)
    if size < 1:
        raise DataError(f"image size must be >= 1, got {size}")
    if max_per_class < 0:
        raise DataError(f"max_per_class must be >= 0 (0 = all), got {max_per_class}")
    classes, skipped = _folder_classes(root, max_per_class)
    empty = [p.name for p in skipped if p.is_dir()]
    loose = [p for p in skipped if p.parent == root and p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    others = [p for p in skipped if p not in loose and not p.is_dir()]
    if empty:
        echo(f"skipped {len(empty)} subfolder(s) of {root} without images, which are no class: {', '.join(empty[:5])}")
    if loose:  # images beside class subfolders belong to no class
        echo(f"skipped {len(loose)} image(s) outside the class subfolders of {root} (e.g. {loose[0].name})")
    if others:
        echo(f"skipped {len(others)} non-image file(s) in {root} (e.g. {others[0].relative_to(root)})")

    _check_folder_fits(sum(len(files) for _, files in classes), size, root)
    pictures: list[Image.Image] = []
    labels: list[int] = []
    all_gray = True
    for label, (_, files) in enumerate(classes):
        for file in files:
            image = _normalised(_read(file), file)
            all_gray &= image.mode in ("L", "F")
            pictures.append(_square(image, size))
            labels.append(label)
    channels = channels or (1 if all_gray else 3)
    arrays = [_pixels(p, channels) for p in pictures]
    intensity_range = None
    if intensity == "stretch":
        arrays, intensity_range, stretched = stretch_set(arrays, str(root))
        if stretched:
            echo(stretched)
    note = _depth_note(arrays, str(root))
    if note:
        echo(note)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0
    return ImageSet(
        images.contiguous(),
        torch.tensor(labels, dtype=torch.int64),
        tuple(n for n, _ in classes),
        intensity_range,
    )


def load_digits_8x8() -> ImageSet:
    """sklearn's ``load_digits``: 1,797 images (N, 1, 8, 8), gray levels 0..16 mapped to [-1, 1], labels 0..9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32)).unsqueeze(1) * (2.0 / 16.0) - 1.0
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    return ImageSet(images, labels, tuple(str(d) for d in range(10)))
