"""`difflab sample`, `compare-samplers` and `likelihood` on a tiny two-moons run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from baselines import gaussian_samples
from difflab.cli import main
from difflab.experiments.samplers import heldout_likelihood, load_target
from difflab.sampling.likelihood import batched_likelihood
from reportcheck import assert_sources

TINY_MOONS = [
    "progress=false",
    "denoiser.time_encoding=centered",  # learns in 500 steps where the walkthrough's raw t needs thousands
    "denoiser_train.steps=500",
    "denoiser_train.eval_every=250",
    "denoiser_train.checkpoint_every=500",
    "data.n_train=2000",
    "data.n_heldout=1000",
    "sampling.n=300",
]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("runs") / "moons"
    assert main(["run", "moons", f"run_dir={run_dir}", *TINY_MOONS]) == 0
    torch.set_num_threads(threads)
    return run_dir


# Both KDE scores (nats) of samples that learned the moons stay below this. Measured 2026-12-06 on 400 points:
# real held-out moons 2.04 / 2.26 (nll_course / nll_reverse), this tiny run's samplers 2.48-2.71 / 2.46-2.56.
# What learned no moons fails one of the two: samples of a Gaussian fitted to the data 3.42 / 2.78, of
# N(0, 0.5^2 I) 2.74 / 4.56 and N(0, 0.7^2 I) 2.94 / 3.07, one data point repeated 2.44 / 8e4.
MOONS_BAR = 2.75


def on_the_moons(run: Path, samples: torch.Tensor) -> bool:
    """Whether ``samples`` (N, 2) score below :data:`MOONS_BAR` on both ``nll_course`` and ``nll_reverse``."""
    metrics = load_target(run, "cpu").metrics
    return metrics["nll_course"](samples) < MOONS_BAR and metrics["nll_reverse"](samples) < MOONS_BAR


def test_the_moons_bar_refuses_what_learned_no_moons(moons_run: Path) -> None:
    heldout = load_target(moons_run, "cpu").heldout
    assert on_the_moons(
        moons_run, heldout[torch.randperm(len(heldout), generator=torch.Generator().manual_seed(0))[:400]]
    )
    blob = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    for baseline in (gaussian_samples(heldout, 400), 0.5 * blob, 0.7 * blob, heldout[:1].repeat(400, 1) + 0.01 * blob):
        assert not on_the_moons(moons_run, baseline)


def test_sample_command_writes_samples_and_scores(moons_run: Path, capsys) -> None:
    assert main(["sample", str(moons_run), "--sampler", "dpmpp-2m", "--steps", "10", "--n", "400"]) == 0
    printed = capsys.readouterr().out
    assert "10 NFE" in printed and "nll_course" in printed and "nll_reverse" in printed
    samples = torch.load(moons_run / "samples" / "dpmpp-2m-10steps-seed0.pt", weights_only=True)
    assert samples.shape == (400, 2)
    assert (moons_run / "samples" / "dpmpp-2m-10steps-seed0.png").is_file()
    assert on_the_moons(moons_run, samples)
    out = moons_run / "elsewhere" / "heun.pt"
    assert main(["sample", str(moons_run), "--sampler", "heun", "--steps", "8", "--n", "50", "--out", str(out)]) == 0
    assert torch.load(out, weights_only=True).shape == (50, 2) and out.with_suffix(".png").is_file()
    # DDIM with eta 1 (ancestral) draws other samples, still on the moons, under its own name
    assert main(["sample", str(moons_run), "--sampler", "ddim", "--eta", "1", "--steps", "10", "--n", "400"]) == 0
    stochastic = torch.load(moons_run / "samples" / "ddim-eta1-10steps-seed0.pt", weights_only=True)
    assert main(["sample", str(moons_run), "--sampler", "ddim", "--steps", "10", "--n", "400"]) == 0
    deterministic = torch.load(moons_run / "samples" / "ddim-10steps-seed0.pt", weights_only=True)
    assert not torch.allclose(stochastic, deterministic)
    assert on_the_moons(moons_run, stochastic) and on_the_moons(moons_run, deterministic)
    # --option reaches the sampler's function and the file name; --eta scales an SDE sampler's noise
    command = ["sample", str(moons_run), "--sampler", "dpmpp-3m-sde", "--steps", "10", "--n", "400"]
    assert main([*command, "--eta", "0.5", "--option", "spacing=logsnr"]) == 0
    tuned = torch.load(moons_run / "samples" / "dpmpp-3m-sde-eta0.5-spacinglogsnr-10steps-seed0.pt", weights_only=True)
    assert main(command) == 0
    default = torch.load(moons_run / "samples" / "dpmpp-3m-sde-10steps-seed0.pt", weights_only=True)
    assert not torch.allclose(tuned, default)
    assert on_the_moons(moons_run, tuned)
    assert main(["sample", str(moons_run), "--guidance", "3", "--n", "4"]) == 2  # 2-D sampling takes no guidance
    assert "--digit and --guidance steer class-conditional image runs" in capsys.readouterr().err


def test_compare_samplers_writes_table_json_and_plot(moons_run: Path, capsys) -> None:
    argv = [
        "compare-samplers",
        str(moons_run),
        "--samplers",
        "ddpm,dpmpp-2m,heun",
        "--nfe",
        "5",
        "20",
        "--n",
        "300",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    out = moons_run / "compare_samplers"
    for name in ("table.md", "results.json", "quality_vs_nfe.png"):
        assert (out / name).is_file()
    results = json.loads((out / "results.json").read_text())
    rows = {(row["sampler"], row["budget"]): row for row in results["rows"]}
    # budgets 5, 20 and T = 100; Heun spends 2 N - 1 evaluations, so 5 -> 3 steps, 20 -> 10 steps (19 NFE)
    assert rows[("heun", 20)]["steps"] == 10 and rows[("heun", 20)]["nfe"] == 19
    assert rows[("ddpm", 100)]["nfe"] == 100 and rows[("dpmpp-2m", 5)]["nfe"] == 5
    assert "| dpmpp-2m |" in printed and "NFE 100 (=T)" in (out / "table.md").read_text()
    for key in (("ddpm", 100), ("dpmpp-2m", 20), ("heun", 100)):
        assert rows[key]["nll_course"] < MOONS_BAR and rows[key]["nll_reverse"] < MOONS_BAR, key
    # two solvers of the same probability-flow ODE from the same noise agree once converged
    for metric in ("nll_course", "nll_reverse"):
        assert abs(rows[("dpmpp-2m", 20)][metric] - rows[("heun", 100)][metric]) < 0.05
    # --no-full leaves out the T budget; the same seed gives the same samples, so the same scores
    assert (
        main(["compare-samplers", str(moons_run), "--samplers", "dpmpp-2m", "--nfe", "5", "--n", "300", "--no-full"])
        == 0
    )
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["sampler"], row["budget"]) for row in again] == [("dpmpp-2m", 5)]
    assert again[0]["nll_course"] == rows[("dpmpp-2m", 5)]["nll_course"]
    # the report shows the latest comparison, every number traced to its results.json
    report = (moons_run / "report.md").read_text()
    assert (
        "## Sampler comparison (difflab compare-samplers)" in report and "compare_samplers/quality_vs_nfe.png" in report
    )
    assert f"| `dpmpp-2m` | 5 | 5 | {again[0]['nll_course']:.3f} |" in report
    assert_sources(moons_run, "report", {"": json.loads((moons_run / "metrics.json").read_text())}, min_values=5)
    # the first comparison is kept, whole, under earlier/<time>/, not overwritten
    kept = [folder for folder in (out / "earlier").iterdir() if (folder / "results.json").is_file()]
    first = [json.loads((folder / "results.json").read_text())["rows"] for folder in kept]
    assert results["rows"] in first and "the earlier comparison is kept in" in capsys.readouterr().out
    assert all((folder / "table.md").is_file() and (folder / "quality_vs_nfe.png").is_file() for folder in kept)
    # --full ddpm: the T-step budget for DDPM only, the fast sampler at its own budgets
    argv = ["compare-samplers", str(moons_run), "--samplers", "ddpm,dpmpp-2m", "--nfe", "5", "--n", "300"]
    assert main([*argv, "--full", "ddpm"]) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["sampler"], row["budget"]) for row in again] == [("ddpm", 5), ("ddpm", 100), ("dpmpp-2m", 5)]
    assert again[1]["nll_course"] == rows[("ddpm", 100)]["nll_course"]


def test_likelihood_command_scores_heldout_points_above_noise(moons_run: Path, capsys) -> None:
    assert main(["likelihood", str(moons_run), "--n", "100"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((moons_run / "likelihood.json").read_text())
    assert record["model"]["n"] == 100 and record["model"]["divergence"] == "exact"
    assert f"{record['model']['nll_nats']:.3f}" in printed and "KDE" in printed
    assert record["kde"]["heldout_under_training_kde"] is not None
    # the run's report gains the measurement, every number traced to likelihood.json
    report = (moons_run / "report.md").read_text()
    assert "## Exact likelihood (difflab likelihood)" in report and f"{record['model']['nll_nats']:.2f}" in report
    assert_sources(moons_run, "report", {"": json.loads((moons_run / "metrics.json").read_text())}, min_values=5)
    # the trained model gives held-out points a far higher density than points of the prior, and than the best
    # Gaussian does (the data's own mean and covariance: 2.72 nats; the model 2.41, a KDE of 2,000 points 2.04)
    target = load_target(moons_run, "cpu")
    noise = batched_likelihood(target.model, target.schedule, torch.randn(100, 2) * 1.5)
    assert record["model"]["nll_nats"] < float(noise.nll.mean()) - 0.5
    heldout = target.heldout.double()
    gaussian = torch.distributions.MultivariateNormal(heldout.mean(0), torch.cov(heldout.T))
    assert record["model"]["nll_nats"] < float(-gaussian.log_prob(heldout).mean()) - 0.15
    # the KDE scores beside it are of the same points: 100 here, 10 below, not the run's whole held-out set
    assert record["kde"] == pytest.approx(target.kde_scores(target.heldout[:100]), rel=1e-12)
    assert set(record["kde"]) == {"heldout_under_training_kde", "heldout_under_sample_kde"}
    ten = heldout_likelihood(target, n=10)
    assert ten["model"]["n"] == 10 and ten["kde"] == pytest.approx(target.kde_scores(target.heldout[:10]), rel=1e-12)
    assert ten["kde"]["heldout_under_training_kde"] != record["kde"]["heldout_under_training_kde"]


def test_sampling_commands_reject_bad_input(moons_run: Path, tmp_path: Path, capsys) -> None:
    assert main(["sample", str(moons_run), "--sampler", "dpm-9", "--steps", "5"]) == 2
    assert main(["sample", str(moons_run), "--sampler", "ddim", "--steps", "101"]) == 2
    assert main(["likelihood", str(tmp_path)]) == 2
    errors = capsys.readouterr().err
    assert "unknown sampler" in errors and "steps" in errors and "not a difflab run folder" in errors

    def refused(command: str, *arguments: str) -> str:
        """The one-line error of ``difflab COMMAND RUN ARGUMENTS...``, which must exit with status 2."""
        assert main([command, str(moons_run), *arguments]) == 2
        return capsys.readouterr().err

    assert "sampler dpmpp-2m takes no eta" in refused("sample", "--sampler", "dpmpp-2m", "--eta", "0.5")
    assert "eta" in refused("sample", "--sampler", "ddim", "--eta", "-1")
    assert "sampler dpmpp-2m takes no option 'churn'; its options: spacing" in refused(
        "sample", "--sampler", "dpmpp-2m", "--option", "churn=3"
    )
    assert "KEY=VALUE" in refused("sample", "--sampler", "dpmpp-2m", "--option", "spacing")
    assert "sampler heun takes no option 'spacing'" in refused(
        "compare-samplers", "--samplers", "ddim,heun", "--option", "spacing=karras"
    )
    assert "spacing must be one of" in refused("sample", "--sampler", "dpmpp-2m", "--option", "spacing=diagonal")
    # a value one compared sampler refuses is named with that sampler, before any sampling or writing
    results = moons_run / "compare_samplers" / "results.json"
    before = results.read_bytes() if results.exists() else None
    assert "sampler ddpm: spacing must be one of leading, trailing, linspace, got 'karras'" in refused(
        "compare-samplers", "--samplers", "dpmpp-2m,ddpm", "--option", "spacing=karras", "--n", "10", "--no-full"
    )
    assert (results.read_bytes() if results.exists() else None) == before
    assert "option eta takes a float, got 'lots'" in refused(
        "sample", "--sampler", "dpmpp-2m-sde", "--option", "eta=lots"
    )
    assert "option spacing takes a str" in refused("sample", "--sampler", "ddim", "--option", "spacing=3")
    # zero steps or budgets are refused, not taken as the default or left to fail inside matplotlib
    assert "--steps must be >= 1, got 0" in refused("sample", "--steps", "0")
    assert "--nfe budgets and --n must be >= 1" in refused("compare-samplers", "--nfe", "0")
    assert "--no-full gives it to none: pass one" in refused("compare-samplers", "--full", "ddpm", "--no-full")
    # a count whose output alone cannot be held is refused before any sampling, not after hours of it
    start = time.perf_counter()
    huge = refused("sample", "--n", str(10**13), "--sampler", "ddim", "--steps", "5")
    assert "10000000000000 samples of 2 values need at least 149011.6 GiB" in huge and huge.count("\n") == 1
    assert time.perf_counter() - start < 5 and not list((moons_run / "samples").glob("ddim-5steps-seed0*"))
