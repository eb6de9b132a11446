"""The MNIST recipes' reports, trajectories and the five-section "DDPM vs DDIM" write-up, on tiny runs of the
8 x 8 digits: a mnist-ddpm run, its ablation without t (beside it), and a 2-D run for the forward panels."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.errors import ConfigError
from difflab.experiments import report_run
from difflab.models.unet import UNet, UNetConfig, count_parameters
from difflab.sampling.trajectory import Trajectory
from difflab.viz.trajectory import render_frame
from reportcheck import assert_self_contained, assert_sources, assert_traceable

TINY_DDPM = [
    "data.source=digits",
    "progress=false",
    "train.batch_size=64",
    "train.eval_every=50",
    "train.log_every=10",
    "train.lr=2e-3",
    "train.warmup_steps=10",
    "train.steps=100",
    "unet.base_channels=16",
    "schedule.num_timesteps=100",
    "metrics.batch_size=100",
    "metrics.ddim_steps=10",
    "metrics.n_samples=50",
    "metrics.n_ddpm=8",
]
TINY_SWISSROLL = [
    "progress=false",
    "data.n_train=600",
    "data.n_heldout=300",
    "denoiser_train.steps=80",
    "denoiser_train.batch_size=256",
    "denoiser_train.warmup_steps=10",
    "denoiser_train.eval_every=40",
    "denoiser_train.log_every=20",
    "sampling.n=300",
    "figures.trajectory_frames=0",
]
FIVE_SECTIONS = [
    "1 Executive summary",
    "2 Forward process dynamics",
    "3 Architecture and time conditioning",
    "4 The training objective",
    "5 Sampling and inference",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``main`` and its ablation ``main-no-t`` side by side; a swiss roll elsewhere."""
    root = tmp_path_factory.mktemp("mnist-reports")
    paths = {"main": root / "pair" / "main", "ablation": root / "pair" / "main-no-t", "roll": root / "roll"}
    assert main(["run", "mnist-ddpm", f"run_dir={paths['main']}", *TINY_DDPM]) == 0
    assert main(["run", "mnist-ddpm", f"run_dir={paths['ablation']}", *TINY_DDPM, "unet.time_conditioning=none"]) == 0
    assert main(["run", "swissroll", f"run_dir={paths['roll']}", *TINY_SWISSROLL]) == 0
    return paths


def metrics_of(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


# ---------------------------------------------------------------- the ablation switch


def test_unet_without_time_ignores_t_and_keeps_the_class_path() -> None:
    torch.manual_seed(0)
    x, early, late = torch.randn(3, 1, 12, 12), torch.full((3,), 5), torch.full((3,), 900)
    timed = UNet(UNetConfig(base_channels=16, time_conditioning="add")).eval()
    blind = UNet(UNetConfig(base_channels=16, time_conditioning="none")).eval()
    for module in (timed, blind):  # the zero-initialised output convs would hide every difference
        torch.nn.init.normal_(module.out_conv.weight, std=0.1)
        for block in module.modules():
            if hasattr(block, "conv2"):
                torch.nn.init.normal_(block.conv2.weight, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(timed(x, early), timed(x, late))
        torch.testing.assert_close(blind(x, early), blind(x, late), rtol=0, atol=0)
    assert blind.time_mlp is None and count_parameters(blind) < count_parameters(timed)
    assert not any("emb" in name for name, _ in blind.named_parameters())

    conditional = UNet(UNetConfig(base_channels=16, time_conditioning="none", num_classes=10)).eval()
    torch.nn.init.normal_(conditional.out_conv.weight, std=0.1)
    for block in conditional.modules():
        if hasattr(block, "conv2"):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    with torch.no_grad():
        three, seven = conditional(x, early, torch.full((3,), 3)), conditional(x, early, torch.full((3,), 7))
        assert not torch.allclose(three, seven)  # the label still steers it
        torch.testing.assert_close(three, conditional(x, late, torch.full((3,), 3)), rtol=0, atol=0)
        assert conditional(x, early).shape == x.shape  # no label: the null label


def test_the_ablation_trains_and_is_compared(runs: dict[str, Path]) -> None:
    config = (runs["ablation"] / "config.yaml").read_text()
    assert "time_conditioning: none" in config
    records = [json.loads(line) for line in (runs["ablation"] / "metrics.jsonl").read_text().splitlines()]
    loss = [r["value"] for r in records if r["tag"] == "denoiser/train_loss"]
    assert loss[-1] < 0.5 * loss[0]  # it learns without t
    ablation, main_metrics = metrics_of(runs["ablation"]), metrics_of(runs["main"])
    assert "no time input" in ablation["model"]["description"]
    assert ablation["model"]["parameters"] < main_metrics["model"]["parameters"]


# ---------------------------------------------------------------- measurements of the recipe


def test_ddim_is_deterministic_and_ddpm_is_not(runs: dict[str, Path]) -> None:
    determinism = metrics_of(runs["main"])["determinism"]
    assert determinism["n"] == 8 and determinism["ddim_steps"] == 10 and determinism["ddpm_steps"] == 100
    assert determinism["ddim"] == {"identical": True, "max_abs_diff": 0.0, "mean_abs_diff": 0.0}
    assert not determinism["ddpm"]["identical"] and determinism["ddpm"]["mean_abs_diff"] > 0.01
    assert determinism["different_x_T"]["mean_abs_diff"] > 0.05


def test_forward_statistics_and_the_eps_x0_identity(runs: dict[str, Path]) -> None:
    metrics = metrics_of(runs["main"])
    rows = metrics["forward"]["rows"]
    assert [r["t"] for r in rows] == [0, 10, 25, 50, 75, 90, 99]
    for row in rows:  # the closed form q(x_t | x_0) predicts the measured spread
        assert row["x_t_std"] == pytest.approx(row["closed_form_std"], abs=0.02)
    assert rows[0]["correlation_with_x0"] > 0.99 and abs(rows[-1]["correlation_with_x0"]) < 0.05
    for row in metrics["objective"]["rows"]:
        assert row["x0_mse"] == pytest.approx(row["eps_mse_over_snr"], rel=1e-3)
        assert row["elbo_weight"] > 0
    assert metrics["objective"]["rows"][0]["elbo_weight"] == pytest.approx(0.5, abs=0.01)  # 1 / (2 alpha_0)
    # learning: at t = 50 the trained eps-model (0.16, measured 2026-12-06) beats predicting zero (MSE 1) and
    # eps = sqrt(1 - a) x_t, which ignores the data (0.41); the exact eps of a Gaussian fit to the digits scores
    # 0.14, which 100 steps do not reach (test_unet's longer training beats it)
    assert metrics["objective"]["rows"][3]["eps_mse"] < 0.25


def test_ddpm_run_keeps_an_image_trajectory_for_the_browser(runs: dict[str, Path]) -> None:
    trajectory = Trajectory.load(runs["main"] / "samples" / "trajectory.safetensors")
    assert trajectory.kind == "images" and trajectory.x_t.shape == (10, 8, 1, 8, 8)
    assert trajectory.timesteps.tolist() == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert trajectory.metadata["sampler"] == "ddim"
    first, last = render_frame(trajectory, 0), render_frame(trajectory, 9)
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first != last

    from difflab.report.serve import RunBrowser

    browser = RunBrowser(runs["main"].parent)
    view = browser.view("main")
    page = browser.run_page(view).decode()
    assert "Denoising trajectory" in page and 'max="9"' in page
    assert browser.frame_png(view, 9) == last


# ---------------------------------------------------------------- reports


def test_ddpm_default_report_is_self_contained_and_traced(runs: dict[str, Path]) -> None:
    run = runs["main"]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    parsed = assert_self_contained(run, "report", min_images=3)  # two grids and the loss
    assert_sources(run, "report", {"": metrics_of(run)}, min_values=60)
    md = (run / "report.md").read_text()
    for title in ("Sample grids", "Quality and speed", "Deterministic or stochastic", "Forward process and objective"):
        assert f"## {title}\n" in md
    assert "No FID or IS" in md and "samples/trajectory.safetensors" in md
    assert any(tag == "details" for tag, _ in parsed.tags)


def test_five_section_report_is_traceable_and_short(runs: dict[str, Path], capsys) -> None:
    run = runs["main"]
    assert main(["report", str(run), "--style", "ddpm-vs-ddim", "--forward", str(runs["roll"])]) == 0
    assert "report-ddpm-vs-ddim.html" in capsys.readouterr().out
    md = (run / "report-ddpm-vs-ddim.md").read_text()
    assert len(md) <= 7500, len(md)
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == FIVE_SECTIONS
    assert "![" not in md  # data tables, no images
    assert f"ablation without t `{runs['ablation']}`" in md  # found beside the main run
    assert str(runs["roll"] / "figures" / "forward_process.png") in md
    assert "Without t the validation loss is" in md and "DDIM-10 reproduced every image exactly" in md
    metrics = {"": metrics_of(run), "ablation": metrics_of(runs["ablation"]), "forward": metrics_of(runs["roll"])}
    assert_traceable(run, "report-ddpm-vs-ddim", metrics, min_numbers=120)
    html = (run / "report-ddpm-vs-ddim.html").read_text()
    assert 'data-source="ablation:training.validation.loss"' in html
    assert_self_contained(run, "report-ddpm-vs-ddim")
    assert (run / "report.md").is_file()  # the default report stays
    from difflab.report.serve import RunBrowser

    page = RunBrowser(run.parent).run_page(RunBrowser(run.parent).view("main")).decode()
    assert "report-ddpm-vs-ddim.html" in page  # the run browser links the other report styles

    # The same report when the ablation is named; without a forward run it describes the MNIST statistics.
    assert main(["report", str(run), "--style", "ddpm-vs-ddim", "--with", str(runs["ablation"])]) == 0
    alone = (run / "report-ddpm-vs-ddim.md").read_text()
    assert "No point-cloud run with forward panels was given" in alone and len(alone) <= 7500
    assert_traceable(run, "report-ddpm-vs-ddim", metrics, min_numbers=120)


def test_five_section_report_without_companions(runs: dict[str, Path], tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    shutil.copytree(runs["main"], lone)
    assert main(["report", str(lone), "--style", "ddpm-vs-ddim"]) == 0
    md = (lone / "report-ddpm-vs-ddim.md").read_text()
    assert "No ablation run was given" in md and "unet.time_conditioning=none" in md
    assert_traceable(lone, "report-ddpm-vs-ddim", {"": metrics_of(lone)}, min_numbers=80)
    # A damaged ablation beside it, which the user did not name, is left out and said to be, not fatal.
    broken = Path(shutil.copytree(runs["ablation"], tmp_path / "broken"))
    (broken / "metrics.json").write_text("{")
    assert main(["report", str(lone), "--style", "ddpm-vs-ddim"]) == 0
    md = (lone / "report-ddpm-vs-ddim.md").read_text()
    assert f"Left out, as they could not be read: `{broken}`" in md and "No ablation run was given" in md
    shutil.rmtree(broken)

    # A run made before the measurements existed still gets the write-up, saying what it lacks.
    metrics = metrics_of(lone)
    for key in ("determinism", "forward", "objective", "comparison", "data"):
        del metrics[key]
    (lone / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(lone), "--style", "ddpm-vs-ddim"]) == 0
    old = (lone / "report-ddpm-vs-ddim.md").read_text()
    prose_lines = [re.sub(r"`[^`]*`", "", line) for line in old.splitlines() if not line.startswith("|")]
    assert old.count("This run predates") == 3 and not [line for line in prose_lines if " - " in line]
    assert_traceable(lone, "report-ddpm-vs-ddim", {"": metrics}, min_numbers=20)


def test_report_companions_are_checked(runs: dict[str, Path], capsys) -> None:
    def refuse(*args: str) -> str:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("difflab: error: "), err
        return err

    main_run, roll = str(runs["main"]), str(runs["roll"])
    assert "needs a mnist-ddpm run trained without t" in refuse(main_run, "--style", "ddpm-vs-ddim", "--with", roll)
    assert "not an ablation without t" in refuse(main_run, "--style", "ddpm-vs-ddim", "--with", main_run)
    assert "--forward needs a swissroll" in refuse(main_run, "--style", "ddpm-vs-ddim", "--forward", main_run)
    assert "takes no --forward run" in refuse(main_run, "--forward", roll)
    assert "takes no --with run" in refuse(roll, "--with", main_run)
    with pytest.raises(ConfigError, match="no report style 'ddpm-vs-ddim'"):
        report_run(roll, "ddpm-vs-ddim")
