"""RGB -> IR translation: the paired-folder loader, the latent-pair cache, and the recipe end to end on real
RoadScene pairs (tiny models, few steps), with its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import config_from
from difflab.data.paired import load_paired_folders, match_pairs, split_value
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError, DataError
from difflab.experiments import rgb2ir
from difflab.experiments.runs import RunFolder
from difflab.metrics.image_quality import at_low_resolution, box_mean, guided_filter
from difflab.models.autoencoder import AutoencoderConfig, KLAutoencoder
from difflab.training.logging import read_series


def _write(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode=mode).save(path)


def _pairs(root: Path, names: list[str], size: tuple[int, int] = (40, 24)) -> tuple[Path, Path]:
    for i, name in enumerate(names):
        _write(root / "vis" / f"{name}.png", size, "RGB", i)
        _write(root / "ir" / f"{name}.png", size, "L", 100 + i)
    return root / "vis", root / "ir"


# ------------------------------------------------------------------------------------------- the ceiling rows
def test_guided_filter_against_closed_forms() -> None:
    generator = torch.Generator().manual_seed(0)
    guide = torch.rand(2, 3, 20, 24, generator=generator) * 2 - 1
    # A target that is an affine function of the guide's channels everywhere is reproduced exactly (eps -> 0).
    weights, offset = torch.tensor([0.5, -1.0, 0.25]), 0.1
    target = (guide * weights[:, None, None]).sum(1, keepdim=True) + offset
    assert torch.allclose(guided_filter(guide, target, radius=3, eps=1e-10), target, atol=1e-5)
    # A flat guide explains nothing: a = 0, b = the window mean, so the output is the box mean of the box mean.
    noise = torch.randn(2, 1, 20, 24, generator=generator)
    flat = torch.zeros(2, 3, 20, 24)
    assert torch.allclose(guided_filter(flat, noise, radius=2), box_mean(box_mean(noise, 2), 2), atol=1e-6)
    # Its fit to a target it cannot explain fully is better than the global mean and worse than the target itself.
    fitted = guided_filter(guide, target + 0.3 * noise, radius=2)
    error = (fitted - target - 0.3 * noise).pow(2).mean()
    assert 0 < error < (0.3 * noise).pow(2).mean()
    with pytest.raises(ValueError, match="do not match"):
        guided_filter(guide, target[:, :, :10], radius=2)


def test_low_resolution_oracle() -> None:
    images = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(at_low_resolution(images, 16), images, atol=1e-6)  # the full raster is the image
    coarse = at_low_resolution(images, 1)  # a 1 x 1 raster is each image's mean everywhere
    assert torch.allclose(coarse, images.mean((2, 3), keepdim=True).expand_as(images), atol=1e-6)
    assert torch.allclose(at_low_resolution(images, 4).mean((2, 3)), images.mean((2, 3)), atol=1e-5)
    assert at_low_resolution(torch.zeros(1, 1, 30, 30), 8).shape == (1, 1, 30, 30)  # 8 need not divide the size


# ---------------------------------------------------------------------------------------------------- the loader
def test_pairs_match_by_name_and_the_unmatched_are_reported(tmp_path: Path) -> None:
    vis, ir = _pairs(tmp_path, [f"p{i:02d}" for i in range(12)])
    _write(vis / "only_rgb.jpg", (30, 30), "RGB", 7)
    _write(ir / "only_ir.png", (30, 30), "L", 8)
    (vis / "notes.txt").write_text("not an image")
    _write(ir / "p03.jpg", (20, 20), "L", 9)  # a second target named p03: ambiguous
    with pytest.raises(DataError, match="two target images named 'p03'"):
        load_paired_folders(vis, ir, size=16)
    (ir / "p03.jpg").unlink()
    said: list[str] = []
    data = load_paired_folders(vis, ir, size=16, test_fraction=0.3, echo=said.append)
    assert data.unmatched_inputs == ("only_rgb.jpg",) and data.unmatched_targets == ("only_ir.png",)
    assert "skipped 1 non-image file(s) or subfolder(s)" in said[0] and "notes.txt" in said[0]
    assert data.unmatched == 2 and "1 input and 1 target image(s) have no partner" in said[1]
    assert len(data.train) + len(data.test) == 12 and set(data.train.names).isdisjoint(data.test.names)
    assert data.train.inputs.shape[1:] == (3, 16, 16) and data.train.targets.shape[1:] == (1, 16, 16)
    assert data.train.inputs.min() >= -1 and data.train.inputs.max() <= 1
    # The pixels are those of the named files: the centre crop of p00's input, resized.
    index = data.train.names.index("p00") if "p00" in data.train.names else None
    split = data.train if index is not None else data.test
    row = split.names.index("p00")
    expected = Image.open(vis / "p00.png").crop((8, 0, 32, 24)).resize((16, 16), Image.Resampling.BICUBIC)
    got = ((split.inputs[row].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(got.astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_mismatched_pair_sizes_are_resized_together(tmp_path: Path) -> None:
    vis, ir = _pairs(tmp_path, ["a", "b", "c", "d", "e", "f"])
    # b's IR is twice the size of its RGB image: it is brought to the RGB size before the shared crop.
    big = np.asarray(Image.open(ir / "b.png").resize((80, 48), Image.Resampling.NEAREST))
    Image.fromarray(big, mode="L").save(ir / "b.png")
    data = load_paired_folders(vis, ir, size=12, test_fraction=0.5)
    split = data.train if "b" in data.train.names else data.test
    row = split.names.index("b")
    small = Image.open(ir / "b.png").resize((40, 24), Image.Resampling.BICUBIC).crop((8, 0, 32, 24))
    expected = np.asarray(small.resize((12, 12), Image.Resampling.BICUBIC)).astype(int)
    got = ((split.targets[row, 0] + 1) * 127.5).round().numpy().astype(int)
    assert np.abs(got - expected).max() <= 1


def test_pairs_of_real_world_files(tmp_path: Path) -> None:
    """Names macOS wrote decomposed (NFD) pair with composed (NFC) ones; a 16-bit IR target keeps its scale; a
    target of another aspect ratio is stretched with a warning."""
    import unicodedata

    vis, ir = _pairs(tmp_path, ["a", "b", "c", "d"])
    _write(vis / (unicodedata.normalize("NFC", "café") + ".png"), (40, 24), "RGB", 5)
    ramp = np.tile(np.linspace(0, 1, 40), (24, 1))
    Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)).save(ir / (unicodedata.normalize("NFD", "café") + ".png"))
    _write(ir / "d.png", (24, 40), "L", 6)  # portrait IR beside a landscape RGB image
    said: list[str] = []
    data = load_paired_folders(vis, ir, size=12, test_fraction=0.5, echo=said.append)
    assert data.unmatched == 0 and len(data.train) + len(data.test) == 5
    split = data.train if "café" in data.train.names else data.test
    target = (split.targets[split.names.index("café"), 0] + 1) / 2
    # The centre crop of a left-to-right ramp 0..1, at float precision: its middle is near 0.5, not near 0.
    assert abs(float(target.mean()) - 0.5) < 0.02 and float(target.max()) > 0.75
    assert any("differ from their input in aspect ratio" in line and "d.png" in line for line in said)


def test_stretch_takes_the_targets_map_from_the_training_split_only(tmp_path: Path) -> None:
    """``intensity="stretch"`` maps raw 16-bit IR counts from the training targets' 0.5th..99.5th percentile to the
    full range; a test target hotter than every training one does not move the map (it clips at white)."""
    names = [f"p{i:02d}" for i in range(12)]
    vis, ir = _pairs(tmp_path, names, size=(12, 12))
    test_names = [n for n in names if split_value(n, 0) < 0.25]
    assert test_names and len(test_names) < len(names)
    rng = np.random.default_rng(0)
    for name in names:
        top = 30000 if name in test_names else 9000  # the test scenes are far hotter
        Image.fromarray(rng.integers(8000, top, (12, 12)).astype(np.uint16)).save(ir / f"{name}.png")
    said: list[str] = []
    data = load_paired_folders(vis, ir, size=12, test_fraction=0.25, echo=said.append, intensity="stretch")
    assert set(data.test.names) == set(test_names)
    low, high = data.target_intensity
    assert 8000 / 65535 <= low < high <= 9000 / 65535  # the training targets' band, not the test's
    train_unit, test_unit = (data.train.targets + 1) / 2, (data.test.targets + 1) / 2
    assert float(train_unit.min()) == 0.0 and float(train_unit.max()) == 1.0
    assert float((test_unit == 1.0).float().mean()) > 0.9  # hotter than the training band
    assert any("data.intensity=stretch" in line and "training split" in line for line in said)
    plain = load_paired_folders(vis, ir, size=12, test_fraction=0.25, echo=lambda _: None)
    assert plain.target_intensity is None and float((plain.train.targets + 1).max() / 2) < 9000 / 65535 + 1e-6
    assert torch.equal(plain.train.inputs, data.train.inputs)  # the RGB inputs are not touched
    # the recipe's data.intensity reaches the loader
    settings = rgb2ir.PairedDataConfig(input=str(vis), target=str(ir), size=12, test_fraction=0.25, intensity="stretch")
    assert rgb2ir.load_data(settings, echo=lambda _: None).target_intensity == data.target_intensity
    with pytest.raises(ConfigError, match="data.intensity must be one of full, stretch"):
        rgb2ir.PairedDataConfig(intensity="auto")


def test_the_hash_split_never_moves_a_pair_when_files_are_added(tmp_path: Path) -> None:
    names = [f"img{i:03d}" for i in range(40)]
    vis, ir = _pairs(tmp_path, names, size=(8, 8))
    before = load_paired_folders(vis, ir, size=8, test_fraction=0.25, seed=3)
    _pairs(tmp_path, [f"new{i:03d}" for i in range(30)], size=(8, 8))
    after = load_paired_folders(vis, ir, size=8, test_fraction=0.25, seed=3)
    assert set(before.test.names) <= set(after.test.names)
    assert set(before.train.names) <= set(after.train.names)
    assert 0.1 < len(after.test) / 70 < 0.4  # about the requested fraction
    assert all((split_value(n, 3) < 0.25) == (n in after.test.names) for n in after.train.names + after.test.names)
    other_seed = load_paired_folders(vis, ir, size=8, test_fraction=0.25, seed=4)
    assert set(other_seed.test.names) != set(after.test.names)


def test_bad_pairs_give_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    vis, ir = _pairs(tmp_path / "gray", ["a", "b", "c"])
    _write(vis / "b.png", (40, 24), "L", 1)  # a grayscale image where RGB is expected
    with pytest.raises(DataError, match=r"input image .*b\.png is grayscale"):
        load_paired_folders(vis, ir, size=8)
    vis, ir = _pairs(tmp_path / "broken", ["a", "b", "c"])
    (ir / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*c\.png"):
        load_paired_folders(vis, ir, size=8)
    vis, ir = _pairs(tmp_path / "lonely", ["a", "b", "c"])
    _write(vis / "z.png", (8, 8), "RGB", 2)
    with pytest.raises(DataError, match=r"input image .*z\.png has no partner"):
        load_paired_folders(vis, ir, size=8, strict=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images .* in the input folder"):
        match_pairs(tmp_path / "empty", ir)
    with pytest.raises(DataError, match="does not exist"):
        match_pairs(tmp_path / "missing", ir)


# ------------------------------------------------------------------------------------------------------ the cache
def _tiny_setup(tmp_path: Path) -> tuple[KLAutoencoder, object, rgb2ir.RGB2IRConfig]:
    vis, ir = _pairs(tmp_path / "data", [f"n{i}" for i in range(10)])
    data = load_paired_folders(vis, ir, size=16, test_fraction=0.3)
    torch.manual_seed(0)
    vae = KLAutoencoder(AutoencoderConfig(in_channels=3, latent_channels=4, base_channels=8, channel_mults=(1, 2)))
    vae.eval().requires_grad_(False)
    config = rgb2ir.RGB2IRConfig(latents=rgb2ir.LatentConfig(shard_rows=4))
    return vae, data, config


def test_latent_pairs_are_the_forward_process_with_fixed_noise(tmp_path: Path) -> None:
    vae, data, config = _tiny_setup(tmp_path)
    schedule = NoiseSchedule.from_config(config.schedule)
    splits, info = rgb2ir.cached_latent_pairs(
        vae, data, schedule, config, tmp_path / "cache", torch.device("cpu"), echo=lambda _: None
    )
    train, test = splits["train"], splits["test"]
    assert len(train.names) == 2 * len(data.train) and train.names[len(data.train)].endswith("|hflip")
    alpha_bar = schedule.alpha_bar[config.latents.t_start]
    expected = alpha_bar.sqrt() * test["ir0"] + (1 - alpha_bar).sqrt() * test["noise_ir"]
    torch.testing.assert_close(test["ir_t"], expected)
    torch.testing.assert_close(test["noise_rgb"], test["noise_ir"])  # shared noise
    # The noise of an image depends on its name only, and removing it recovers z_0 exactly.
    name = test.names[0]
    again = rgb2ir.fixed_noise((name,), tuple(test["ir0"].shape[1:]), config.latents.noise_seed)
    torch.testing.assert_close(again[0], test["noise_ir"][0])
    t = torch.full((len(test.names),), config.latents.t_start)
    torch.testing.assert_close(
        schedule.predict_x0(test["ir_t"], t, test["noise_ir"]), test["ir0"], atol=1e-5, rtol=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(test["rgb0"], vae.encode(data.test.inputs))


def test_cache_is_reused_when_unchanged_and_rebuilt_when_stale_or_damaged(tmp_path: Path) -> None:
    vae, data, config = _tiny_setup(tmp_path)
    schedule = NoiseSchedule.from_config(config.schedule)
    root, cpu, said = tmp_path / "cache", torch.device("cpu"), []
    first, info = rgb2ir.cached_latent_pairs(vae, data, schedule, config, root, cpu, said.append)
    shards = -(-2 * len(data.train) // 4)  # training pairs and their mirror images, 4 rows a shard
    assert info["cached"] is False and len(list(Path(info["path"]).glob("train-*.safetensors"))) == shards
    second, info2 = rgb2ir.cached_latent_pairs(vae, data, schedule, config, root, cpu, said.append)
    assert info2["cached"] is True and info2["key"] == info["key"]
    torch.testing.assert_close(second["train"]["ir_t"], first["train"]["ir_t"])
    assert second["train"].names == first["train"].names
    # Changed settings: another key; the old cache is stale and removed, never reused.
    changed = rgb2ir.RGB2IRConfig(latents=rgb2ir.LatentConfig(t_start=300, shard_rows=4))
    third, info3 = rgb2ir.cached_latent_pairs(vae, data, schedule, changed, root, cpu, said.append)
    assert info3["cached"] is False and info3["key"] != info["key"]
    assert info3["stale_removed"] == [f"pairs-{info['key']}"] and not Path(info["path"]).exists()
    assert not torch.allclose(third["train"]["ir_t"], first["train"]["ir_t"])
    # Changed weights (a retrained autoencoder) change the key too.
    with torch.no_grad():
        next(vae.parameters()).add_(0.01)
    assert rgb2ir.cache_key(vae, data, changed) != info3["key"]
    # A damaged shard of the right key is detected by its checksum and rebuilt.
    _, info4 = rgb2ir.cached_latent_pairs(vae, data, schedule, changed, root, cpu, said.append)
    shard = Path(info4["path"]) / "test-000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-8:] = b"\x00" * 8
    shard.write_bytes(bytes(raw))
    _, info5 = rgb2ir.cached_latent_pairs(vae, data, schedule, changed, root, cpu, said.append)
    assert info5["cached"] is False and info5.get("rebuilt_damaged") is True
    assert any("stale" in line for line in said) and any("damaged" in line for line in said)


# ----------------------------------------------------------------------------------------------- the recipe
QUICK = [
    "progress=false",
    "data.size=32",
    "data.max_pairs=40",
    "data.test_fraction=0.25",
    "vae.training.model.base_channels=8",
    "vae.training.crop=16",
    "vae.training.train.steps=80",
    "vae.training.train.batch_size=16",
    "vae.training.train.warmup_steps=10",
    "vae.training.train.eval_every=40",
    "vae.training.train.log_every=10",
    "regressor.unet.base_channels=16",
    "regressor.unet.num_res_blocks=1",
    "regressor.train.steps=80",
    "regressor.train.batch_size=16",
    "regressor.train.warmup_steps=10",
    "regressor.train.eval_every=40",
    "regressor.train.log_every=10",
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "rgb2ir"
    assert main(["run", "rgb2ir", f"run_dir={run_dir}", *QUICK]) == 0
    return run_dir


def test_recipe_learns_and_writes_its_report(quick_run: Path) -> None:
    for name in (
        "metrics.json",
        "report.md",
        "report.html",
        "figures/translation.png",
        "figures/loss.png",
        "checkpoints/autoencoder.safetensors",
        "checkpoints/regressor_t400.safetensors",
    ):
        assert (quick_run / name).is_file(), name
    metrics = json.loads((quick_run / "metrics.json").read_text())
    assert metrics["data"]["train_pairs"] + metrics["data"]["test_pairs"] == 40
    # Learning: each regressor beats the identity on held-out latents; the noisy one also the mean latent
    # (whose error includes all of the unpredictable-from-the-mean noise).
    noisy, clean = metrics["regressors"]["regressor_t400"], metrics["regressors"]["regressor_t0"]
    assert noisy["test_mse"] < 0.8 * min(noisy["identity_mse"], noisy["mean_mse"])
    assert clean["test_mse"] < clean["identity_mse"]
    _, losses = read_series(quick_run / "metrics.jsonl", "autoencoder/train_loss")
    assert np.mean(losses[-3:]) < 0.8 * losses[0]
    # Every scoring has means and per-image rows over the test split.
    for key in rgb2ir.SCORINGS:
        scores = metrics["scores"][key]
        assert len(scores["per_image"]) == metrics["data"]["test_pairs"]
        assert scores["psnr"] == pytest.approx(np.mean([r["psnr"] for r in scores["per_image"]]))
    assert metrics["headline"]["method"] == "t0" and len(metrics["targets"]) == 3
    # The ceiling rows are fitted on the answer: both beat the mean training image by far.
    baselines = metrics["baselines"]
    for oracle in ("oracle_low_resolution", "oracle_local_affine"):
        assert baselines[oracle]["psnr"] > baselines["mean_training_image"]["psnr"] + 3, oracle
    assert set(metrics["timings_seconds"]) >= {"data", "autoencoder", "latents", "evaluate", "total"}
    report = (quick_run / "report.md").read_text()
    assert "11.5" in report and "0.07" in report  # the reference's figures beside ours
    assert f"{metrics['headline']['psnr']:.2f}" in report
    assert f"{baselines['oracle_local_affine']['ssim']:.3f}" in report and "fitted on the true IR" in report
    assert 'data-source="scores.t0.psnr"' in (quick_run / "report.html").read_text()


def test_invert_needs_the_latent_eps_models(quick_run: Path, capsys) -> None:
    assert main(["invert", str(quick_run), "--steps", "2"]) == 2
    assert "inversion.enabled=true" in capsys.readouterr().err


def test_rerun_reuses_the_latent_cache(quick_run: Path, capsys) -> None:
    before = json.loads((quick_run / "metrics.json").read_text())
    assert main(["run", "rgb2ir", f"run_dir={quick_run}", *QUICK]) == 0
    after = json.loads((quick_run / "metrics.json").read_text())
    assert before["latents"]["cached"] is False and after["latents"]["cached"] is True
    assert after["latents"]["key"] == before["latents"]["key"]
    assert after["headline"]["psnr"] == pytest.approx(before["headline"]["psnr"], abs=1e-6)


def test_inversion_based_translation_is_scored_beside_the_others(tmp_path: Path) -> None:
    run_dir = tmp_path / "inv"
    overrides = [o for o in QUICK if not o.startswith(("vae.training.train.steps", "regressor.train.steps"))]
    overrides += [
        "vae.training.train.steps=20",
        "regressor.train.steps=40",
        "data.max_pairs=24",
        "inversion.enabled=true",
        "inversion.steps=8",
        "inversion.train.steps=300",
        "inversion.train.batch_size=16",
        "inversion.train.warmup_steps=10",
        "inversion.unet.base_channels=16",
        "inversion.train.ema_decay=0",
    ]
    assert main(["run", "rgb2ir", f"run_dir={run_dir}", *overrides]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["scores"]) == {*rgb2ir.SCORINGS, "inversion"}
    assert len(metrics["scores"]["inversion"]["per_image"]) == metrics["data"]["test_pairs"]
    # The eps models learned: their held-out eps-MSE beats the data-agnostic eps sqrt(1 - alpha_bar) x_t's on the
    # same timesteps and noise (measured 0.63x and 0.72x; 60 steps scored 1.4x and 1.6x of it). DDIM with eta = 0
    # is close to invertible: the round trip returns the latents far closer than their spread (unit variance).
    for name in ("eps_rgb", "eps_ir"):
        model = metrics["inversion"]["models"][name]
        assert model["final_validation"]["loss"] < 0.8 * model["agnostic_validation"]["loss"], model
    assert metrics["inversion"]["round_trip_latent_mse"] < 0.01  # 0.0029 measured 2026-12-06
    inverted = metrics["regressors"]["regressor_inverted"]
    assert inverted["test_mse"] < inverted["identity_mse"]
    assert "Inversion-based translation" in (run_dir / "report.md").read_text()
    # difflab invert on the latent eps models: round trips of the cached test latents against the step count.
    assert main(["invert", str(run_dir), "--steps", "2", "10", "--n", "4", "--t-end", "400"]) == 0
    rows = json.loads((run_dir / "inversion.json").read_text())["rows"]
    assert [(r["side"], r["steps"]) for r in rows] == [("rgb", 2), ("rgb", 10), ("ir", 2), ("ir", 10)]
    for side in ("rgb", "ir"):
        coarse, fine = (r for r in rows if r["side"] == side)
        assert fine["latent_mse"] < coarse["latent_mse"] and fine["psnr_db"] > 25
    assert (run_dir / "figures" / "inversion.png").is_file()
    report = (run_dir / "report.md").read_text()  # rewritten with the round trips
    assert "## DDIM round trips (difflab invert)" in report and "| latent MSE |" in report
    assert f"{rows[-1]['psnr_db']:.2f}" in report
    # Another inversion spacing and integrator in the same folder: the inverted latents change, so the regressor
    # trained on them is retrained (never silently reused); the autoencoder, the eps models and the other regressors
    # are kept. The second-order flow with log-SNR spacing round-trips closer than DDIM did (4x in MSE here).
    said: list[str] = []
    changed = [f"run_dir={run_dir}", *overrides, "inversion.spacing=logsnr", "inversion.order=2"]
    config = config_from(rgb2ir.RGB2IRConfig(), overrides=changed)
    rgb2ir.run_rgb2ir(config, echo=said.append)
    retrained = [line for line in said if "was trained on other inputs" in line]
    assert len(retrained) == 1 and "regressor_inverted" in retrained[0], said
    second = json.loads((run_dir / "metrics.json").read_text())["inversion"]
    assert (second["spacing"], second["order"]) == ("logsnr", 2)
    assert second["round_trip_latent_mse"] < metrics["inversion"]["round_trip_latent_mse"], second
    assert "second-order Adams-Bashforth" in (run_dir / "report.md").read_text()


def test_a_model_trained_on_other_inputs_is_discarded(tmp_path: Path) -> None:
    run = RunFolder(tmp_path, "rgb2ir")
    (tmp_path / "checkpoints" / "regressor").mkdir(parents=True)
    weights = tmp_path / "checkpoints" / "regressor.safetensors"
    weights.write_bytes(b"old")
    x, said = torch.arange(6.0).reshape(2, 3), []
    assert run.discard_if_inputs_changed("regressor", x, echo=said.append)  # no record of its inputs: unknown
    assert not weights.exists() and not (tmp_path / "checkpoints" / "regressor").exists() and len(said) == 1
    weights.write_bytes(b"trained on x")
    assert not run.discard_if_inputs_changed("regressor", x.clone(), echo=said.append) and weights.exists()
    assert run.discard_if_inputs_changed("regressor", x + 1e-6, echo=said.append) and not weights.exists()
    assert len(said) == 2 and "retraining" in said[-1]


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    vis, ir = _pairs(tmp_path / "gray", ["a", "b", "c", "d"])
    _write(vis / "c.png", (40, 24), "L", 3)
    cases = [
        ([f"data.input={tmp_path / 'nowhere'}"], "input folder"),
        ([f"data.input={vis}", f"data.target={ir}"], "c.png is grayscale"),
        (["latents.noise=loud"], "latents.noise must be one of"),
        (["latents.t_start=1000"], "must be below schedule.num_timesteps"),
        (["vae.kind=diffusers"], "needs vae.path"),
        (["evaluation.headline=inversion"], "needs inversion.enabled=true"),
        (["inversion.order=3"], "inversion.order must be 1 or 2, got 3"),
        (["inversion.enabled=true", "latents.t_start=10", "inversion.steps=20"], "use at most 10 steps"),
        (["data.input=", "data.target="], "data.input and data.target must name the two image folders"),
        (["vae.kind=diffusers", f"vae.path={tmp_path / 'no-vae'}"], "must be a local folder holding an AutoencoderKL"),
        (["vae.kind=run", f"vae.path={tmp_path}"], "not an autoencoder run"),
        (["vae.training.train.precision=fp16"], "vae.training.train.precision=fp16 needs a CUDA GPU"),
    ]
    for overrides, message in cases:
        assert main(["run", "rgb2ir", f"run_dir={tmp_path / 'run'}", "progress=false", *overrides, "--fresh"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "run").exists(), f"{overrides} left a run folder behind"


def test_the_time_target_counts_networks_trained_in_earlier_sessions() -> None:
    from difflab.experiments.rgb2ir import rgb2ir_targets, whole_run_seconds

    def metrics(timings: dict, autoencoder: float, regressors: tuple[float, float]) -> dict:
        return {
            "headline": {"method": "t0", "psnr": 15.0, "ssim": 0.3},
            "timings_seconds": timings,
            "autoencoder": {"train_seconds": autoencoder},
            "regressors": {"regressor_t400": {"train_seconds": regressors[0]}, "regressor_t0": {"train_seconds": 0}},
            "inversion": None,
        }

    # one session: its own wall time (the training stages hold the training and a little more)
    alone = metrics({"autoencoder": 230.0, "train regressor_t400": 50.0, "total": 330.0}, 221.0, (47.0, 0))
    assert whole_run_seconds(alone) == 330.0
    # a rerun that reused everything: 72 s of its own plus the 268 s the networks took before
    rerun = metrics({"autoencoder": 1.0, "train regressor_t400": 0.5, "total": 72.0}, 221.0, (47.0, 0))
    assert whole_run_seconds(rerun) == pytest.approx(72.0 + 268.0 - 1.5)
    target = rgb2ir_targets(rerun)[-1]
    assert target["value"] == pytest.approx((72.0 + 266.5) / 60) and target["met"] and "minutes" in target["target"]
