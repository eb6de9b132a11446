"""The 2-D walkthrough (swiss roll, spiral, moons): T = 100, an MLP taking the raw t beside x_t.

Shows the forward process at t = 0, 33, 66, 100, the reverse process at four points of DDPM
sampling, the loss curve, the samples and their KDE negative log-likelihoods.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from difflab.data.toy import TOY_NAMES, make_toy
from difflab.diffusion.schedule import NoiseSchedule, ScheduleConfig
from difflab.errors import ConfigError
from difflab.experiments import points2d
from difflab.experiments.points2d import DenoiserTrainConfig, MLPConfig
from difflab.experiments.runs import RunFolder, setup_ranks, trained_only
from difflab.metrics import points as point_metrics
from difflab.report import sections
from difflab.report.document import MetricRow, MetricTable, Paragraph, Report, metric
from difflab.report.references import reference_text
from difflab.report.rundata import TRAJECTORY_FILE, RunContents
from difflab.seeding import mix_seed, seed_everything
from difflab.training.logging import RunLogger
from difflab.viz import plots2d

TOY_DATASETS = TOY_NAMES
DEFAULT_NOISE = {"swissroll": 0.0, "spiral": 0.02, "moons": 0.05}


@dataclass(frozen=True)
class ToyDataConfig:
    """``n_train`` training points (seed 0) and ``n_heldout`` held-out points (seed 1) with ``noise``
    (in the generator's own units, before standardisation)."""

    n_train: int = 5000
    n_heldout: int = 5000
    noise: float = 0.0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        # data.toy draws at least 10 points per set and checks noise; the validation split takes a share in (0, 1)
        if self.n_train < 10 or self.n_heldout < 10 or not 0 < self.val_fraction < 1:
            raise ConfigError(
                "data needs n_train >= 10, n_heldout >= 10 and val_fraction in (0, 1), got "
                f"{self.n_train}, {self.n_heldout} and {self.val_fraction}"
            )


@dataclass(frozen=True)
class ToySamplingConfig:
    n: int = 5000
    sampler: str = "ddpm"
    steps: int = 0
    eta: float = 0.0
    ddpm_variance: str = "beta"
    batch_size: int = 5000
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.n < 3 or self.batch_size < 1:  # the reverse KDE score fits a KDE to the samples: more than 2 points
            raise ConfigError(
                f"sampling.n must be >= 3 (a KDE of the samples) and sampling.batch_size >= 1, got {self.n} and "
                f"{self.batch_size}"
            )
        points2d.check_variance("sampling.ddpm_variance", self.ddpm_variance)


@dataclass(frozen=True)
class ToyFigureConfig:
    """Timesteps of the figures; ``trajectory_frames`` timesteps of the first ``trajectory_points`` samples
    go to ``samples/trajectory.safetensors`` for the run browser (0 frames: none), from the first sampling batch
    (so at most ``sampling.batch_size`` points)."""

    forward_steps: tuple[int, ...] = (0, 33, 66, 100)
    reverse_steps: tuple[int, ...] = (100, 66, 33, 0)
    trajectory_frames: int = 20
    trajectory_points: int = 500

    def __post_init__(self) -> None:
        if self.trajectory_frames < 0 or self.trajectory_points < 1:
            raise ConfigError("figures.trajectory_frames must be >= 0 and figures.trajectory_points >= 1")


@dataclass(frozen=True)
class ToyConfig:
    """A 2-D walkthrough run. The schedule is DDPM's linear one rescaled to T = 100 (betas 1e-3 to 0.2,
    i.e. Ho et al.'s 1e-4 to 0.02 times 1000 / T), so ``x_T`` is pure noise."""

    AFTER_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("sampling", "figures")  # training never reads them

    recipe: str = "swissroll"
    seed: int = 0
    device: str = "auto"
    run_dir: str = ""
    progress: bool = True
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("linear", 100, 1e-3, 0.2))
    denoiser: MLPConfig = field(default_factory=lambda: MLPConfig(hidden=(128, 128, 128), time_encoding="raw"))
    denoiser_train: DenoiserTrainConfig = field(
        default_factory=lambda: DenoiserTrainConfig(
            steps=3000,
            batch_size=1024,
            lr=2e-3,
            warmup_steps=100,
            ema_decay=0.995,
            eval_every=250,
            log_every=25,
            checkpoint_every=1000,
        )
    )
    sampling: ToySamplingConfig = field(default_factory=ToySamplingConfig)
    figures: ToyFigureConfig = field(default_factory=ToyFigureConfig)

    def __post_init__(self) -> None:
        if self.recipe not in TOY_DATASETS:
            raise ConfigError(f"recipe must be one of {', '.join(TOY_DATASETS)}, got {self.recipe!r}")
        steps, sampling = self.schedule.num_timesteps, self.sampling
        for key in ("forward_steps", "reverse_steps"):
            points2d.check_timesteps(f"figures.{key}", getattr(self.figures, key), steps)
        points2d.check_sampling("sampling.", sampling.sampler, sampling.steps, steps, sampling.eta)


def toy_config_class(name: str) -> Any:
    """A zero-argument factory of the default config of recipe ``name``."""

    def factory(**kwargs: Any) -> ToyConfig:
        defaults: dict[str, Any] = {
            "recipe": name,
            "run_dir": f"runs/{name}",
            "data": ToyDataConfig(noise=DEFAULT_NOISE[name]),
        }
        defaults.update(kwargs)
        return ToyConfig(**defaults)

    factory.__name__ = f"{name}_config"
    return factory


def _open(config: ToyConfig, fresh: bool, echo):
    device, echo = setup_ranks(config, echo)
    train = make_toy(config.recipe, config.data.n_train, config.data.noise, seed=0)
    heldout = make_toy(config.recipe, config.data.n_heldout, config.data.noise, seed=1)
    run = RunFolder.open(config.run_dir or f"runs/{config.recipe}", config.recipe, config, fresh=fresh)
    return device, train, heldout, run, echo


def run_toy(config: ToyConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """Run the 2-D walkthrough on ``config.recipe`` into ``config.run_dir``."""
    wall_start = time.perf_counter()
    device, train, heldout, run, echo = _open(config, fresh, echo)
    with run.guard():
        _run(run, config, device, train, heldout, wall_start, echo)
    return run


def train_toy(config: ToyConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """``difflab train swissroll`` (spiral, moons): train the denoiser and export its weights, nothing else."""
    wall_start = time.perf_counter()
    device, train, heldout, run, echo = _open(config, fresh, echo)
    with run.guard():
        seed_everything(config.seed)
        schedule = NoiseSchedule.from_config(config.schedule).to(device)
        splits = points2d.make_splits(train, heldout, config.data.val_fraction, config.seed)
        logger = RunLogger(run.path)
        with run.stage("train denoiser"):
            points2d.train_denoiser(
                run,
                logger,
                splits,
                schedule,
                config.denoiser,
                config.denoiser_train,
                config.seed,
                device,
                config.progress,
            )
        logger.close()
        trained_only(run, config.recipe, wall_start, echo)
    return run


def _run(run: RunFolder, config: ToyConfig, device: torch.device, train, heldout, wall_start: float, echo) -> None:
    seed_everything(config.seed)
    schedule = NoiseSchedule.from_config(config.schedule).to(device)
    splits = points2d.make_splits(train, heldout, config.data.val_fraction, config.seed)
    logger = RunLogger(run.path)
    echo(f"[{config.recipe}] run folder {run.path} | {len(train)} training points | device {device}")
    with run.stage("train denoiser"):
        model, result = points2d.train_denoiser(
            run, logger, splits, schedule, config.denoiser, config.denoiser_train, config.seed, device, config.progress
        )
    sampling = config.sampling
    with run.stage("sample"):
        recorder = points2d.trajectory_recorder(
            schedule,
            sampling.sampler,
            sampling.steps,
            config.figures.trajectory_frames,
            config.figures.trajectory_points,
        )
        samples, snapshots = points2d.sample_points_sharded(
            model,
            schedule,
            sampling.n,
            seed=mix_seed(sampling.seed, 0, 1),
            sampler=sampling.sampler,
            steps=sampling.steps,
            eta=sampling.eta,
            ddpm_variance=sampling.ddpm_variance,
            batch_size=sampling.batch_size,
            device=device,
            snapshot_steps=config.figures.reverse_steps,
            show_progress=config.progress and run.main,
            callback=recorder,
        )
        point_metrics.check_finite(samples)
        if run.main:
            torch.save(samples, run.sub("samples", "samples.pt"))
            if recorder is not None:
                recorder.trajectory().save(run.sub(TRAJECTORY_FILE))
    if not run.main:  # rank 0 alone scores, draws and reports
        logger.close()
        return
    with run.stage("metrics"):
        train_kde, heldout_kde = point_metrics.KDE(train.data), point_metrics.KDE(heldout.data)
        metrics: dict[str, Any] = {
            "samples": {
                "n": len(samples),
                "nll_course": train_kde.nll(samples),
                "nll_heldout": heldout_kde.nll(samples),
                "nll_reverse": point_metrics.nll_reverse(samples, heldout.data),
            },
            "real": {
                "nll_course": train_kde.nll(heldout.data),
                "nll_heldout": heldout_kde.nll(train.data),
                "nll_reverse": train_kde.nll(heldout.data),
            },
        }
    figures: dict[str, Path] = {}
    with run.stage("figures"):
        figures["forward"] = points2d.forward_figure(
            train.data,
            schedule.to("cpu"),
            config.figures.forward_steps,
            run.sub("figures", "forward_process.png"),
            config.seed,
        )
        schedule.to(device)
        figures["reverse"] = points2d.reverse_figure(
            snapshots,
            train.data,
            run.sub("figures", "reverse_process.png"),
            f"Reverse process ({sampling.sampler.upper()})",
        )
        figures["samples"] = plots2d.scatter_over_data(
            samples, train.data, run.sub("figures", "samples.png"), f"{config.recipe}: samples"
        )
        figures["loss"] = points2d.loss_figure(
            logger, "denoiser", run.sub("figures", "loss.png"), "Denoiser: eps-prediction MSE"
        )
    logger.close()
    total = time.perf_counter() - wall_start
    summary = asdict(result)
    summary["seconds"] = round(summary["seconds"], 2)
    metrics["training"] = {"denoiser": summary}
    metrics["timings_seconds"] = {k: round(v, 2) for k, v in run.timings.items()} | {"total": round(total, 2)}
    metrics["data"] = {
        "dataset": config.recipe,
        "noise": config.data.noise,
        "training_points": len(train),
        "fit_points": len(splits.fit),
        "validation_points": len(splits.validation),
        "heldout_points": len(heldout),
    }
    metrics["device"] = str(device)
    run.write_metrics(metrics)
    run.write_report(build_report)
    run.complete()
    echo(
        f"[{config.recipe}] done in {total:.0f} s: nll_course {metrics['samples']['nll_course']:.3f} "
        f"(real {metrics['real']['nll_course']:.3f}), nll_reverse {metrics['samples']['nll_reverse']:.3f}"
    )


def build_report(contents: RunContents) -> Report:
    """The 2-D walkthrough's report, from the run folder alone."""
    config = contents.typed_config(toy_config_class(contents.recipe)())
    metrics = contents.metrics
    samples = metrics.get("samples", {})
    train = metrics.get("training", {}).get("denoiser", {})
    report = Report(f"2-D walkthrough: {config.recipe}")
    report.add(sections.run_summary(contents))
    report.add(
        Paragraph(
            f"T = {config.schedule.num_timesteps}, {config.schedule.kind} betas from {config.schedule.beta_start} to "
            f"{config.schedule.beta_end}; MLP {list(config.denoiser.hidden)} on `[x_t, t]` (time input "
            f"`{config.denoiser.time_encoding}`); {train.get('step', 0)} AdamW steps of batch "
            f"{config.denoiser_train.batch_size}."
        )
    )
    report.section("Data", sections.data_table(contents))
    rows = [
        ("nll_course", "samples under a KDE of the training points"),
        ("nll_heldout", "samples under a KDE of the held-out points"),
        ("nll_reverse", "held-out points under a KDE of the samples"),
    ]
    report.section(
        "Samples",
        Paragraph(
            f"{samples.get('n', 0):,} samples by {config.sampling.sampler.upper()}; mean negative log-likelihoods in "
            "nats under Gaussian KDEs (Scott's rule), lower is better, beside what real held-out points score."
        ),
        MetricTable(
            tuple(
                MetricRow(
                    name,
                    metric(metrics, f"samples.{name}"),
                    metric(metrics, f"real.{name}"),
                    reference_text(config.recipe, name),
                    what,
                )
                for name, what in rows
            ),
            value_header="samples",
            floor_header="real held-out data (floor)",
        ),
        sections.figure_if(contents, "figures/samples.png", f"{samples.get('n', 0):,} samples over the training data"),
        sections.trajectory_note(contents),
    )
    report.section(
        "Forward and reverse process",
        sections.figure_if(
            contents,
            "figures/forward_process.png",
            "Forward process at t = " + ", ".join(map(str, config.figures.forward_steps)),
        ),
        sections.figure_if(
            contents,
            "figures/reverse_process.png",
            f"Reverse process ({config.sampling.sampler.upper()}) at t = "
            + ", ".join(map(str, config.figures.reverse_steps)),
        ),
    )

    def number(value: Any) -> float:
        return float(value) if isinstance(value, (int, float)) else float("nan")

    validation = number((train.get("final_validation") or {}).get("loss"))
    report.section(
        "Training",
        Paragraph(
            f"Final training loss {number(train.get('final_train_loss')):.4f}, validation loss "
            f"{validation:.4f}, {number(train.get('seconds')):.1f} s."
        ),
        sections.curves_table(contents),
        sections.figure_if(contents, "figures/loss.png", "Training and validation loss"),
    )
    for title, blocks in sections.closing_sections(contents):
        report.section(title, *blocks)
    return report
