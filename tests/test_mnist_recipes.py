"""The image recipes end to end on small data: artefacts, learning, sampling from a run, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.data.images import load_digits_8x8
from difflab.experiments.mnist import sample_from_run
from difflab.sampling.trajectory import Trajectory
from difflab.viz.images import load_image
from reportcheck import assert_self_contained, assert_sources, assert_traceable

TINY_DIGITS = [
    "data.source=digits",
    "progress=false",
    "train.batch_size=64",
    "train.eval_every=50",
    "train.log_every=10",
    "train.lr=2e-3",
    "unet.base_channels=16",
    "schedule.num_timesteps=100",
    "metrics.batch_size=100",
    "metrics.ddim_steps=10",
]


@pytest.fixture(scope="module")
def cfg_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "cfg"
    assert (
        main(
            [
                "run",
                "mnist-cfg",
                f"run_dir={run_dir}",
                *TINY_DIGITS,
                "train.steps=150",
                "metrics.n_samples=100",
                "guidance.n_sweep=50",
                "guidance.sweep=[0,2]",
                "guidance.grid_per_digit=3",
            ]
        )
        == 0
    )
    return run_dir


def test_cfg_run_writes_its_artefacts_and_learns(cfg_run: Path) -> None:
    for name in [
        "report.md",
        "report.html",
        "samples/trajectory.safetensors",
        "metrics.json",
        "checkpoints/denoiser.safetensors",
        "figures/digits_grid.png",
        "figures/denoising_panel.png",
        "figures/progress.png",
        "figures/loss.png",
        "samples/cfg_w2.pt",
    ]:
        assert (cfg_run / name).is_file(), name
    assert len(list((cfg_run / "figures" / "progress").glob("epoch_*.pt"))) >= 5  # 1,617 digits / 64 per step
    records = [json.loads(line) for line in (cfg_run / "metrics.jsonl").read_text().splitlines()]
    val = [r["value"] for r in records if r["tag"] == "denoiser/val_loss"]
    assert val[-1] < 0.7 * val[0]
    samples = torch.load(cfg_run / "samples" / "cfg_w2.pt", weights_only=True)
    assert samples["images"].shape == (100, 1, 8, 8) and samples["labels"].tolist()[:3] == [0, 1, 2]
    assert samples["images"].abs().max() <= 1
    # guidance steers the trained model: a logistic-regression digit reader fitted on the real 8 x 8 digits (93% on
    # held-out ones in 5-fold cross-validation) reads the intended digit in 51% of the w = 2 samples after 150 steps
    # (measured 2026-12-06; chance is 10%)
    from sklearn.linear_model import LogisticRegression

    digits = load_digits_8x8()
    reader = LogisticRegression(max_iter=2000).fit(digits.images.flatten(1).numpy(), digits.labels.numpy())
    read = torch.from_numpy(reader.predict(samples["images"].flatten(1).numpy()))
    assert float((read == samples["labels"]).float().mean()) > 0.3
    grid = load_image(cfg_run / "figures" / "digits_grid.png")
    assert grid.shape[-2] > grid.shape[-1]  # 10 rows of 3 digits
    trajectory = Trajectory.load(cfg_run / "samples" / "trajectory.safetensors")
    assert trajectory.kind == "images" and trajectory.x_t.shape == (10, 8, 1, 8, 8)


def test_cfg_report_is_self_contained_and_traced(cfg_run: Path) -> None:
    assert_self_contained(cfg_run, "report", min_images=4)  # digit grid, panel, progress, loss
    metrics = json.loads((cfg_run / "metrics.json").read_text())
    assert_sources(cfg_run, "report", {"": metrics}, min_values=20)
    md = (cfg_run / "report.md").read_text()
    for title in ("Samples at w = 2", "Guidance sweep", "How the samples form", "Training", "Environment"):
        assert f"## {title}\n" in md
    assert "| w = 0 | 50 |" in md and "Share classified as each digit" not in md  # no evaluator on digits
    assert "a class embedding of 10 digits and a learned null label" in md


def test_sample_a_chosen_digit_from_a_run(cfg_run: Path, capsys) -> None:
    path = sample_from_run(cfg_run, n=4, digit=7, guidance=2.0, sampler="ddim", steps=10, device="cpu")
    assert path.is_file() and path.with_suffix(".pt").is_file()
    content = torch.load(path.with_suffix(".pt"), weights_only=True)
    assert content["labels"].tolist() == [7, 7, 7, 7]
    assert (
        main(
            ["sample", str(cfg_run), "--digit", "3", "--guidance", "2", "--n", "4", "--sampler", "ddim", "--steps", "5"]
        )
        == 0
    )
    assert "samples" in capsys.readouterr().out
    assert main(["sample", str(cfg_run), "--digit", "12"]) == 2
    assert "--digit must name a class or be an index 0 .. 9" in capsys.readouterr().err
    # --guidance without --digit: every digit in turn, guided at w
    assert main(["sample", str(cfg_run), "--guidance", "2", "--n", "4", "--steps", "5"]) == 0
    every = torch.load(cfg_run / "samples" / "sample_everydigit_w2_ddim5_seed0.pt", weights_only=True)
    assert every["labels"].tolist() == [0, 1, 2, 3]
    assert main(["sample", str(cfg_run), "--n", "2", "--steps", "5"]) == 0  # the null label: unconditional
    assert (cfg_run / "samples" / "sample_uncond_ddim5_seed0.pt").is_file()
    # registry samplers take their options (here the Karras ladder and half the SDE's noise) by --option / --eta
    command = ["sample", str(cfg_run), "--digit", "3", "--n", "4", "--sampler", "dpmpp-2m-sde", "--steps", "5"]
    assert main([*command, "--eta", "0.5", "--option", "spacing=karras"]) == 0
    tuned = torch.load(
        cfg_run / "samples" / "sample_digit3_w1_dpmpp-2m-sde5_eta0.5_spacingkarras_seed0.pt", weights_only=True
    )
    assert main(command) == 0
    default = torch.load(cfg_run / "samples" / "sample_digit3_w1_dpmpp-2m-sde5_seed0.pt", weights_only=True)
    assert not torch.allclose(tuned["images"], default["images"])
    assert main(["sample", str(cfg_run), "--sampler", "ddim", "--option", "spacing=karras"]) == 2
    assert "recipe's own sampler" in capsys.readouterr().err
    # --precision bf16: the network under bf16 autocast; the same digits up to bf16 rounding, in a file of its own
    command = ["sample", str(cfg_run), "--digit", "3", "--guidance", "2", "--n", "4", "--sampler", "ddim"]
    assert main([*command, "--steps", "5", "--precision", "bf16"]) == 0
    bf16 = torch.load(cfg_run / "samples" / "sample_digit3_w2_ddim5_bf16_seed0.pt", weights_only=True)
    fp32 = torch.load(cfg_run / "samples" / "sample_digit3_w2_ddim5_seed0.pt", weights_only=True)
    assert 0 < (bf16["images"] - fp32["images"]).abs().mean() < 0.05
    assert main([*command, "--precision", "fp16"]) == 2
    assert "precision must be one of fp32, bf16, got 'fp16'" in capsys.readouterr().err


def test_a_class_conditional_run_is_inverted_with_each_images_own_label(cfg_run: Path, unet_labels) -> None:
    assert main(["invert", str(cfg_run), "--steps", "4", "40", "--n", "16"]) == 0
    seen = unet_labels
    result = json.loads((cfg_run / "inversion.json").read_text())
    assert result["model"] == "class-conditional, each image's own label (w = 1)"
    coarse, fine = result["rows"]
    assert fine["psnr_db"] > coarse["psnr_db"] + 3  # the round trip converges with the steps
    assert len(seen) == 2 * (4 + 40) and all(torch.equal(labels, seen[0]) for labels in seen)
    assert len(set(seen[0].tolist())) > 3  # the held-out images' own labels, not one class or the null label
    assert 10 not in seen[0].tolist()


def test_ddpm_recipe_on_digits(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "ddpm"
    assert (
        main(
            [
                "run",
                "mnist-ddpm",
                f"run_dir={run_dir}",
                *TINY_DIGITS,
                "train.steps=100",
                "metrics.n_samples=50",
                "metrics.n_ddpm=8",
            ]
        )
        == 0
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["grids"]["ddpm"]["network_evaluations"] == 16 * 100
    assert metrics["grids"]["ddim"]["network_evaluations"] == 16 * 10
    for name in ["grid_ddpm.png", "grid_ddim.png", "loss.png"]:
        assert (run_dir / "figures" / name).is_file()
    assert main(["sample", str(run_dir), "--guidance", "2", "--n", "2"]) == 2  # nothing to guide
    assert "holds an unconditional model: --guidance 2 needs a class-conditional" in capsys.readouterr().err


def test_bad_image_input(tmp_path: Path, capsys) -> None:
    assert main(["run", "mnist-cfg", "data.source=imagefolder", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "needs data.path" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "mnist-cfg",
                "data.source=imagefolder",
                f"data.path={tmp_path / 'none'}",
                "data.size=16",
                f"run_dir={tmp_path / 'r'}",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    from PIL import Image

    (tmp_path / "one").mkdir()
    Image.new("L", (20, 20)).save(tmp_path / "one" / "only.png")
    one = ["run", "mnist-ddpm", "data=imagefolder", f"data.path={tmp_path / 'one'}", "data.size=16"]
    assert main([*one, f"run_dir={tmp_path / 'r1'}"]) == 2
    assert "holds 1 image(s), all held out" in capsys.readouterr().err and not (tmp_path / "r1").exists()
    assert main(["run", "mnist-cfg", "unet.num_classes=0", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert main(["sample", str(tmp_path)]) == 2
    assert "not a difflab run folder" in capsys.readouterr().err


def test_mnist_run_is_evaluated_against_its_calibration_rows(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "mnist"
    assert (
        main(
            [
                "run",
                "mnist-ddpm",
                f"run_dir={run_dir}",
                "data.max_train=2000",
                "progress=false",
                "train.steps=160",
                "train.lr=2e-3",
                "train.batch_size=64",
                "train.eval_every=80",
                "unet.base_channels=16",
                "schedule.num_timesteps=100",
                "metrics.n_samples=100",
                "metrics.n_ddpm=10",
                "metrics.ddim_steps=10",
                "metrics.batch_size=100",
            ]
        )
        == 0
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = {r["name"]: r for r in metrics["calibration"]["100"]}
    assert rows["real held-out"]["fid"] < rows["pure noise uniform[0,1]"]["fid"]
    assert metrics["ddim"]["fid"] < rows["pure noise uniform[0,1]"]["fid"]  # 160 steps already beat noise
    # The denoiser learned the digits: on the held-out test digits its eps-MSE at every diagnostic t with SNR above
    # 0.1 is well below the data-agnostic eps sqrt(1 - alpha_bar) x_t's, alpha_bar (1 - alpha_bar) E[x_0^2] +
    # alpha_bar^2 (measured: 0.35-0.39 of it).
    from difflab.data.mnist import load_mnist

    second_moment = float(load_mnist("test").images[: metrics["objective"]["n"]].square().mean())
    learned = [r for r in metrics["objective"]["rows"] if r["log10_snr"] > -1]
    assert len(learned) >= 4
    for r in learned:
        alpha_bar = 10 ** r["log10_snr"] / (1 + 10 ** r["log10_snr"])
        agnostic = alpha_bar * (1 - alpha_bar) * second_moment + alpha_bar**2
        assert r["eps_mse"] < 0.6 * agnostic, (r["t"], r["eps_mse"], agnostic)
    ddim_steps, ddpm_steps = metrics["grids"]["ddim"]["steps"], metrics["grids"]["ddpm"]["steps"]
    assert metrics["targets"][0]["target"].startswith(f"DDIM-{ddim_steps} FID / DDPM-{ddpm_steps} FID <= 1.15")
    assert metrics["targets"][0]["value"] == pytest.approx(metrics["comparison"]["fid_ddim_over_ddpm"])
    # a one-image picture from `difflab sample` is named and left out of the evaluation, not fatal to it
    assert main(["sample", str(run_dir), "--n", "1", "--steps", "2"]) == 0
    torch.save({"x": torch.zeros(3)}, run_dir / "samples" / "notes.pt")  # a user's own file: said, not scored
    capsys.readouterr()
    assert main(["evaluate", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "(calibration) real held-out" in printed and "(floor) real train vs" in printed
    assert "not scored: sample_ddim2_seed0.pt (1 image(s): a FID needs 2 or more)" in printed
    assert "not scored: notes.pt (not a difflab sample file: no 'images' tensor)" in printed
    # damaged sample files are named in one line (a string 'images' was an AttributeError traceback; labels out of
    # range scored an accuracy of 0 with exit status 0)
    damaged = run_dir / "samples" / "damaged.pt"
    images = torch.zeros(4, 1, 28, 28)
    for content, expected in [
        ({"images": "abc"}, "'images' must be a float tensor (N, C, H, W), got str"),
        ({"images": images, "labels": torch.full((4,), 42)}, "intended labels must lie in 0..9"),
        ({"images": images[:, :, :8]}, "images must have shape (N, 1, 28, 28), got (4, 1, 8, 28)"),
    ]:
        torch.save(content, damaged)
        assert main(["evaluate", str(run_dir)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(damaged) in err[0] and expected in err[0], err
    damaged.write_text("hello")
    assert main(["evaluate", str(run_dir)]) == 2
    assert f"cannot read {damaged} as a sample file" in capsys.readouterr().err
    damaged.unlink()
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    floor = evaluation["real_vs_real"]  # 10,000 real training digits vs the test digits: far below any sample set
    assert floor["n"] == 10_000 and floor["fid"] < rows["real held-out"]["fid"] and floor["inception_score"] > 9
    assert set(evaluation["samples"]) == {"ddim.pt", "ddpm.pt"}
    assert evaluation["samples"]["ddim.pt"]["fid"] == pytest.approx(metrics["ddim"]["fid"], rel=1e-6)
    # The reports, with FID/IS beside the calibration floors: the default one and the five-section write-up.
    assert_sources(run_dir, "report", {"": metrics}, min_values=80)
    assert "floor: real held-out" in (run_dir / "report.md").read_text()
    assert main(["report", str(run_dir), "--style", "ddpm-vs-ddim"]) == 0
    five = (run_dir / "report-ddpm-vs-ddim.md").read_text()
    assert len(five) <= 7500 and "quality (FID" in five and "real held-out (floor)" in five
    assert_traceable(run_dir, "report-ddpm-vs-ddim", {"": metrics}, min_numbers=120)
    # Samplers compared by FID at equal seeds (issue: quality per NFE on MNIST), and the exact likelihood in bits/dim.
    capsys.readouterr()
    # --full ddpm: DDPM's T-step row is the reference; DPM-Solver++ at T NFE would only double the sampling time
    compare = ["compare-samplers", str(run_dir), "--samplers", "ddpm,dpmpp-2m", "--nfe", "10", "--n", "100"]
    assert main([*compare, "--full", "ddpm"]) == 0
    results = json.loads((run_dir / "compare_samplers" / "results.json").read_text())
    noise_fid = rows["pure noise uniform[0,1]"]["fid"]
    assert results["references"]["fid"] == pytest.approx(rows["real held-out"]["fid"], rel=1e-6)  # same n, same rows
    scored = {(r["sampler"], r["nfe"]): r["fid"] for r in results["rows"]}
    assert set(scored) == {("ddpm", 10), ("ddpm", 100), ("dpmpp-2m", 10)}
    assert all(rows["real held-out"]["fid"] < fid < noise_fid for fid in scored.values())
    assert "FID" in (run_dir / "compare_samplers" / "table.md").read_text().upper()
    assert main(["likelihood", str(run_dir), "--n", "4", "--batch-size", "4", "--rtol", "1e-3", "--atol", "1e-3"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    model = json.loads((run_dir / "likelihood.json").read_text())["model"]
    assert model["divergence"].startswith("hutchinson") and model["dims"] == 784
    # A uniform density over the 256 levels scores 8 bits/dim; 160 steps of training already do far better.
    assert 0 < model["bits_per_dim"] < 6


def digit_folder(root: Path, per_class: int = 6) -> Path:
    """sklearn's 8 x 8 digits as PNG files, one subfolder per digit (an image folder like a user's)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(10):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for k, image in enumerate(digits.images[digits.target == label][:per_class]):
            Image.fromarray((image * 255 / 16).round().astype("uint8")).save(folder / f"{k}.png")
    return root


def calibrated_random_inception(images: torch.Tensor, path: Path) -> Path:
    """An InceptionV3 FID network with random weights whose BatchNorm statistics are those of ``images`` (so its
    features vary with the input, as trained weights' do), saved as a state dict like the real weights file."""
    from difflab.metrics.inception_fid import to_uint8_rgb
    from difflab.models.inception import InceptionV3FID

    torch.manual_seed(0)
    model = InceptionV3FID()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batch
            module.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(to_uint8_rgb(images))
    torch.save({k: v for k, v in model.state_dict().items() if "num_batches_tracked" not in k}, path)
    return path


def test_image_folder_runs_are_scored_with_inception_weights(tmp_path: Path, capsys) -> None:
    from difflab.data.images import load_image_folder
    from difflab.metrics.image_eval import ImageEvaluator

    folder = digit_folder(tmp_path / "digits", per_class=4)
    images = load_image_folder(folder, 16, echo=lambda _: None)
    weights = calibrated_random_inception(images.images[::3], tmp_path / "pt_inception-calibrated.pth")
    # The evaluator: FID against the held-out images, floors from training images, no digit accuracy.
    heldout = torch.arange(len(images)) % 4 == 0  # one image of each digit
    evaluator = ImageEvaluator.for_image_folder(
        images.subset(~heldout), images.subset(heldout), "digits", weights, echo=lambda _: None
    )
    rows = {row["name"]: row for row in evaluator.calibration(6)}
    assert set(rows) == {
        "real training images",
        "real + noise std 0.1",
        "real + noise std 0.3",
        "real blurred sigma 1px",
        "pure noise uniform[0,1]",
    }
    assert rows["real training images"]["fid"] < rows["real + noise std 0.3"]["fid"]
    assert rows["real + noise std 0.3"]["fid"] < rows["pure noise uniform[0,1]"]["fid"]
    assert all("accuracy" not in row and "class_histogram" not in row for row in rows.values())
    # mnist-cfg on the folder: scored with the Inception features; the digit-classifier targets do not apply.
    run_dir = tmp_path / "run"
    common = [
        "run",
        "mnist-cfg",
        f"run_dir={run_dir}",
        *[o for o in TINY_DIGITS if not o.startswith("data.")],
        "data.source=imagefolder",
        f"data.path={folder}",
        "data.size=16",
        "unet.base_channels=8",
        "train.steps=8",
        "guidance.steps=10",
        "metrics.n_samples=4",
        "guidance.n_sweep=4",
        "guidance.sweep=[0,2]",
        "guidance.grid_per_digit=1",
    ]
    assert main([*common, f"metrics.inception_weights={weights}"]) == 0
    printed = capsys.readouterr().out
    assert "w=2 FID " in printed and "accuracy" not in printed.split("done in")[1]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["main"]["fid"] > 0 and "accuracy" not in metrics["main"]
    assert metrics["main"]["reference"] == {"name": f"{folder} (held-out split)", "n": 4}
    assert metrics["evaluator"]["floor"] == "real training images" and metrics["targets"] == []
    assert [row["name"] for row in metrics["calibration"]["4"]][0] == "real training images"
    report = (run_dir / "report.md").read_text()
    assert "InceptionV3's 2048-d pool features" in report and "accuracy of the intended digit" not in report
    assert "a class embedding of 10 classes and a learned null label" in report
    names = [str(k) for k in range(10)]
    assert json.loads((run_dir / "classes.json").read_text()) == {"class_names": names}  # what `sample` resolves
    assert main(["evaluate", str(run_dir)]) == 0
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["samples"]["cfg_w2.pt"]["fid"] == pytest.approx(metrics["main"]["fid"], rel=1e-6)
    assert evaluation["real_vs_real"]["n"] == 36
    # Without the weights there is no feature extractor for the folder, and the run says so.
    capsys.readouterr()
    assert main([*common, f"run_dir={tmp_path / 'unscored'}", "train.steps=1", "guidance.sweep=[2]"]) == 0
    assert "w=2 not scored" in capsys.readouterr().out
    assert "set metrics.inception_weights=PATH" in (tmp_path / "unscored" / "report.md").read_text()
    assert main(["evaluate", str(tmp_path / "unscored")]) == 2
    assert "set metrics.inception_weights=PATH" in capsys.readouterr().err


def test_a_class_is_named_by_index_or_by_its_folder(tmp_path: Path) -> None:
    from PIL import Image

    from difflab.errors import ConfigError, DataError
    from difflab.experiments.images import ImageDataConfig
    from difflab.experiments.mnist import class_index

    for name in ("dog", "cat", "emu"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / name / "a.png")
    folder = ImageDataConfig(source="imagefolder", path=str(tmp_path), size=8)
    assert [class_index(folder, label, 3) for label in ("cat", "dog", "emu", "2", 0)] == [0, 1, 2, 2, 0]
    with pytest.raises(ConfigError, match="no class 'owl'; its classes: cat, dog, emu"):
        class_index(folder, "owl", 3)
    with pytest.raises(ConfigError, match=r"an index 0 .. 2, got '3'"):
        class_index(folder, "3", 3)
    with pytest.raises(ConfigError, match="class index 0 .. 9 for mnist data"):
        class_index(ImageDataConfig(), "seven", 10)
    # A run resolves names against the classes it trained on, not the folder's listing now.
    run = tmp_path / "run"
    run.mkdir()
    (run / "classes.json").write_text('{"class_names": ["cat", "dog", "emu"]}')
    (tmp_path / "ant").mkdir()  # a class folder added after training sorts first
    Image.new("L", (8, 8)).save(tmp_path / "ant" / "a.png")
    assert class_index(folder, "cat", 3) == 1  # the folder's listing moved
    assert [class_index(folder, label, 3, run) for label in ("cat", "dog", "emu")] == [0, 1, 2]
    with pytest.raises(ConfigError, match="no class 'ant'; its classes: cat, dog, emu"):
        class_index(folder, "ant", 3, run)
    # A name wins over an index: folders 1, 10, 2 are labels 0, 1, 2.
    (run / "classes.json").write_text('{"class_names": ["1", "10", "2"]}')
    assert [class_index(folder, label, 3, run) for label in ("1", "10", "2", 1)] == [0, 1, 2, 0]
    (run / "classes.json").write_text("{broken")
    with pytest.raises(DataError, match="classes.json is damaged"):
        class_index(folder, "1", 3, run)
