"""``mnist-ncsn``: a noise-conditional score network on MNIST (Song & Ermon 2019), trained by denoising score
matching and sampled by annealed Langevin dynamics.

The score network ``s_theta(x, sigma)`` is the project's U-Net with FiLM conditioning (every residual block
scales and shifts its normalised features by a projection of the sinusoidal embedding of
``time_scale * log sigma``). By default (``score_output: scaled``, NCSNv2) the U-Net predicts ``sigma s`` and the
model divides by sigma. K levels geometric from sigma_max to sigma_min = 0.01; the loss is DSM with
lambda(sigma) = sigma^2 and sigma drawn uniformly from the levels. Data are in [-1, 1], a range of 2, but two
MNIST images lie about 20 apart: the reference's sigma_max = 1 (10 levels; ``configs/mnist-ncsn.yaml``) never
connects the digit modes, so its chains start from uniform noise on [-1, 1] (NCSN's start). The CPU defaults
move toward NCSNv2's technique 1 instead: sigma_max = 10 over 20 levels, chains from N(0, sigma_max^2).

The run trains the network, sweeps the Langevin step constant c and the steps per level T (FID, IS and wall
time at each of the grid's cells, all from the same starting chains), draws the final samples at the best
cell, and writes the loss curve, the grids, the Langevin trajectory and the report; with
``compare_to`` pointing at a finished ``mnist-ddpm`` run it sets the numbers beside that run's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from difflab.diffusion.score_matching import NoiseLevelsConfig
from difflab.errors import ConfigError
from difflab.experiments import images as stages
from difflab.experiments import ncsn_common
from difflab.experiments.images import ImageDataConfig
from difflab.experiments.ncsn_common import LangevinConfig, LangevinSamples
from difflab.experiments.runs import RunFolder, setup_ranks, trained_only
from difflab.models.score import SCORE_OUTPUTS, NoiseConditionalUNet
from difflab.models.unet import UNetConfig, count_parameters, describe
from difflab.report import sections
from difflab.report.document import Report
from difflab.report.markdown import figure_lines, table
from difflab.report.rundata import RunContents
from difflab.sampling.langevin import network_evaluations
from difflab.seeding import mix_seed, seed_everything
from difflab.training import distributed
from difflab.training.logging import RunLogger
from difflab.training.precision import to_fast_layout
from difflab.training.trainer import TrainConfig
from difflab.viz.images import image_rows_figure, save_grid

# The reference score network's published figures on MNIST, measured with the reference's own evaluator
# (its own classifier features): context for the report, not numbers difflab's evaluator reproduces.
REFERENCE_FIGURES = {"inception_score": 1.99, "fid": 139.9}
FID_RATIO_MAX = 2.0
IS_TOLERANCE = 0.10
DIGIT_SHARE_MIN = 0.05
OUTPUT_WORDS = {
    "scaled": "the U-Net predicts sigma s, the model divides by sigma (NCSNv2)",
    "direct": "the U-Net predicts the score",
}
INIT_WORDS = {"uniform": "uniform noise on [-1, 1]", "gaussian": "N(0, sigma_max^2)"}


@dataclass(frozen=True)
class SweepConfig:
    """The (c, T) grid: every cell draws ``n_samples`` from the same starting chains and is scored by the
    evaluator (FID, IS) and timed. Empty lists skip the sweep."""

    c: tuple[float, ...] = (0.05, 0.1, 0.2)
    steps_per_level: tuple[int, ...] = (75, 100, 150)
    n_samples: int = 64
    seed: int = 8765
    grid_per_cell: int = 16

    def __post_init__(self) -> None:
        if any(c <= 0 for c in self.c) or any(t < 1 for t in self.steps_per_level):
            raise ConfigError("sweep.c must be > 0 and sweep.steps_per_level >= 1")
        if self.n_samples < 2:
            raise ConfigError("sweep.n_samples must be >= 2 (the evaluator needs two images)")
        if self.grid_per_cell < 1:
            raise ConfigError(f"sweep.grid_per_cell must be >= 1, got {self.grid_per_cell}")


@dataclass(frozen=True)
class NCSNEvaluationConfig:
    """The final samples: ``n_samples`` at the sweep's best cell (lowest FID) when ``use_sweep_best`` and the
    sweep was scored, else at ``langevin``'s (c, T); a ``grid_size`` grid of them and ``trajectory_chains``
    chains shown at every level."""

    n_samples: int = 2000
    use_sweep_best: bool = True
    seed: int = 4321
    grid_size: int = 100
    trajectory_chains: int = 12

    def __post_init__(self) -> None:
        if self.n_samples < 2 or self.grid_size < 1 or self.trajectory_chains < 1:
            raise ConfigError("evaluation needs n_samples >= 2, grid_size >= 1 and trajectory_chains >= 1")


@dataclass(frozen=True)
class MnistNCSNConfig:
    """``mnist-ncsn``: the CPU-sized defaults (``configs/mnist-ncsn-cpu.yaml``); ``configs/mnist-ncsn.yaml``
    holds the reference sizes (base width 64, 40 epochs, Adam lr 1e-4).

    CPU sizes: base width 16 (0.27 M parameters), 2,500 steps, K = 20 levels from sigma_max = 10 (toward NCSNv2's
    technique 1; the reference's sigma_max = 1 over 10 levels misses every MNIST figure, see the README), chains
    from N(0, sigma_max^2), the sweep c in {0.05, 0.1, 0.2} x T in {25, 35, 50} with 64 samples per cell, and
    2,000 final samples: 34.5 minutes measured alone on two cores (see the README).
    """

    AFTER_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("langevin", "sweep", "evaluation")  # not read by training

    recipe: str = "mnist-ncsn"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/mnist-ncsn-cpu"
    progress: bool = True
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    # Toward NCSNv2's technique 1 (sigma_max near the largest distance between two images; MNIST in [-1, 1]: about
    # 30, median 20); the reference has 1.0 over 10 levels. The ratio 10^(3/19) = 1.44 between levels is coarser
    # than technique 2's gamma = 1.08 for D = 784 (about 88 levels from 10 to 0.01), which the CPU budget does not hold
    noise: NoiseLevelsConfig = field(default_factory=lambda: NoiseLevelsConfig(sigma_max=10.0, num_levels=20))
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            base_channels=16,
            channel_mults=(1, 2, 2),
            num_res_blocks=1,
            time_conditioning="film",
            mid_attention=False,
            time_scale=200.0,
        )
    )
    score_output: str = "scaled"
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=2500,
            batch_size=128,
            lr=1e-3,
            warmup_steps=200,
            ema_decay=0.999,
            grad_clip=1.0,
            eval_every=500,
            log_every=50,
            checkpoint_every=500,
        )
    )
    langevin: LangevinConfig = field(default_factory=lambda: LangevinConfig(c=0.2, steps_per_level=50, init="gaussian"))
    # 20 levels x T: T in {25, 35, 50} is 500-1,000 Langevin steps per chain, the reference grid's 750-1,500 at 10
    # levels would not fit 2,000 final samples into the CPU budget
    sweep: SweepConfig = field(default_factory=lambda: SweepConfig(steps_per_level=(25, 35, 50)))
    evaluation: NCSNEvaluationConfig = field(default_factory=NCSNEvaluationConfig)
    compare_to: str = "runs/mnist-ddpm-cpu"

    def __post_init__(self) -> None:
        if self.recipe != "mnist-ncsn":
            raise ConfigError(f"this config is for the 'mnist-ncsn' recipe, got recipe={self.recipe!r}")
        if self.score_output not in SCORE_OUTPUTS:
            raise ConfigError(f"score_output must be one of {', '.join(SCORE_OUTPUTS)}, got {self.score_output!r}")


def build_score_unet(config: MnistNCSNConfig, channels: int, device: torch.device) -> NoiseConditionalUNet:
    """The score U-Net, in the weight layout that trains fastest at ``config.train.precision`` (fp32 on CPU:
    channels-last, about 1.3x faster here)."""
    if config.unet.in_channels != channels or config.unet.out_channels != channels:
        raise ConfigError(
            f"unet.in_channels/out_channels are {config.unet.in_channels}/{config.unet.out_channels} "
            f"but the images have {channels} channels"
        )
    model = NoiseConditionalUNet(config.unet, config.score_output).to(device)
    return to_fast_layout(model, device, config.train.precision)


def _evaluate(evaluator: Any, images: torch.Tensor) -> dict[str, Any]:
    if evaluator is None:
        return {"n": len(images)}
    return evaluator.evaluate(images)


def read_comparison(path: str, evaluator: Any = None, n: int | None = None) -> dict[str, Any] | None:
    """The main (DDIM) metrics of a finished ``mnist-ddpm`` run from its ``metrics.json``, or None when there is
    none. With an ``evaluator`` and the run's ``samples/ddim.pt`` holding at least ``n`` images, its first ``n``
    samples are also scored here (``equal_n``), so the FIDs compare at the same sample count."""
    if not path:
        return None
    folder = Path(path)
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    main = metrics.get("ddim") if isinstance(metrics, dict) else None
    if not isinstance(main, dict) or "fid" not in main:
        return None
    found: dict[str, Any] = {
        "run": str(path),
        "sampler": "DDIM",
        "n": main.get("n"),
        "fid": main["fid"],
        "inception_score": main.get("inception_score"),
    }
    samples = folder / "samples" / "ddim.pt"
    if evaluator is not None and n is not None and samples.is_file():
        try:
            images = torch.load(samples, map_location="cpu", weights_only=True)["images"]
        except Exception:  # a damaged or foreign file: keep the reported numbers only
            images = None
        if isinstance(images, torch.Tensor) and len(images) >= n:
            scored = evaluator.evaluate(images[:n])
            found["equal_n"] = {"n": n, "fid": scored["fid"], "inception_score": scored["inception_score"]}
    return found


def best_cell(sweep: list[dict[str, Any]], langevin: LangevinConfig) -> dict[str, Any]:
    """The sweep cell with the lowest FID; without FIDs (no evaluator) the config's (c, T)."""
    scored = [row for row in sweep if row.get("fid") is not None]
    if scored:
        return min(scored, key=lambda row: (row["fid"], -(row.get("inception_score") or 0)))
    return {"c": langevin.c, "steps_per_level": langevin.steps_per_level}


def targets(main: dict[str, Any], comparison: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's bars: every digit >= 5% of the samples; with a mnist-ddpm run to compare with, FID at most
    2x its FID and IS within 10% of its IS."""
    if "fid" not in main:
        return []
    histogram = main.get("class_histogram", [])
    rows = [
        {
            "target": "every digit present (>= 5% of samples each)",
            "value": min(histogram) if histogram else None,
            "met": bool(histogram) and min(histogram) >= DIGIT_SHARE_MIN,
        }
    ]
    if comparison is not None:
        other = comparison.get("equal_n", comparison)  # the same sample count when the run's samples were scored
        where = (
            f" (its samples at n = {other['n']})" if "equal_n" in comparison else f" (as reported, n = {other['n']})"
        )
        ratio = main["fid"] / other["fid"]
        rows.append(
            {
                "target": "FID <= 2x the mnist-ddpm run's" + where + ": ratio",
                "value": ratio,
                "met": ratio <= FID_RATIO_MAX,
            }
        )
        if other.get("inception_score"):
            gap = main["inception_score"] / other["inception_score"] - 1
            rows.append(
                {
                    "target": "IS within 10% of the mnist-ddpm run's" + where + ": relative gap",
                    "value": gap,
                    "met": abs(gap) <= IS_TOLERANCE,
                }
            )
    return rows


def run_mnist_ncsn(
    config: MnistNCSNConfig, fresh: bool = False, echo: Callable[[str], object] = print, train_only: bool = False
) -> RunFolder:
    """The NCSN recipe into ``config.run_dir`` (``train_only``: ``difflab train``, the score network alone)."""
    wall = time.perf_counter()
    device, echo = setup_ranks(config, echo)
    train, heldout = stages.load_image_data(config.data, config.seed)
    run = RunFolder.open(config.run_dir, "mnist-ncsn", config, fresh=fresh)
    with run.guard():
        seed_everything(config.seed)
        sigmas = config.noise.sigmas()
        logger = RunLogger(run.path)
        shape = tuple(train.images.shape[1:])
        echo(
            f"[mnist-ncsn] run folder {run.path} | {len(train):,} training images {shape} | "
            f"{describe(config.unet, train.size)} | {len(sigmas)} levels {float(sigmas[0]):g} .. "
            f"{float(sigmas[-1]):g} | device {device}"
        )
        with run.stage("evaluator"):
            evaluator = stages.evaluator_for(config.data, device, echo) if run.main and not train_only else None
        with run.stage("train"):
            torch.manual_seed(mix_seed(config.seed, 0, 92))
            model = build_score_unet(config, train.channels, device)
            signature = {
                "model": "NoiseConditionalUNet",
                "config": repr(config.unet),
                "output": config.score_output,
                "noise": repr(config.noise),
            }
            model, result = ncsn_common.train_score_model(
                run,
                logger,
                model,
                signature,
                train.images,
                heldout.images[:256],
                sigmas,
                config.train,
                config.seed,
                device,
                config.progress,
            )
        if train_only:
            logger.close()
            return trained_only(run, "mnist-ncsn", wall, echo)
        sweep_rows: list[dict[str, Any]] = []
        sweep_strips: list[tuple[str, torch.Tensor]] = []
        with run.stage("sweep"):
            for c in config.sweep.c:
                for steps in config.sweep.steps_per_level:
                    drawn = ncsn_common.sample_langevin(
                        model,
                        sigmas,
                        config.sweep.n_samples,
                        shape,
                        config.langevin,
                        config.sweep.seed,
                        device,
                        c=c,
                        steps_per_level=steps,
                    )
                    row = {"c": c, "steps_per_level": steps, **_evaluate(evaluator, drawn.samples.clamp(-1, 1))}
                    row.update(
                        seconds=round(drawn.seconds, 2),
                        seconds_per_1000=drawn.seconds / drawn.samples.shape[0] * 1000,
                        network_evaluations_per_sample=network_evaluations(len(sigmas), steps, config.langevin.denoise),
                    )
                    sweep_rows.append(row)
                    sweep_strips.append((f"c = {c:g}, T = {steps}", drawn.samples[: config.sweep.grid_per_cell]))
                    echo(
                        f"[mnist-ncsn] sweep c={c:g} T={steps}: FID {row.get('fid', float('nan')):.2f}, "
                        f"IS {row.get('inception_score', float('nan')):.2f}, {drawn.seconds:.0f} s"
                    )
        ev = config.evaluation
        chosen = (
            best_cell(sweep_rows, config.langevin)
            if ev.use_sweep_best
            else {"c": config.langevin.c, "steps_per_level": config.langevin.steps_per_level}
        )
        chosen = distributed.from_main(chosen)  # rank 0 alone scored the sweep
        with run.stage("sample"):
            final = ncsn_common.sample_langevin(
                model,
                sigmas,
                ev.n_samples,
                shape,
                config.langevin,
                ev.seed,
                device,
                c=chosen["c"],
                steps_per_level=chosen["steps_per_level"],
                record_levels=tuple(range(len(sigmas))),
                show_progress=config.progress,
            )
            images = final.samples.clamp(-1, 1)
            if run.main:
                sampled = stages.SampleResult(images, None, final.seconds, final.network_evaluations)
                stages.save_samples(run.sub("samples", "langevin.pt"), sampled)
        if not run.main:  # every rank drew its batches of each sample set; rank 0 alone scores and reports
            logger.close()
            return run
        metrics: dict[str, Any] = {}
        with run.stage("evaluate"):
            metrics["main"] = _evaluate(evaluator, images)
            metrics["main"].update(
                c=chosen["c"],
                steps_per_level=chosen["steps_per_level"],
                seconds=round(final.seconds, 1),
                seconds_per_1000=final.seconds / len(images) * 1000,
                network_evaluations_per_sample=network_evaluations(
                    len(sigmas), chosen["steps_per_level"], config.langevin.denoise
                ),
                denoise=config.langevin.denoise,
                init=config.langevin.init,
            )
            calibration_counts = sorted({ev.n_samples, config.sweep.n_samples} if sweep_rows else {ev.n_samples})
            metrics["calibration"] = (
                {str(n): evaluator.calibration(n) for n in calibration_counts if n > 1} if evaluator is not None else {}
            )
        with run.stage("figures"):
            _figures(run, logger, sigmas, images, final, sweep_strips, ev)
        logger.close()
        with run.stage("evaluate"):
            comparison = read_comparison(config.compare_to, evaluator, len(images))
        metrics["sweep"] = sweep_rows
        metrics["best"] = {
            "c": chosen["c"],
            "steps_per_level": chosen["steps_per_level"],
            "chosen_by": "lowest sweep FID"
            if ev.use_sweep_best and any("fid" in r for r in sweep_rows)
            else "langevin config",
        }
        metrics["comparison"] = comparison if comparison is not None else {"run": config.compare_to, "missing": True}
        metrics["reference_published"] = {**REFERENCE_FIGURES, "evaluator": "the reference's own (not difflab's)"}
        metrics["noise_levels"] = [round(float(s), 6) for s in sigmas]
        metrics["data_dimensions"] = int(torch.tensor(shape).prod())
        metrics["model"] = {"parameters": count_parameters(model), "description": describe(config.unet, train.size)}
        metrics["training"] = {
            "step": result.step,
            "seconds": round(result.seconds, 1),
            "final_train_loss": result.final_train_loss,
            "validation": result.final_validation,
            "images_per_second": result.images_per_second(config.train.batch_size),
        }
        metrics["timings_seconds"] = {k: round(v, 1) for k, v in run.timings.items()}
        metrics["timings_seconds"]["total"] = round(time.perf_counter() - wall, 1)
        metrics["targets"] = targets(metrics["main"], comparison)
        run.write_metrics(metrics)
        run.write_report(build_report)
        run.complete()
    main = metrics["main"]
    echo(
        f"[mnist-ncsn] done in {metrics['timings_seconds']['total']:.0f} s: c={chosen['c']:g} "
        f"T={chosen['steps_per_level']} FID {main.get('fid', float('nan')):.2f}, IS "
        f"{main.get('inception_score', float('nan')):.2f} | report {run.sub('report.md')}"
    )
    return run


def train_mnist_ncsn(config: MnistNCSNConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """``difflab train mnist-ncsn``: the score network's training and its exported weights alone."""
    return run_mnist_ncsn(config, fresh, echo, train_only=True)


def _figures(
    run: RunFolder,
    logger: RunLogger,
    sigmas: torch.Tensor,
    images: torch.Tensor,
    final: LangevinSamples,
    sweep_strips: list[tuple[str, torch.Tensor]],
    ev: NCSNEvaluationConfig,
) -> None:
    """The loss curve, the sample grid, the Langevin trajectory and (after a sweep) every cell's samples, under
    ``figures/``."""
    ncsn_common.dsm_loss_figure(run, logger, sigmas, "Denoising score matching loss (per image)")
    grid = images[: ev.grid_size]
    save_grid(grid, run.sub("figures", "samples_grid.png"), nrow=max(1, int(len(grid) ** 0.5)))
    rows = []
    for i, sigma, x in final.trajectory:
        label = f"level {i}: σ = {sigma:.3g}" if i < len(sigmas) else "denoised"
        rows.append((label, x[: ev.trajectory_chains].clamp(-1, 1)))
    image_rows_figure(
        rows,
        run.sub("figures", "langevin_trajectory.png"),
        f"Annealed Langevin dynamics (c = {final.settings['c']:g}, T = {final.settings['steps_per_level']}): "
        "the same chains after each level",
    )
    if sweep_strips:
        image_rows_figure(
            sweep_strips, run.sub("figures", "sweep_grids.png"), "Samples of every sweep cell (same starting chains)"
        )


def _sigma_max_words(sigma_max: float) -> str:
    """What sigma_max means for MNIST in [-1, 1], whose images lie about 20 apart (median; largest about 30)."""
    if sigma_max < 5:
        return (
            f"Data in [-1, 1]: sigma_max = {sigma_max:g} is small next to the distance between two images (median "
            "about 20), so the largest level does not connect the digit modes (the reference's choice)."
        )
    return (
        f"sigma_max = {sigma_max:g} is of the order of the distance between two images (median about 20, largest "
        "about 30; NCSNv2's technique 1 asks for the largest), so the largest level connects the digit modes."
    )


def build_report(contents: RunContents) -> Report:
    """The ``mnist-ncsn`` run's report, from its folder alone (``difflab report RUN`` rebuilds it)."""
    config = contents.typed_config(MnistNCSNConfig())
    metrics, folder, figures = contents.metrics, contents.path, contents.figure_file
    main, best, noise = metrics["main"], metrics["best"], config.noise
    comparison = metrics["comparison"]
    lines = [
        "# MNIST: a noise-conditional score network sampled by annealed Langevin dynamics",
        "",
        f"{metrics['model']['description']}; FiLM conditioning on the sinusoidal embedding of "
        f"{config.unet.time_scale:g} log sigma; output `{config.score_output}` "
        f"({OUTPUT_WORDS[config.score_output]}). "
        f"K = {noise.num_levels} levels geometric from sigma_max = {noise.sigma_max:g} to sigma_min = "
        f"{noise.sigma_min:g}; denoising score matching with lambda(sigma) = sigma^2, levels drawn uniformly. "
        f"AdamW lr {config.train.lr} ({config.train.lr_schedule}, weight decay {config.train.weight_decay}), batch "
        f"{config.train.batch_size}, clip {config.train.grad_clip}, EMA {config.train.ema_decay or 'off'}; "
        f"{metrics['training']['step']:,} steps in {metrics['training']['seconds']:.0f} s "
        f"({metrics['training']['images_per_second']} images/s). {_sigma_max_words(noise.sigma_max)}",
        "",
        "Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): at level i, T steps of "
        "`x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z` with `alpha_i = c sigma_i^2` (the paper's "
        "`epsilon sigma_i^2 / sigma_L^2` with `epsilon = c sigma_L^2`; NCSN's epsilon = 2e-5 at sigma_L = 0.01 is "
        f"c = 0.2); chains start from {INIT_WORDS[config.langevin.init]}; "
        f"the final denoising step `x + sigma_L^2 s(x, sigma_L)` (Tweedie) is "
        f"{'on' if config.langevin.denoise else 'off'}.",
        "",
    ]
    if metrics["sweep"]:
        sweep_n = metrics["sweep"][0]["n"]
        lines += [
            "## Sweep of the step constant c and the steps per level T",
            "",
            f"{sweep_n:,} samples per cell, the same starting chains in every cell; FID and IS by the project's "
            f"MNIST evaluator (FID at n = {sweep_n:,} is biased upwards: compare cells with each other and with the "
            f"calibration rows at the same n). Best cell ({best['chosen_by']}): **c = {best['c']:g}, T = "
            f"{best['steps_per_level']}**.",
            "",
            table(
                ["c", "T", "network evaluations / sample", "FID", "IS", "wall time (s)", "s per 1,000 samples"],
                [
                    [
                        r["c"],
                        r["steps_per_level"],
                        r["network_evaluations_per_sample"],
                        r.get("fid"),
                        r.get("inception_score"),
                        r["seconds"],
                        r["seconds_per_1000"],
                    ]
                    for r in metrics["sweep"]
                ],
                digits=2,
            ),
            "",
        ]
        lines += figure_lines(figures("sweep_grids.png"), folder, "Samples of every cell")
    lines += [
        f"## Samples at c = {best['c']:g}, T = {best['steps_per_level']} ({best['chosen_by']})",
        "",
        *figure_lines(
            figures("samples_grid.png"), folder, f"The first {min(config.evaluation.grid_size, main['n'])} samples"
        ),
        table(
            ["n", "FID", "IS", "network evaluations / sample", "wall time (s)"],
            [
                [
                    main["n"],
                    main.get("fid"),
                    main.get("inception_score"),
                    main["network_evaluations_per_sample"],
                    main["seconds"],
                ]
            ],
        ),
        "",
    ]
    if main.get("class_histogram"):
        lines += [
            "Class histogram (share classified as each digit): "
            + ", ".join(f"{k}: {v:.1%}" for k, v in enumerate(main["class_histogram"]))
            + ".",
            "",
        ]
    lines += ["## Compared with the project's DDPM run", ""]
    if comparison.get("missing"):
        lines += [
            f"No finished mnist-ddpm run at `{comparison['run']}` (no metrics.json with a DDIM FID): the "
            "comparison is missing. Set `compare_to=RUN_DIR` to a finished `difflab run mnist-ddpm` folder.",
            "",
        ]
    else:
        rows = [
            [
                "mnist-ddpm (`" + comparison["run"] + "`), as reported",
                comparison["sampler"],
                comparison["n"],
                comparison["fid"],
                comparison["inception_score"],
            ]
        ]
        if "equal_n" in comparison:
            rows.append(
                [
                    "mnist-ddpm, its first samples scored here",
                    comparison["sampler"],
                    comparison["equal_n"]["n"],
                    comparison["equal_n"]["fid"],
                    comparison["equal_n"]["inception_score"],
                ]
            )
        rows.append(
            [
                "mnist-ncsn (this run)",
                f"ALD c = {best['c']:g}, T = {best['steps_per_level']}",
                main["n"],
                main.get("fid"),
                main.get("inception_score"),
            ]
        )
        lines += [table(["model", "sampler", "n", "FID", "IS"], rows), ""]
        if "equal_n" not in comparison and comparison.get("n") != main["n"]:
            lines += [
                f"Note: the two FIDs are at different sample counts ({comparison['n']} vs {main['n']}); FID "
                "falls as n grows, so the ratio is only indicative.",
                "",
            ]
    if metrics["targets"]:
        lines += [
            "## Targets",
            "",
            table(["target", "measured", "met"], [[t["target"], t["value"], t["met"]] for t in metrics["targets"]]),
            "",
        ]
    ref = metrics["reference_published"]
    lines += [
        f"The reference score network's published figures on MNIST are IS {ref['inception_score']} and FID "
        f"{ref['fid']}, measured with the reference's own evaluator; they are not on the scale of difflab's "
        "evaluator and are kept here only as the reference's claim.",
        "",
    ]
    for n, rows in metrics.get("calibration", {}).items():
        lines += [
            f"Calibration rows at n = {int(n):,} (same evaluator, same count):",
            "",
            table(
                ["reference row", "n", "FID", "IS"], [[r["name"], r["n"], r["fid"], r["inception_score"]] for r in rows]
            ),
            "",
        ]
    lines += [
        "## The Langevin trajectory",
        "",
        *figure_lines(
            figures("langevin_trajectory.png"),
            folder,
            "The same chains after the T steps of every level, then denoised",
        ),
        "## Training",
        "",
        "The DSM loss is per image: 1/2 || sigma s + z ||^2 summed over the pixels (it is "
        f"{metrics['data_dimensions'] / 2:g} = D / 2 for s = 0 and cannot reach 0).",
        "",
        table(
            ["level", "sigma", "final validation DSM loss"],
            [
                [i, s, metrics["training"]["validation"].get(f"level_{i}")]
                for i, s in enumerate(metrics["noise_levels"])
            ],
        ),
        "",
        *figure_lines(figures("loss.png"), folder, "Training and validation loss"),
    ]
    return sections.markdown_report(contents, "\n".join(lines))
