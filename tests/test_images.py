"""Image folders, 8x8 digits, grids and PNG files, Frechet distance and inception score."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from difflab.data.images import ImageSet, from_unit, load_digits_8x8, load_image_folder, to_unit
from difflab.errors import DataError
from difflab.metrics.frechet import (
    bootstrap_fid_std,
    feature_statistics,
    fid_ratio_std,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    psd_sqrt,
    reference_fid,
)
from difflab.viz.images import image_rows_figure, load_image, make_grid, save_grid, save_image

# ---------------------------------------------------------------- image folders


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


@pytest.fixture
def gray_folder(tmp_path):
    root = tmp_path / "shapes"
    # "bars": 30 wide x 10 high, white only in the middle 10 columns -> the centre crop is all white.
    bar = np.zeros((10, 30), np.uint8)
    bar[:, 10:20] = 255
    _png(root / "bars" / "a.png", bar)
    _png(root / "bars" / "b.png", np.full((40, 20), 128, np.uint8))
    _png(root / "bars" / "c.png", np.zeros((12, 12), np.uint8))
    _png(root / "ants" / "x.png", np.full((8, 8), 255, np.uint8))
    # 16-bit grayscale: 65535 is white.
    Image.fromarray(np.full((9, 9), 65535, np.uint16)).save(root / "ants" / "deep.png")
    (root / "ants" / "notes.txt").write_text("not an image")
    (root / "ants" / ".hidden.png").write_bytes(b"ignored")
    return root


def test_image_folder_labels_shapes_and_crop(gray_folder):
    messages = []
    data = load_image_folder(gray_folder, size=10, echo=messages.append)
    assert data.class_names == ("ants", "bars")  # sorted folder names
    assert data.images.shape == (5, 1, 10, 10) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 0, 1, 1, 1]  # ants: deep.png, x.png; bars: a, b, c
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert torch.allclose(data.images[0], torch.ones(1, 10, 10))  # 16-bit white
    assert torch.allclose(data.images[2], torch.ones(1, 10, 10), atol=1e-6)  # the centre crop of the bar
    assert torch.allclose(data.images[3], torch.full((1, 10, 10), 128 / 127.5 - 1), atol=1e-6)
    assert torch.allclose(data.images[4], -torch.ones(1, 10, 10))
    assert len(messages) == 1 and "skipped 1 non-image" in messages[0] and "notes.txt" in messages[0]
    assert (len(data), data.num_classes, data.channels, data.size) == (5, 2, 1, 10)


def test_image_folder_channels_inferred_and_forced(gray_folder):
    _png(gray_folder / "colour" / "red.png", np.tile(np.array([255, 0, 0], np.uint8), (6, 6, 1)))
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:3, :, 3] = 255  # top half opaque green, bottom half transparent -> black
    _png(gray_folder / "colour" / "zz.png", rgba, mode="RGBA")
    data = load_image_folder(gray_folder, size=6, echo=lambda _: None)
    assert data.channels == 3 and data.class_names == ("ants", "bars", "colour")
    red = data.images[data.labels == 2][0]
    assert torch.allclose(red[:, 3, 3], torch.tensor([1.0, -1.0, -1.0]))
    green = data.images[data.labels == 2][1]
    assert torch.allclose(green[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert torch.allclose(green[:, 5, 0], torch.tensor([-1.0, -1.0, -1.0]))
    # A gray image in an RGB set has three equal channels.
    assert torch.equal(data.images[0][0], data.images[0][1])
    gray = load_image_folder(gray_folder, size=6, channels=1, max_per_class=1, echo=lambda _: None)
    assert gray.images.shape == (3, 1, 6, 6) and gray.labels.tolist() == [0, 1, 2]
    # Luma of pure red (ITU-R 601: 0.299) in [-1, 1].
    assert gray.images[2, 0, 3, 3].item() == pytest.approx(2 * round(0.299 * 255) / 255 - 1, abs=1e-6)


def test_image_folder_without_subfolders_is_one_class(tmp_path):
    _png(tmp_path / "flat" / "one.png", np.zeros((5, 5), np.uint8))
    data = load_image_folder(tmp_path / "flat", size=4)
    assert data.class_names == ("flat",) and data.images.shape == (1, 1, 4, 4)


def test_image_folder_errors(tmp_path, gray_folder):
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", size=8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty", size=8, echo=lambda _: None)
    (gray_folder / "bars" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(gray_folder, size=8, echo=lambda _: None)
    with pytest.raises(DataError, match="channels"):
        load_image_folder(gray_folder, size=8, channels=2)


def test_stretch_maps_raw_sensor_counts_to_the_full_range_with_one_map(tmp_path):
    """``intensity="stretch"``: 16-bit images that use only raw counts 7,000..8,000 load spread over [-1, 1] by one
    linear map from the folder's 0.5th..99.5th percentile (so a cooler image stays darker than a warmer one), an
    8-bit image beside them is untouched, and the map is reported and kept with the images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "thermal"
    cool = rng.integers(7000, 7500, (16, 16)).astype(np.uint16)
    warm = rng.integers(7500, 8001, (16, 16)).astype(np.uint16)
    _png(root / "scenes" / "a_cool.png", cool)
    _png(root / "scenes" / "b_warm.png", warm)
    said: list[str] = []
    full = load_image_folder(root, size=16, echo=said.append)
    assert any("narrow band of grey" in line and "data.intensity=stretch" in line for line in said)
    assert full.intensity_range is None and float(to_unit(full.images).max()) < 8001 / 65535 + 1e-6
    said.clear()
    data = load_image_folder(root, size=16, echo=said.append, intensity="stretch")
    low, high = np.percentile(np.concatenate([cool.ravel(), warm.ravel()]).astype(np.float64), [0.5, 99.5])
    assert data.intensity_range == pytest.approx((low / 65535, high / 65535), rel=1e-5)
    unit = to_unit(data.images)
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0  # the tails beyond the percentiles are clipped
    assert 0.95 < float(((unit > 0) & (unit < 1)).float().mean()) < 1.0
    expected = np.clip((cool.astype(np.float64) - low) / (high - low), 0, 1)
    assert np.abs(unit[0, 0].numpy() - expected).max() < 1e-4  # linear in the raw counts
    assert float(unit[0].mean()) < 0.5 < float(unit[1].mean())  # one map: the cool scene stays darker
    assert any("data.intensity=stretch: 2 16-bit" in line for line in said)
    assert not any("narrow band" in line for line in said)
    # an 8-bit image among them is read as it is
    _png(root / "scenes" / "c_8bit.png", np.full((16, 16), 200, dtype=np.uint8))
    mixed = load_image_folder(root, size=16, echo=lambda _: None, intensity="stretch")
    assert torch.allclose(to_unit(mixed.images[2]), torch.full((1, 16, 16), 200 / 255))
    assert torch.equal(mixed.images[:2], data.images)
    # nothing to stretch, or no such mode: one-line errors
    flat = tmp_path / "flat"
    _png(flat / "x" / "one.png", np.full((16, 16), 7000, dtype=np.uint16))
    with pytest.raises(DataError, match="single intensity"):
        load_image_folder(flat, size=16, intensity="stretch")
    with pytest.raises(DataError, match="intensity must be one of full, stretch"):
        load_image_folder(root, size=16, intensity="auto")


def test_intensity_is_an_image_folder_setting_kept_through_the_split(tmp_path):
    from difflab.errors import ConfigError
    from difflab.experiments.images import ImageDataConfig, load_image_data

    with pytest.raises(ConfigError, match="image folders only"):
        ImageDataConfig(source="mnist", intensity="stretch")
    with pytest.raises(ConfigError, match="data.intensity must be one of"):
        ImageDataConfig(source="imagefolder", path="x", intensity="percentile")
    rng = np.random.default_rng(1)
    for k in range(6):
        _png(tmp_path / "ir" / "c" / f"{k}.png", rng.integers(20000, 21000, (12, 12)).astype(np.uint16))
    config = ImageDataConfig(source="imagefolder", path=str(tmp_path / "ir"), size=8, intensity="stretch")
    train, heldout = load_image_data(config, seed=0)
    assert len(train) + len(heldout) == 6
    assert train.intensity_range == heldout.intensity_range is not None
    assert 20000 / 65535 <= train.intensity_range[0] < train.intensity_range[1] <= 21000 / 65535


def test_deep_images_share_one_scale_and_keep_their_precision(tmp_path):
    """16-bit images are read on their full range 0..65535 and float images on [0, 1], whatever an image's own
    maximum (a per-image rule turned a 16-bit image whose maximum was 260 black and one of 250 normal)."""
    ramp = np.tile(np.linspace(0.0, 1.0, 16), (16, 1))
    root = tmp_path / "deep"
    for name, top in (("a250", 250), ("b260", 260)):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.rint(ramp * top).astype(np.uint16)).save(root / name / "x.png")
    said: list[str] = []
    data = load_image_folder(root, size=16, echo=said.append)
    brightest = {name: float(to_unit(data.images[data.labels == k]).max()) for k, name in enumerate(data.class_names)}
    assert brightest["a250"] == pytest.approx(250 / 65535, abs=1e-6)
    assert brightest["b260"] == pytest.approx(260 / 65535, abs=1e-6)  # not 1 / 255 of it
    assert any("narrow band of grey" in line for line in said)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(ramp.astype(np.float32), mode="F").save(flat / "ramp.tif")
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(flat / "ramp16.png")
    said.clear()
    data = load_image_folder(flat, size=16, echo=said.append)
    unit = to_unit(data.images)
    # Both hold the same ramp; the float one to float precision (no 8-bit rounding in between).
    assert torch.allclose(unit[0, 0], torch.from_numpy(ramp).float(), atol=1e-6)
    assert torch.allclose(unit[1, 0], torch.from_numpy(ramp).float(), atol=1e-5)
    assert not said  # the full range is used: no warning
    Image.fromarray((ramp * 30 - 10).astype(np.float32), mode="F").save(flat / "wide.tif")
    with pytest.raises(DataError, match=r"wide.tif holds values in \[-10, 20\].*\[0, 1\]"):
        load_image_folder(flat, size=16, echo=said.append)


def test_photos_are_read_upright_by_their_exif_orientation(tmp_path):
    """A camera stores a portrait photo sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    upright = np.zeros((6, 6), np.uint8)
    upright[0, :] = 255  # a white top row
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # what the camera writes: rotated counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "photos").mkdir()
    Image.fromarray(stored).save(tmp_path / "photos" / "p.png", exif=exif.tobytes())
    assert (np.asarray(Image.open(tmp_path / "photos" / "p.png"))[:, 0] == 255).all()  # stored: a white left column
    data = load_image_folder(tmp_path / "photos", size=6, echo=lambda _: None)
    assert to_unit(data.images[0, 0, 0]).min() > 0.9 and to_unit(data.images[0, 0, 1:]).max() < 0.1


def test_unreadable_huge_and_odd_folders_are_reported(tmp_path, gray_folder, monkeypatch):
    (gray_folder / "empty_class").mkdir()
    said: list[str] = []
    data = load_image_folder(gray_folder, size=6, echo=said.append)
    assert data.class_names == ("ants", "bars")
    assert any("without images" in line and "empty_class" in line for line in said)
    # A palette image whose colours are all grey is grayscale; a coloured one is RGB.
    gray_palette = Image.fromarray(np.arange(36, dtype=np.uint8).reshape(6, 6)).convert("P")
    gray_palette.save(tmp_path / "g.gif")
    from difflab.data.images import _normalised, _read

    assert _normalised(_read(tmp_path / "g.gif")).mode == "L"
    Image.fromarray(np.full((6, 6, 3), (200, 10, 10), np.uint8)).convert("P").save(tmp_path / "c.gif")
    assert _normalised(_read(tmp_path / "c.gif")).mode == "RGB"
    # Over Pillow's decompression-bomb limit: one line naming the file, not Pillow's traceback.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match=r"cannot read image .*deep.png \(DecompressionBombError"):
        load_image_folder(gray_folder, size=6, echo=lambda _: None)


def test_digits_8x8_and_range_helpers():
    digits = load_digits_8x8()
    assert isinstance(digits, ImageSet)
    assert digits.images.shape == (1797, 1, 8, 8) and digits.labels.dtype == torch.int64
    assert digits.images.min() == -1 and digits.images.max() == 1
    assert sorted(digits.labels.unique().tolist()) == list(range(10))
    x = torch.linspace(-1, 1, 11)
    assert torch.allclose(to_unit(x), torch.linspace(0, 1, 11))
    assert torch.allclose(from_unit(to_unit(x)), x, atol=1e-6)


# ---------------------------------------------------------------- grids and PNG files


def test_make_grid_layout_by_hand():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (0.1, 0.2, 0.3)])
    grid = make_grid(images, nrow=2, padding=1, pad_value=9.0)
    p = 9.0
    expected = torch.tensor(
        [
            [p, p, p, p, p, p, p],
            [p, 0.1, 0.1, p, 0.2, 0.2, p],
            [p, 0.1, 0.1, p, 0.2, 0.2, p],
            [p, p, p, p, p, p, p],
            [p, 0.3, 0.3, p, p, p, p],
            [p, 0.3, 0.3, p, p, p, p],
            [p, p, p, p, p, p, p],
        ]
    )
    assert grid.shape == (1, 7, 7)
    assert torch.allclose(grid[0], expected)
    # nrow larger than N: one row of N; padding 0 concatenates.
    flat = make_grid(images, nrow=10, padding=0)
    assert flat.shape == (1, 2, 6) and torch.allclose(flat[0, :, 2:4], torch.full((2, 2), 0.2))


def test_png_round_trip(tmp_path):
    generator = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (1, 5, 7), generator=generator).float() / 127.5 - 1
    rgb = torch.randint(0, 256, (3, 4, 4), generator=generator).float() / 127.5 - 1
    assert torch.allclose(load_image(save_image(gray, tmp_path / "g.png")), gray, atol=1e-6)
    assert torch.allclose(load_image(save_image(rgb, tmp_path / "c.png")), rgb, atol=1e-6)
    with Image.open(tmp_path / "g.png") as picture:
        assert picture.mode == "L" and picture.size == (7, 5)
    batch = torch.stack([gray, gray.flip(-1)])
    loaded = load_image(save_grid(batch, tmp_path / "grid.png", nrow=2, padding=2))
    assert torch.allclose(loaded, make_grid(batch, nrow=2, padding=2), atol=1e-6)
    # Out-of-range values are clipped when saved.
    assert load_image(save_image(torch.full((1, 2, 2), 3.0), tmp_path / "hi.png")).max() == 1.0


def test_image_rows_figure(tmp_path):
    rows = [("real", torch.rand(6, 1, 8, 8) * 2 - 1), ("noise 0.3", torch.rand(4, 1, 8, 8) * 2 - 1)]
    path = image_rows_figure(rows, tmp_path / "rows.png", title="calibration")
    with Image.open(path) as picture:
        assert picture.size[0] > 50 and picture.size[1] > 50


# ---------------------------------------------------------------- Frechet distance and inception score


def _scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The usual reference: mu/sigma by numpy, sqrtm by scipy (real part), as in pytorch-fid."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize(
    ("n1", "n2", "dim", "seed"),
    [(500, 400, 8, 0), (300, 300, 32, 1), (20, 25, 40, 2), (10, 200, 16, 3)],  # the last two: N < D
)
def test_frechet_matches_scipy_sqrtm(n1, n2, dim, seed):
    rng = np.random.default_rng(seed)
    mix1, mix2 = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim)) * 0.5
    x = rng.normal(size=(n1, dim)) @ mix1 + 0.3
    y = rng.normal(size=(n2, dim)) @ mix2 - 0.2
    ours = frechet_distance_of_features(torch.from_numpy(x), torch.from_numpy(y))
    reference = _scipy_frechet(x, y)
    assert ours == pytest.approx(reference, rel=1e-3, abs=1e-3)


def _balanced_mixture(n_per_class: int, generator: torch.Generator, centres: torch.Tensor) -> tuple:
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return centres[labels] + 0.7 * torch.randn(len(labels), centres.shape[1], generator=generator), labels


def test_bootstrap_fid_std_matches_the_spread_over_fresh_balanced_sample_sets():
    # A 10-class Gaussian mixture in 8 dims, a reference fitted on a shifted copy; samples come class-balanced, as
    # conditional samplers draw them. The FID's true sampling deviation at n = 200 is measured over 60 fresh sets.
    generator = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(10, 8, generator=generator)
    reference, _ = _balanced_mixture(1000, generator, centres + 0.3)
    ref_mean, ref_cov = feature_statistics(reference)
    sets = [_balanced_mixture(20, generator, centres) for _ in range(60)]
    true_std = float(torch.tensor([frechet_distance(*feature_statistics(x), ref_mean, ref_cov) for x, _ in sets]).std())
    stratified = [
        bootstrap_fid_std(x, ref_mean, ref_cov, strata=y, rounds=60, seed=i) for i, (x, y) in enumerate(sets[:8])
    ]
    plain = [bootstrap_fid_std(x, ref_mean, ref_cov, rounds=60, seed=i) for i, (x, _) in enumerate(sets[:8])]
    estimate = sum(stratified) / len(stratified)
    assert 0.7 * true_std < estimate < 1.6 * true_std
    # Unstratified resampling lets the class counts vary, which these balanced sets never do: a larger spread.
    assert sum(plain) / len(plain) > 1.3 * estimate
    # Deterministic for a seed; bad arguments are refused.
    x, y = sets[0]
    assert bootstrap_fid_std(x, ref_mean, ref_cov, strata=y, seed=3) == bootstrap_fid_std(
        x, ref_mean, ref_cov, strata=y, seed=3
    )
    # One sample per class (fewer samples than classes): strata of one row never vary, so the bootstrap falls back to
    # resampling all rows rather than report no noise at all (it once printed "FID sd 0.00").
    few, classes = x[::20][:10], y[::20][:10]
    assert len(set(classes.tolist())) == 10
    assert bootstrap_fid_std(few, ref_mean, ref_cov, strata=classes) == bootstrap_fid_std(few, ref_mean, ref_cov) > 0
    with pytest.raises(DataError, match="rounds"):
        bootstrap_fid_std(x, ref_mean, ref_cov, rounds=1)
    with pytest.raises(DataError, match="strata"):
        bootstrap_fid_std(x, ref_mean, ref_cov, strata=y[:-1])


def test_fid_ratio_std_is_the_delta_method_spread_of_independent_fids():
    generator = torch.Generator().manual_seed(1)
    first = 20 + 1.0 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    second = 22 + 1.5 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    assert fid_ratio_std(20, 1.0, 22, 1.5) == pytest.approx(float((second / first).std()), rel=0.03)
    assert fid_ratio_std(20, 0.0, 22, 0.0) == 0.0


@pytest.mark.parametrize(("n", "dim"), [(30, 64), (64, 64), (500, 16)])
def test_reference_fid_equals_the_frechet_distance_of_the_fit(n: int, dim: int) -> None:
    # Fewer samples than dimensions (an N x N problem), square, and more (one D x D problem with the reference root).
    generator = torch.Generator().manual_seed(n)
    reference = torch.randn(800, dim, generator=generator, dtype=torch.float64) @ torch.randn(
        dim, dim, generator=generator, dtype=torch.float64
    )
    samples = 0.9 * reference[:n] + 0.3 * torch.randn(n, dim, generator=generator, dtype=torch.float64) + 0.2
    mean, cov = feature_statistics(reference)
    expected = frechet_distance(*feature_statistics(samples), mean, cov)
    assert reference_fid(samples, mean, cov) == pytest.approx(expected, rel=1e-7)
    assert reference_fid(samples, mean, cov, psd_sqrt(cov)) == pytest.approx(expected, rel=1e-7)
    assert reference_fid(reference, mean, cov) == pytest.approx(0.0, abs=1e-8 * float(cov.trace()))
    with pytest.raises(DataError, match="dimensions"):
        reference_fid(samples[:, :-1], mean, cov)


def test_frechet_identical_and_shifted():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=generator) @ torch.randn(12, 12, generator=generator)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == torch.float64 and sigma.shape == (12, 12)
    assert torch.allclose(sigma, torch.from_numpy(np.cov(x.double().numpy(), rowvar=False)))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6 * float(sigma.trace()))
    shift = torch.linspace(-1, 2, 12, dtype=torch.float64)
    assert frechet_distance(mu + shift, sigma, mu, sigma) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    # Closed form for isotropic Gaussians: |dmu|^2 + D (s1 - s2)^2 for std s1, s2.
    eye = torch.eye(5, dtype=torch.float64)
    assert frechet_distance(torch.zeros(5), 4 * eye, torch.ones(5), eye) == pytest.approx(5 + 5 * (2 - 1) ** 2)
    with pytest.raises(DataError, match="NaN"):
        feature_statistics(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))
    with pytest.raises(DataError, match="do not match"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


def test_inception_score_limits():
    k = 10
    one_hot_uniform = torch.eye(k).repeat(5, 1)  # confident and balanced -> K
    assert inception_score(one_hot_uniform) == pytest.approx(k)
    same = torch.softmax(torch.randn(1, k), dim=1).repeat(50, 1)  # one class distribution for all -> 1
    assert inception_score(same) == pytest.approx(1.0)
    collapsed = torch.zeros(40, k)
    collapsed[:, 3] = 1  # confident but a single class -> 1
    assert inception_score(collapsed) == pytest.approx(1.0)
    # Two classes only, confident: exp(log 2) = 2; splits average the per-split scores.
    two = torch.eye(k)[torch.tensor([0, 1] * 10)]
    assert inception_score(two, splits=2) == pytest.approx(2.0)
    with pytest.raises(DataError):
        inception_score(two, splits=0)


def test_a_size_the_memory_cannot_hold_is_refused_before_reading(gray_folder, monkeypatch):
    """data.size=100000 once resized every image to 10^10 pixels for minutes before running out of memory."""
    from difflab import memory
    from difflab.data import images

    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)  # 1 GiB left
    load_image_folder(gray_folder, size=64, echo=lambda _: None)  # 5 x 64 x 64 x 27 bytes: fine
    reads = []
    monkeypatch.setattr(images, "_read", lambda path: reads.append(path))
    with pytest.raises(
        DataError, match=r"5 images of .*shapes at data.size=4096 need at least 2.1 GiB of memory, and 1.0"
    ):
        load_image_folder(gray_folder, size=4096, echo=lambda _: None)
    assert reads == []
