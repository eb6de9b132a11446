"""The NCSN recipes end to end on small data: artefacts, learning, the sweep, the comparison with a DDPM run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from baselines import gaussian_score
from difflab.cli import main
from difflab.config import config_from
from difflab.data.states import load_states
from difflab.experiments.images import load_image_data
from difflab.experiments.ncsn import MnistNCSNConfig, best_cell, read_comparison, targets
from difflab.experiments.ncsn_common import LangevinConfig, dsm_level_validation
from difflab.metrics.points import KDE
from reportcheck import assert_rebuilds


def logged(run_dir: Path, tag: str = "score/val_loss") -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["value"] for r in records if r["tag"] == tag]


STATES_TINY = [
    "progress=false", "model.hidden=[128,128,128]", "train.steps=1500", "train.batch_size=512",
    "train.eval_every=300", "train.log_every=50", "sampling.n=600", "langevin.steps_per_level=30", "langevin.c=0.2",
    "figures.grid=8",
]  # fmt: skip


def test_states_ncsn_learns_the_outlines(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "states"
    assert main(["run", "states-ncsn", f"run_dir={run_dir}", *STATES_TINY]) == 0
    for name in [
        "report.md",
        "metrics.json",
        "checkpoints/score.safetensors",
        "samples/samples.pt",
        "figures/samples.png",
        "figures/langevin_trajectory.png",
        "figures/score_field.png",
        "figures/score_field_exact.png",
        "figures/loss.png",
    ]:
        assert (run_dir / name).is_file(), name
    # s = 0 scores D / 2 = 1; the floor (the noise's variance given x~) is about 0.6 here
    losses, train_losses = logged(run_dir), logged(run_dir, "score/train_loss")
    assert losses[-1] < losses[0] and losses[-1] < 0.8 and train_losses[-1] < 0.85 * train_losses[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["sampling"]["network_evaluations_per_sample"] == 10 * 30 + 1
    # far better than the chains' start N(0, 3^2) and than a Gaussian fitted to the data
    start = 3.0 * torch.randn(600, 2, generator=torch.Generator().manual_seed(0))
    kde = KDE(load_states("train").data)
    assert metrics["samples"]["nll_course"] < kde.nll(start) - 2
    assert metrics["samples"]["nll_course"] < kde.nll(torch.randn(600, 2, generator=torch.Generator().manual_seed(1)))
    assert min(metrics["samples"]["class_share"].values()) > 0.05  # every outline reached
    # on the outlines and covering them, which no blob does (measured 2026-12-06, 600 points: this run 2.71 / 2.56
    # (nll_course / nll_reverse); real held-out points 2.18 / 2.40; N(0, 0.7^2 I) 2.89 / 3.03; a Gaussian fitted
    # to the data 3.66 / 2.84)
    assert metrics["samples"]["nll_course"] < 2.8 and metrics["samples"]["nll_reverse"] < 2.75
    assert metrics["targets"][0]["target"].startswith("STATES nll_course <= 2.3")
    assert "The learned score field" in (run_dir / "report.md").read_text()
    # the report has its self-contained HTML twin (every figure embedded, every table), and `difflab report`
    # rebuilds both from the folder alone
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5  # and tables: scores, targets, levels, time, environment
    assert page.count("<table") == 5
    assert "<h2>The learned score field</h2>" in page and "<h2>Configuration</h2>" in page
    assert_rebuilds(run_dir)
    # `difflab sample` on the run: the recipe's own seed and settings give back its samples exactly; another
    # seed gives other chains, on the outlines too.
    assert main(["sample", str(run_dir), "--n", "600", "--seed", "1234"]) == 0
    again = torch.load(run_dir / "samples" / "langevin-c0.2-T30-n600-seed1234.pt", weights_only=True)
    assert torch.equal(again, torch.load(run_dir / "samples" / "samples.pt", weights_only=True))
    out = run_dir / "more" / "fine.pt"
    command = ["sample", str(run_dir), "--n", "600", "--steps", "40", "--option", "c=0.1", "--out", str(out)]
    assert main(command) == 0
    assert "c = 0.1, 40 steps per level, 401 network evaluations per sample" in capsys.readouterr().out
    other = torch.load(out, weights_only=True)
    assert other.shape == (600, 2) and not torch.allclose(other, again) and out.with_suffix(".png").is_file()
    assert kde.nll(other) < kde.nll(start) - 2
    for bad, message in [
        (["--sampler", "ddim"], "samples by annealed Langevin dynamics"),
        (["--eta", "1"], "--eta does not apply"),
        (["--option", "c=0"], "c > 0"),
        (["--option", "spacing=karras"], "the one option c=C"),
    ]:
        assert main(["sample", str(run_dir), "--n", "4", *bad]) == 2
        assert message in capsys.readouterr().err
    # the other sampling commands say what they take, and where a score run's samples come from
    assert main(["compare-samplers", str(run_dir)]) == 2
    assert "difflab sample draws annealed Langevin samples of NCSN runs" in capsys.readouterr().err
    assert main(["invert", str(run_dir)]) == 2
    assert "difflab invert takes mnist-ddpm, mnist-cfg, mnist-ldm and rgb2ir runs" in capsys.readouterr().err


ROLL_TINY = [
    "progress=false", "model.hidden=[32,32]", "train.steps=50", "train.batch_size=256", "sampling.n=100",
    "langevin.steps_per_level=3", "figures.grid=5", "data.n_train=500", "data.n_heldout=500",
]  # fmt: skip


def test_swissroll_ncsn_runs_and_bad_figure_levels_are_refused(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "roll"
    assert main(["run", "swissroll-ncsn", f"run_dir={run_dir}", *ROLL_TINY]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["targets"] == [] and metrics["samples"]["n"] == 100
    assert main(["run", "swissroll-ncsn", f"run_dir={tmp_path / 'bad'}", "figures.score_levels=[0,12]"]) == 2
    assert "figures.score_levels [12] outside the noise levels 0..9" in capsys.readouterr().err


DIGITS_TINY = [
    "data.source=digits", "progress=false", "train.steps=400", "train.lr=2e-3", "train.eval_every=50",
    "train.log_every=10", "unet.base_channels=8", "sweep.c=[0.1,0.2]", "sweep.steps_per_level=[2,3]",
    "sweep.n_samples=8", "evaluation.n_samples=24", "evaluation.grid_size=16", "langevin.steps_per_level=4",
]  # fmt: skip


def test_mnist_ncsn_recipe_on_digits(tmp_path: Path) -> None:
    run_dir = tmp_path / "ncsn"
    assert main(["run", "mnist-ncsn", f"run_dir={run_dir}", *DIGITS_TINY, f"compare_to={tmp_path / 'none'}"]) == 0
    for name in [
        "report.md",
        "metrics.json",
        "checkpoints/score.safetensors",
        "samples/langevin.pt",
        "figures/samples_grid.png",
        "figures/langevin_trajectory.png",
        "figures/sweep_grids.png",
        "figures/loss.png",
    ]:
        assert (run_dir / name).is_file(), name
    losses = logged(run_dir)  # s = 0 scores D / 2 = 32
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < 0.8 * 32
    # It learned more than the digits' two moments: its validation DSM loss (the recipe's held-out images, levels and
    # noise) is below that of the exact score of a Gaussian with their mean and covariance (measured 2026-12-06:
    # 12.55 after 400 steps against 13.81; a per-pixel Gaussian 15.09; 200 steps reached only 16.6).
    config = config_from(MnistNCSNConfig(), None, ["data.source=digits"])
    train, heldout = load_image_data(config.data, config.seed)
    validate = dsm_level_validation(config.noise.sigmas(), heldout.images[:256], torch.device("cpu"), config.seed)
    assert losses[-1] < 0.95 * validate(gaussian_score(train.images))["loss"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [(r["c"], r["steps_per_level"]) for r in metrics["sweep"]] == [(0.1, 2), (0.1, 3), (0.2, 2), (0.2, 3)]
    # K = 20 levels by default: K T + 1 network calls per sample
    assert [r["network_evaluations_per_sample"] for r in metrics["sweep"]] == [41, 61, 41, 61]
    assert metrics["noise_levels"][0] == 10.0 and len(metrics["noise_levels"]) == 20
    # no evaluator for 8 x 8 digits: the final samples use the langevin config's (c, T)
    assert metrics["best"] == {"c": 0.2, "steps_per_level": 4, "chosen_by": "langevin config"}
    assert metrics["comparison"]["missing"] is True
    samples = torch.load(run_dir / "samples" / "langevin.pt", weights_only=True)["images"]
    assert samples.shape == (24, 1, 8, 8) and samples.abs().max() <= 1
    report = (run_dir / "report.md").read_text()
    assert "the comparison is missing" in report and "IS 1.99 and FID 139.9" in report
    assert_rebuilds(run_dir)
    # `difflab sample` on the run: the recipe's seed, count and settings give back its final samples
    assert main(["sample", str(run_dir), "--n", "24", "--seed", "4321"]) == 0  # evaluation.seed
    again = torch.load(run_dir / "samples" / "langevin-c0.2-T4-n24-seed4321.pt", weights_only=True)
    assert torch.equal(again["images"], samples)
    assert (run_dir / "samples" / "langevin-c0.2-T4-n24-seed4321.png").is_file()
    # a run whose sweep chose the cell (an evaluator on MNIST): sampling defaults to that cell, not the config's
    metrics["best"] = {"c": 0.1, "steps_per_level": 2, "chosen_by": "lowest sweep FID"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert main(["sample", str(run_dir), "--n", "2"]) == 0
    assert (run_dir / "samples" / "langevin-c0.1-T2-n2-seed0.pt").is_file()


class FakeEvaluator:
    def evaluate(self, images: torch.Tensor) -> dict:
        return {"n": len(images), "fid": float(images.mean()) + 10.0, "inception_score": 8.0}


def test_comparison_with_a_ddpm_run_and_the_targets(tmp_path: Path) -> None:
    folder = tmp_path / "ddpm"
    (folder / "samples").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"ddim": {"n": 2000, "fid": 10.0, "inception_score": 9.0}}))
    torch.save({"images": torch.zeros(50, 1, 8, 8)}, folder / "samples" / "ddim.pt")
    assert read_comparison(str(tmp_path / "missing")) is None
    reported = read_comparison(str(folder))
    assert reported == {"run": str(folder), "sampler": "DDIM", "n": 2000, "fid": 10.0, "inception_score": 9.0}
    scored = read_comparison(str(folder), FakeEvaluator(), 40)
    assert scored["equal_n"] == {"n": 40, "fid": 10.0, "inception_score": 8.0}
    assert "equal_n" not in read_comparison(str(folder), FakeEvaluator(), 60)  # too few samples to compare
    histogram = [0.1] * 10
    rows = targets({"fid": 19.0, "inception_score": 7.5, "class_histogram": histogram}, scored)
    assert [row["met"] for row in rows] == [True, True, True]
    assert rows[1]["value"] == pytest.approx(1.9) and rows[2]["value"] == pytest.approx(7.5 / 8 - 1)
    rows = targets({"fid": 25.0, "inception_score": 6.0, "class_histogram": [0.01] + [0.11] * 9}, reported)
    assert [row["met"] for row in rows] == [False, False, False]
    sweep = [
        {"c": 0.1, "steps_per_level": 75, "fid": 30.0, "inception_score": 8.0},
        {"c": 0.2, "steps_per_level": 150, "fid": 20.0, "inception_score": 8.0},
    ]
    assert best_cell(sweep, LangevinConfig())["c"] == 0.2
    assert best_cell([{"c": 0.1, "steps_per_level": 75, "n": 8}], LangevinConfig(c=0.05))["c"] == 0.05


def test_evaluate_scores_the_samples_of_an_mnist_ncsn_run(tmp_path: Path, capsys) -> None:
    """`difflab evaluate` reads any MNIST image run's sample files, not only mnist-ddpm / mnist-cfg ones."""
    from difflab.data.mnist import load_mnist
    from difflab.experiments.ncsn import MnistNCSNConfig
    from difflab.experiments.runs import RunFolder

    run_dir = tmp_path / "ncsn"
    RunFolder.open(run_dir, "mnist-ncsn", MnistNCSNConfig(run_dir=str(run_dir))).complete()
    digits = load_mnist("val").images[:200]
    torch.save({"images": digits}, run_dir / "samples" / "langevin.pt")
    noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.save({"images": noise}, run_dir / "samples" / "noise.pt")
    assert main(["evaluate", str(run_dir)]) == 0
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    scores = evaluation["samples"]
    assert scores["langevin.pt"]["n"] == 200 and scores["langevin.pt"]["fid"] < scores["noise.pt"]["fid"] / 5
    assert "(calibration) real held-out" in capsys.readouterr().out
    states = tmp_path / "states"
    RunFolder.open(states, "states", {"recipe": "states"}).complete()
    assert main(["evaluate", str(states)]) == 2
    assert "difflab evaluate scores mnist-ddpm, mnist-cfg, mnist-ncsn, mnist-ldm runs" in capsys.readouterr().err
