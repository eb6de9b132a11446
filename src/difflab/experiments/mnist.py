"""The MNIST recipes.

- ``mnist-ddpm``: the Micro-UNet walkthrough. An unconditional U-Net whose residual blocks *add* a
  per-block projection of the sinusoidal time embedding; cosine schedule, T = 1000; a 4 x 4 grid by
  DDPM with all 1,000 steps and one by DDIM (eta = 0) with 50 steps, their wall times, and FID/IS of both.
- ``mnist-cfg``: a class-conditional U-Net (GroupNorm + SiLU res blocks, FiLM time embedding, a class
  embedding with a learned null label) trained with label dropout for classifier-free guidance; a
  progress grid after every epoch, a step-by-step denoising panel, a 10 x N grid per digit, and a
  guidance sweep (FID, IS, accuracy of the intended class).

Both end with the built-in evaluation (``metrics.image_eval``) and its calibration rows, keep a denoising
trajectory of a few samples (``samples/trajectory.safetensors``, for ``difflab serve``) and write their report
(``report.md`` + ``report.html``, built by :mod:`difflab.experiments.mnist_reports`). ``mnist-ddpm`` also
measures what its "DDPM vs DDIM" report needs: whether each sampler is a deterministic map of x_T, the
forward process on the training images, and the loss by timestep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from difflab.data.images import image_folder_classes
from difflab.diffusion.objectives import ObjectiveConfig
from difflab.diffusion.prediction import wrap_prediction
from difflab.diffusion.schedule import NoiseSchedule, ScheduleConfig
from difflab.errors import ConfigError, DataError, torch_load_problem
from difflab.experiments import images as stages
from difflab.experiments.images import QUANTISATION_LEVELS, ImageDataConfig, recorded_classes
from difflab.experiments.points2d import trajectory_recorder
from difflab.experiments.runs import (
    RunFolder,
    option_tags,
    read_run,
    read_run_config,
    resolve_device,
    setup_ranks,
    trained_only,
)
from difflab.models.unet import UNetConfig, count_parameters, describe
from difflab.report.rundata import TRAJECTORY_FILE
from difflab.sampling.solvers import SAMPLERS
from difflab.seeding import seed_everything
from difflab.training import distributed
from difflab.training.checkpoint import load_weights
from difflab.training.logging import RunLogger, read_series
from difflab.training.precision import SAMPLING_PRECISIONS, to_fast_layout
from difflab.training.trainer import TrainConfig, Trainer
from difflab.viz import plots2d
from difflab.viz.images import image_rows_figure, save_grid

TRAJECTORY_FRAMES = 20  # timesteps of the trajectory file
TRAJECTORY_IMAGES = 8  # samples in it
DETERMINISM_IMAGES = 8  # starting points x_T of the determinism measurement


@dataclass(frozen=True)
class EvaluationConfig:
    """How many samples are scored (FID/IS by the project's MNIST evaluator) and how they are drawn.

    ``inception_weights``: a local InceptionV3 weights file (torch-fidelity's ``pt_inception-2015-12-05``
    layout); when set, the standard InceptionV3 FID/IS are computed too (nothing is downloaded).
    ``precision``: the network's precision while drawing the grids and the scored samples, ``fp32`` or ``bf16``
    (autocast; the sampler's arithmetic stays fp32). bf16 sampled the bf16 ``mnist-ddpm`` CPU model 1.6x faster
    with FIDs within 0.4 of fp32 sampling (README); the denoising panel, diagnostics and progress grids stay fp32.
    """

    n_samples: int = 2000
    n_ddpm: int = 300
    ddim_steps: int = 50
    batch_size: int = 128
    seed: int = 4321
    inception_weights: str = ""
    precision: str = "fp32"

    def __post_init__(self) -> None:
        ddpm_scorable = self.n_ddpm == 0 or self.n_ddpm >= 2  # 0: no DDPM set; a FID needs two samples
        if self.n_samples < 2 or not ddpm_scorable or self.batch_size < 1 or self.ddim_steps < 1:
            raise ConfigError(
                "evaluation needs n_samples >= 2, n_ddpm 0 or >= 2 (a FID needs two samples), batch_size >= 1, "
                f"ddim_steps >= 1, got {self.n_samples}, {self.n_ddpm}, {self.batch_size}, {self.ddim_steps}"
            )
        if self.precision not in SAMPLING_PRECISIONS:
            allowed = ", ".join(SAMPLING_PRECISIONS)
            raise ConfigError(f"metrics.precision must be one of {allowed}, got {self.precision!r}")


@dataclass(frozen=True)
class MnistDDPMConfig:
    """``mnist-ddpm``: the CPU-sized defaults; ``configs/mnist-ddpm.yaml`` holds the reference (GPU) sizes."""

    # training never reads these: `difflab run` on a trained folder samples and scores with new values of them
    AFTER_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("metrics",)

    recipe: str = "mnist-ddpm"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/mnist-ddpm-cpu"
    progress: bool = True
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("cosine", 1000))
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=1, time_conditioning="add", mid_attention=True
        )
    )
    # Width 16 trained 5,000 steps beats width 32 trained 2,400 steps (DDIM-50 FID 41.1 vs 45.7, DDPM-100
    # 24.5 vs 30.4 at n=300) in 3/4 of the training time: on two cores, steps buy more than width.
    # Updates buy more than batch size too: in fp32 on a 2-core AVX2 CPU, 10,000 steps of batch 32 (40 min in all)
    # scored DDIM-50 FID 33.9 / 39.9 (training seeds 0 / 1) against 41.8 for 5,000 of batch 64 (37.5 min, one
    # seed) at the same images seen; 5,000 of batch 128 (the config until 2026-12-07) overran the 45 minutes there.
    # bf16 autocast trains 1.5-1.8x faster on the CPUs with avx512_bf16. Measured FIDs in the README.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=10000,
            batch_size=32,
            lr=1e-3,
            warmup_steps=200,
            ema_decay=0.999,
            eval_every=1000,
            log_every=50,
            checkpoint_every=500,
            precision="auto",  # bf16 where the CPU runs it natively, else fp32
        )
    )
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    metrics: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        if self.recipe != "mnist-ddpm":
            raise ConfigError(f"this config is for the 'mnist-ddpm' recipe, got recipe={self.recipe!r}")
        _check_steps(self)


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance: ``eps_hat = eps_u + w (eps_c - eps_u)`` (w = 0 unconditional, w = 1 the
    conditional model, w > 1 guided; the papers' ``(1 + w') eps_c - w' eps_u`` is w = 1 + w').

    The scored samples (at ``w`` and over ``sweep``) are drawn with ``sampler`` / ``steps`` (default
    DPM-Solver++(2M) with 20 steps, which matches DDIM-50 at 40% of the network evaluations); the digit grid
    and the denoising panel use DDIM with ``metrics.ddim_steps``.
    """

    w: float = 2.0
    sweep: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 5.0)
    n_sweep: int = 500
    grid_per_digit: int = 10
    label_dropout: float = 0.1
    progress_every_epoch: bool = True
    sampler: str = "dpmpp-2m"
    steps: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("guidance.label_dropout must be in [0, 1)")
        if self.grid_per_digit < 1 or self.steps < 1 or (self.sweep and self.n_sweep < 2):
            raise ConfigError(
                "guidance.grid_per_digit and guidance.steps must be >= 1 and guidance.n_sweep >= 2 (a FID needs two "
                f"samples), got {self.grid_per_digit}, {self.steps} and {self.n_sweep}"
            )
        if self.sampler not in SAMPLERS:  # checked here, not when the trained model is first sampled
            raise ConfigError(
                f"guidance.sampler={self.sampler!r} is not a sampler; choose one of {', '.join(SAMPLERS)}"
            )


@dataclass(frozen=True)
class MnistCFGConfig:
    """``mnist-cfg``: the CPU-sized defaults; ``configs/mnist-cfg.yaml`` holds the reference (GPU) sizes."""

    # guidance.w also draws the per-epoch progress grids during training, so it is not among them
    AFTER_TRAINING_KEYS: ClassVar[tuple[str, ...]] = (
        "metrics",
        "guidance.sweep",
        "guidance.n_sweep",
        "guidance.grid_per_digit",
        "guidance.sampler",
        "guidance.steps",
    )

    recipe: str = "mnist-cfg"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/mnist-cfg-cpu"
    progress: bool = True
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("cosine", 1000))
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            base_channels=16,
            channel_mults=(1, 2, 4),
            num_res_blocks=1,
            time_conditioning="film",
            num_classes=10,
            mid_attention=True,
        )
    )
    # Width 16 and EMA 0.999 like mnist-ddpm's CPU config; 5,000 steps of batch 64 (6.4 epochs): in fp32
    # on a 2-core AVX2 CPU batch 128 took 0.70 s a step (over an hour for the run), batch 64 0.32 s (31 min,
    # every target met; 2,500 steps of batch 128 missed the accuracy target). Measured in the README.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=5000,
            batch_size=64,
            lr=1e-3,
            weight_decay=1e-4,
            warmup_steps=200,
            grad_clip=1.0,
            ema_decay=0.999,
            eval_every=1000,
            log_every=50,
            checkpoint_every=500,
            precision="auto",  # bf16 where the CPU runs it natively, else fp32
        )
    )
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    metrics: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        if self.recipe != "mnist-cfg":
            raise ConfigError(f"this config is for the 'mnist-cfg' recipe, got recipe={self.recipe!r}")
        if self.unet.num_classes < 1:
            raise ConfigError("mnist-cfg needs a class-conditional U-Net (unet.num_classes > 0)")
        _check_steps(self)


def _check_steps(config: Any) -> None:
    """Sampler steps must fit the schedule, checked before training rather than after it."""
    limit = config.schedule.num_timesteps
    steps = {"metrics.ddim_steps": config.metrics.ddim_steps}
    if hasattr(config, "guidance"):
        steps["guidance.steps"] = config.guidance.steps
    for key, value in steps.items():
        if value > limit:
            raise ConfigError(f"{key}={value} exceeds schedule.num_timesteps={limit}")


# --------------------------------------------------------------------------------------------------------------
def _setup(config: Any, recipe: str, fresh: bool, echo):
    """The config with its U-Net fitted to the data's channels and classes, device (joining torchrun's process
    group when launched by it), data and run folder; ranks other than 0 get a silent ``echo`` and a run folder
    that writes nothing."""
    device, echo = setup_ranks(config, echo)
    train, heldout = stages.load_image_data(config.data, config.seed)
    unet, fitted = stages.fit_unet_to_data(config.unet, train)
    if fitted:
        config = dataclasses.replace(config, unet=unet)
        echo(f"[{recipe}] from the data: {' '.join(fitted)}")
    weights = config.metrics.inception_weights
    if weights and config.data.source in ("mnist", "imagefolder"):
        from difflab.models.inception import load_inception_v3

        load_inception_v3(weights)  # a wrong file is refused here, before the run folder exists, not after it
    elif weights:
        echo(f"[{recipe}] metrics.inception_weights is not used: no evaluator scores {config.data.source!r} images")
    run = RunFolder.open(config.run_dir, recipe, config, fresh=fresh)
    stages.record_classes(run, train)
    return config, device, train, heldout, run, echo


def _train_only(config: Any, recipe: str, fresh: bool, echo, **extra: Any) -> RunFolder:
    """``difflab train mnist-*``: only the U-Net's training and its exported weights."""
    wall = time.perf_counter()
    config, device, train, heldout, run, echo = _setup(config, recipe, fresh, echo)
    with run.guard():
        seed_everything(config.seed)
        schedule = NoiseSchedule.from_config(config.schedule).to(device)
        logger = RunLogger(run.path)
        with run.stage("train"):
            stages.train_image_denoiser(
                run,
                logger,
                train,
                heldout,
                schedule,
                config.unet,
                config.train,
                config.seed,
                device,
                config.progress and run.main,
                objective=config.objective,
                **extra,
            )
        logger.close()
        trained_only(run, recipe, wall, echo)
    return run


def train_mnist_ddpm(config: MnistDDPMConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    return _train_only(config, "mnist-ddpm", fresh, echo)


def train_mnist_cfg(config: MnistCFGConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    return _train_only(config, "mnist-cfg", fresh, echo, label_dropout=config.guidance.label_dropout)


def _evaluate(evaluator: Any, result: stages.SampleResult, intended: torch.Tensor | None = None) -> dict[str, Any]:
    if evaluator is None:
        return {"n": len(result.images)}
    return evaluator.evaluate(result.images, intended)


def _calibration(evaluator: Any, counts: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Calibration rows at each sample count (at most as many real images as the evaluator has: the rows' ``n``)."""
    if evaluator is None:
        return {}
    counts = sorted(set(c for c in counts if c > 1))
    return {str(n): evaluator.calibration(evaluator.calibration_count(n)) for n in counts}


def _evaluator_summary(evaluator: Any, data: ImageDataConfig) -> dict[str, Any]:
    """``metrics["evaluator"]``: what the scores are (or why there are none)."""
    if evaluator is None:
        return {"none": stages.no_evaluator_reason(data)}
    return evaluator.summary()


def _description(config: Any, size: int) -> str:
    """The U-Net's description, with what it predicts when that is not eps."""
    text = describe(config.unet, size)
    return text if config.objective.prediction == "eps" else f"{text}, {config.objective.prediction}-prediction"


def _loss_figure(run: RunFolder, logger: RunLogger, objective: ObjectiveConfig) -> Path:
    train = "train" if objective.prediction == "eps" else f"train ({objective.prediction}-MSE)"
    series = {
        train: read_series(logger.path, "denoiser/train_loss"),
        "validation": read_series(logger.path, "denoiser/val_loss"),
    }
    return plots2d.curves(series, run.sub("figures", "loss.png"), "eps-prediction MSE")


# --------------------------------------------------------------------------------------------------------------
def run_mnist_ddpm(config: MnistDDPMConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """The Micro-UNet walkthrough into ``config.run_dir``."""
    wall = time.perf_counter()
    config, device, train, heldout, run, echo = _setup(config, "mnist-ddpm", fresh, echo)
    with run.guard():
        seed_everything(config.seed)
        schedule = NoiseSchedule.from_config(config.schedule).to(device)
        logger = RunLogger(run.path)
        echo(
            f"[mnist-ddpm] run folder {run.path} | {len(train):,} training images {tuple(train.images.shape[1:])} | "
            f"{describe(config.unet, train.size)} | device {device}"
        )
        with run.stage("evaluator"):  # rank 0 alone scores; every rank draws its shard of the samples
            evaluator = (
                stages.evaluator_for(config.data, device, echo, config.metrics.inception_weights, (train, heldout))
                if run.main
                else None
            )
        with run.stage("train"):
            trainer, result = stages.train_image_denoiser(
                run,
                logger,
                train,
                heldout,
                schedule,
                config.unet,
                config.train,
                config.seed,
                device,
                config.progress,
                objective=config.objective,
            )
        ev = config.metrics
        model = _sampling_model(trainer.eval_model, device, ev.precision)
        shape = tuple(train.images.shape[1:])
        common = dict(
            eta=0.0, batch_size=ev.batch_size, device=device, show_progress=config.progress, precision=ev.precision
        )
        grids: dict[str, Any] = {}
        recorder = trajectory_recorder(schedule, "ddim", ev.ddim_steps, TRAJECTORY_FRAMES, TRAJECTORY_IMAGES)
        with run.stage("grids"):
            for name, sampler, steps in (("ddpm", "ddpm", schedule.num_timesteps), ("ddim", "ddim", ev.ddim_steps)):
                grid = stages.sample_images(
                    model,
                    schedule,
                    16,
                    shape,
                    sampler=sampler,
                    steps=steps,
                    seed=ev.seed,
                    callback=recorder if name == "ddim" else None,
                    **common,
                )
                if run.main:
                    save_grid(grid.images, run.sub("figures", f"grid_{name}.png"), nrow=4)
                grids[name] = {
                    "images": 16,
                    "steps": steps,
                    "seconds": grid.seconds,
                    "network_evaluations": grid.network_evaluations,
                }
            if run.main and recorder is not None:
                recorder.trajectory().save(run.sub(TRAJECTORY_FILE))
        with run.stage("sample ddim"):
            ddim = stages.sample_images(
                model, schedule, ev.n_samples, shape, sampler="ddim", steps=ev.ddim_steps, seed=ev.seed, **common
            )
            if run.main:
                stages.save_samples(run.sub("samples", "ddim.pt"), ddim)
        with run.stage("sample ddpm"):
            ddpm = (
                stages.sample_images(model, schedule, ev.n_ddpm, shape, sampler="ddpm", steps=0, seed=ev.seed, **common)
                if ev.n_ddpm
                else None
            )
            if ddpm is not None and run.main:
                stages.save_samples(run.sub("samples", "ddpm.pt"), ddpm)
        if not run.main:  # rank 0 alone scores, draws and reports
            return run
        with run.stage("evaluate"):
            metrics: dict[str, Any] = {"ddim": _evaluate(evaluator, ddim)}
            metrics["ddim"]["seconds_per_1000"] = ddim.seconds / len(ddim.images) * 1000
            if ddpm is not None:
                metrics["ddpm"] = _evaluate(evaluator, ddpm)
                metrics["ddpm"]["seconds_per_1000"] = ddpm.seconds / len(ddpm.images) * 1000
                equal = stages.SampleResult(ddim.images[: ev.n_ddpm], None, 0.0, 0)
                metrics["ddim_at_ddpm_count"] = _evaluate(evaluator, equal)
            metrics["calibration"] = _calibration(evaluator, [ev.n_samples, ev.n_ddpm])
        with run.stage("diagnostics"):  # for the "DDPM vs DDIM" report
            metrics["determinism"] = stages.sampler_determinism(
                model, schedule, shape, DETERMINISM_IMAGES, ev.ddim_steps, ev.seed, device
            )
            metrics["forward"] = stages.forward_statistics(schedule, train.images, config.seed)
            metrics["objective"] = stages.loss_by_timestep(model, schedule, heldout.images, config.seed, device)
        with run.stage("figures"):
            _loss_figure(run, logger, config.objective)
        logger.close()
        metrics["grids"] = grids
        metrics["comparison"] = ddpm_ddim_comparison(metrics)
        metrics["data"] = _data_summary(config.data, train, heldout)
        metrics["evaluator"] = _evaluator_summary(evaluator, config.data)
        metrics["device"] = str(device)
        metrics["model"] = {"parameters": count_parameters(model), "description": _description(config, train.size)}
        metrics["training"] = {
            "step": result.step,
            "seconds": round(result.seconds, 1),
            "final_train_loss": result.final_train_loss,
            "validation": result.final_validation,
            "images_per_second": result.images_per_second(config.train.batch_size),
        }
        metrics["timings_seconds"] = {k: round(v, 1) for k, v in run.timings.items()}
        metrics["timings_seconds"]["total"] = round(time.perf_counter() - wall, 1)
        metrics["targets"] = ddpm_targets(metrics)
        run.write_metrics(metrics)
        from difflab.experiments.mnist_reports import build_ddpm_report

        run.write_report(build_ddpm_report)
        run.complete()
    score = f"FID {metrics['ddim']['fid']:.2f}" if "fid" in metrics["ddim"] else "not scored"
    echo(
        f"[mnist-ddpm] done in {metrics['timings_seconds']['total']:.0f} s: DDIM-{ev.ddim_steps} {score} | "
        f"report {run.sub('report.md')}"
    )
    return run


def _sampling_model(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """The trained model, in the layout bf16 sampling is fastest in; an fp32 sampler keeps the training layout
    (which the recorded figures were measured with)."""
    return model if precision == "fp32" else to_fast_layout(model, device, precision)


def _data_summary(data: ImageDataConfig, train: Any, heldout: Any) -> dict[str, Any]:
    summary = {
        "source": data.source,
        "training_images": len(train),
        "heldout_images": len(heldout),
        "image_shape": list(train.images.shape[1:]),
    }
    if train.intensity_range is not None:  # data.intensity=stretch: the band of 0..1 that became 0..1
        summary["intensity_range"] = list(train.intensity_range)
    return summary


def ddpm_ddim_comparison(metrics: dict[str, Any]) -> dict[str, Any]:
    """DDPM against DDIM in ratios: time per image (of the scored samples, else of the grids), steps, FID."""
    grids = metrics["grids"]
    scored = "ddpm" in metrics

    def ms_per_image(name: str) -> float:
        if scored:
            return metrics[name]["seconds_per_1000"]
        return grids[name]["seconds"] / grids[name]["images"] * 1000

    out: dict[str, Any] = {
        "timed_on": "scored samples" if scored else "grids",
        "ddpm_ms_per_image": ms_per_image("ddpm"),
        "ddim_ms_per_image": ms_per_image("ddim"),
        "ddim_speedup": ms_per_image("ddpm") / ms_per_image("ddim"),
        "step_ratio": grids["ddpm"]["steps"] / grids["ddim"]["steps"],
    }
    if scored and "fid" in metrics["ddpm"]:
        out["fid_ddim_over_ddpm"] = metrics["ddim_at_ddpm_count"]["fid"] / metrics["ddpm"]["fid"]
    return out


def ddpm_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bar for mnist-ddpm: DDIM-50 within 15% of DDPM-1000's FID (equal count) at 1/20 the time."""
    if "ddpm" not in metrics or "fid" not in metrics["ddpm"]:
        return []
    fid_ddpm, fid_ddim = metrics["ddpm"]["fid"], metrics["ddim_at_ddpm_count"]["fid"]
    ratio = metrics["ddim"]["seconds_per_1000"] / metrics["ddpm"]["seconds_per_1000"]
    grids = metrics.get("grids", {})  # the samplers' step counts (the issue's are 50 and 1,000)
    ddim = f"DDIM-{grids.get('ddim', {}).get('steps', 50)}"
    ddpm = f"DDPM-{grids.get('ddpm', {}).get('steps', 1000)}"
    fid_target = {
        "target": f"{ddim} FID / {ddpm} FID <= 1.15 (within 15%, equal n)",
        "value": fid_ddim / fid_ddpm,
        "met": fid_ddim <= 1.15 * fid_ddpm,
    }
    return [
        stages.with_ratio_noise(fid_target, metrics["ddpm"], metrics["ddim_at_ddpm_count"], limit=0.15),
        {"target": f"{ddim} time per image <= 1/20 of {ddpm} (+10%)", "value": ratio, "met": ratio <= 0.055},
    ]


# --------------------------------------------------------------------------------------------------------------
PROGRESS_STEPS = 25  # DDIM steps of the progress grids (T when the schedule has fewer)


class ProgressGrids:
    """A trainer hook: after every epoch, sample one image of each class from fixed noise (DDIM, PROGRESS_STEPS, w)."""

    def __init__(
        self,
        run: RunFolder,
        schedule: NoiseSchedule,
        steps_per_epoch: int,
        shape: tuple[int, ...],
        num_classes: int,
        w: float,
        seed: int,
        device: torch.device,
    ) -> None:
        self.run, self.schedule, self.steps_per_epoch = run, schedule, steps_per_epoch
        self.shape, self.num_classes, self.w, self.seed, self.device = shape, num_classes, w, seed, device
        self.steps = min(PROGRESS_STEPS, schedule.num_timesteps)
        self.folder = run.sub("figures", "progress")
        self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, trainer: Trainer) -> None:
        if trainer.step % self.steps_per_epoch and trainer.step != trainer.config.steps:
            return
        epoch = -(-trainer.step // self.steps_per_epoch)
        labels = torch.arange(self.num_classes)
        result = stages.sample_images(
            trainer.eval_model.eval(),
            self.schedule,
            self.num_classes,
            self.shape,
            sampler="ddim",
            steps=self.steps,
            eta=0.0,
            batch_size=self.num_classes,
            seed=self.seed,
            device=self.device,
            labels=labels,
            guidance=self.w,
            num_classes=self.num_classes,
        )
        if distributed.current().is_main:
            torch.save(
                {"images": result.images, "step": torch.tensor(trainer.step)}, self.folder / f"epoch_{epoch:03d}.pt"
            )

    def figure(self, path: Path) -> Path | None:
        files = sorted(self.folder.glob("epoch_*.pt"))
        if not files:
            return None
        rows = []
        for file in files:
            content = torch.load(file, weights_only=True)
            rows.append(
                (f"epoch {file.stem.split('_')[1].lstrip('0') or '0'} (step {int(content['step'])})", content["images"])
            )
        return image_rows_figure(rows, path, f"Samples from fixed noise after every epoch (DDIM-{self.steps})")


def run_mnist_cfg(config: MnistCFGConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """The class-conditional CFG recipe into ``config.run_dir``."""
    wall = time.perf_counter()
    config, device, train, heldout, run, echo = _setup(config, "mnist-cfg", fresh, echo)
    with run.guard():
        seed_everything(config.seed)
        schedule = NoiseSchedule.from_config(config.schedule).to(device)
        logger = RunLogger(run.path)
        classes = config.unet.num_classes
        shape = tuple(train.images.shape[1:])
        echo(
            f"[mnist-cfg] run folder {run.path} | {len(train):,} training images {shape} | "
            f"{describe(config.unet, train.size)} | device {device}"
        )
        if config.guidance.label_dropout == 0:
            echo(
                "[mnist-cfg] warning: guidance.label_dropout=0 never trains the null label, so every w other than 1 "
                "mixes in an untrained unconditional prediction"
            )
        with run.stage("evaluator"):  # rank 0 alone scores; every rank draws its shard of the samples
            evaluator = (
                stages.evaluator_for(config.data, device, echo, config.metrics.inception_weights, (train, heldout))
                if run.main
                else None
            )
        steps_per_epoch = max(len(train) // config.train.batch_size, 1)
        progress = ProgressGrids(run, schedule, steps_per_epoch, shape, classes, config.guidance.w, config.seed, device)
        with run.stage("train"):
            trainer, result = stages.train_image_denoiser(
                run,
                logger,
                train,
                heldout,
                schedule,
                config.unet,
                config.train,
                config.seed,
                device,
                config.progress,
                label_dropout=config.guidance.label_dropout,
                hooks=[progress] if config.guidance.progress_every_epoch else None,
                objective=config.objective,
            )
        ev, guidance = config.metrics, config.guidance
        model = _sampling_model(trainer.eval_model, device, ev.precision)
        common = dict(
            sampler="ddim",
            steps=ev.ddim_steps,
            eta=0.0,
            batch_size=ev.batch_size,
            device=device,
            num_classes=classes,
            show_progress=config.progress,
            precision=ev.precision,
        )
        with run.stage("grid"):
            per = guidance.grid_per_digit
            labels = torch.arange(classes).repeat_interleave(per)
            grid = stages.sample_images(
                model, schedule, len(labels), shape, seed=ev.seed + 1, labels=labels, guidance=guidance.w, **common
            )
            if run.main:
                save_grid(grid.images, run.sub("figures", "digits_grid.png"), nrow=per)
        with run.stage("denoising panel") if run.main else contextlib.nullcontext():
            digits = torch.tensor([0, 3, 7, 9][: max(1, min(4, classes))]) % classes
            guided = stages.guided_model(model, digits.to(device), guidance.w, classes)
            timesteps, xs, x0s = stages.denoising_trajectory(
                guided, schedule, (len(digits), *shape), ev.ddim_steps, 10, ev.seed + 2, device
            )
            panel_rows = []
            for i, digit in enumerate(digits.tolist()):
                panel_rows.append((f"digit {digit}: x_t", xs[:, i]))
                panel_rows.append((f"digit {digit}: predicted x_0", x0s[:, i]))
            panel = run.sub("figures", "denoising_panel.png")
            if run.main:
                image_rows_figure(panel_rows, panel, "DDIM denoising, t = " + ", ".join(map(str, timesteps)))
            recorder = trajectory_recorder(schedule, "ddim", ev.ddim_steps, TRAJECTORY_FRAMES, TRAJECTORY_IMAGES)
            if recorder is not None:  # one digit of each class, guided, for the run browser's trajectory viewer
                labels = torch.arange(TRAJECTORY_IMAGES) % classes
                stages.sample_images(
                    model,
                    schedule,
                    len(labels),
                    shape,
                    seed=ev.seed + 3,
                    labels=labels,
                    guidance=guidance.w,
                    callback=recorder,
                    **common,
                )
                if run.main:
                    recorder.trajectory().save(run.sub(TRAJECTORY_FILE))
        with run.stage("sample"):
            main_labels = stages.balanced_labels(ev.n_samples, classes)
            scored = dict(common, sampler=guidance.sampler, steps=guidance.steps)
            main = stages.sample_images(
                model, schedule, ev.n_samples, shape, seed=ev.seed, labels=main_labels, guidance=guidance.w, **scored
            )
            if run.main:
                stages.save_samples(run.sub("samples", f"cfg_w{guidance.w:g}.pt"), main)
        metrics: dict[str, Any] = {}
        with run.stage("evaluate"):
            metrics["main"] = _evaluate(evaluator, main, main_labels)
            metrics["main"].update(w=guidance.w, seconds_per_1000=main.seconds / len(main.images) * 1000)
        sweep: list[dict[str, Any]] = []
        with run.stage("guidance sweep"):
            sweep_labels = stages.balanced_labels(guidance.n_sweep, classes)
            for w in guidance.sweep:
                if w == guidance.w and guidance.n_sweep <= ev.n_samples:
                    images = stages.SampleResult(main.images[: guidance.n_sweep], sweep_labels, 0.0, 0)
                    seconds = main.seconds * guidance.n_sweep / ev.n_samples
                else:
                    images = stages.sample_images(
                        model,
                        schedule,
                        guidance.n_sweep,
                        shape,
                        seed=ev.seed,
                        labels=sweep_labels,
                        guidance=w,
                        **scored,
                    )
                    seconds = images.seconds
                row = _evaluate(evaluator, images, sweep_labels)
                row.update(w=w, seconds_per_1000=seconds / guidance.n_sweep * 1000)
                sweep.append(row)
        metrics["sweep"] = sweep
        if not run.main:  # rank 0 alone scores, draws and reports
            return run
        with run.stage("evaluate"):
            metrics["calibration"] = _calibration(evaluator, [ev.n_samples, guidance.n_sweep])
        with run.stage("figures"):
            _loss_figure(run, logger, config.objective)
            progress.figure(run.sub("figures", "progress.png"))
        logger.close()
        metrics["model"] = {"parameters": count_parameters(model), "description": _description(config, train.size)}
        metrics["training"] = {
            "step": result.step,
            "seconds": round(result.seconds, 1),
            "final_train_loss": result.final_train_loss,
            "validation": result.final_validation,
            "images_per_second": result.images_per_second(config.train.batch_size),
        }
        metrics["timings_seconds"] = {k: round(v, 1) for k, v in run.timings.items()}
        metrics["timings_seconds"]["total"] = round(time.perf_counter() - wall, 1)
        metrics["targets"] = cfg_targets(metrics)
        metrics["data"] = _data_summary(config.data, train, heldout)
        metrics["evaluator"] = _evaluator_summary(evaluator, config.data)
        metrics["device"] = str(device)
        run.write_metrics(metrics)
        from difflab.experiments.mnist_reports import build_cfg_report

        run.write_report(build_cfg_report)
        run.complete()
    main_scores = metrics["main"]
    score = f"FID {main_scores['fid']:.2f}" if "fid" in main_scores else "not scored"
    if "accuracy" in main_scores:
        score += f", accuracy {main_scores['accuracy']:.3f}"
    echo(
        f"[mnist-cfg] done in {metrics['timings_seconds']['total']:.0f} s: w={guidance.w:g} {score} | "
        f"report {run.sub('report.md')}"
    )
    return run


def cfg_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars for mnist-cfg at w = 2: accuracy >= 98%, FID below the 'blur 1 px' calibration row,
    every digit present."""
    main = metrics["main"]
    if "fid" not in main or "accuracy" not in main:  # the digit bars need the digit classifier
        return []
    rows = metrics["calibration"].get(str(main["n"]), [])
    blur = next((r["fid"] for r in rows if "blur" in r["name"]), None)
    noise = next((r["fid"] for r in rows if "0.1" in r["name"]), None)
    histogram = main.get("class_histogram", [])
    targets = [
        {"target": "accuracy of the intended digit >= 98%", "value": main["accuracy"], "met": main["accuracy"] >= 0.98},
        {
            "target": "every digit present (>= 5% of samples each)",
            "value": min(histogram) if histogram else None,
            "met": bool(histogram) and min(histogram) >= 0.05,
        },
    ]
    if blur is not None:
        targets.append(
            {"target": "FID below the 'blurred by 1 px' row (bar)", "value": main["fid"], "met": main["fid"] < blur}
        )
    if noise is not None:
        targets.append(
            {
                "target": "FID approaching the 'noise 0.1' row (goal: at most 2x)",
                "value": main["fid"] / noise,
                "met": main["fid"] <= 2 * noise,
            }
        )
    return targets


# --------------------------------------------------------------------------------------------------------------
def load_run_model(
    run_dir: str | Path, device: torch.device | str = "cpu", precision: str = "fp32"
) -> tuple[Any, torch.nn.Module, NoiseSchedule]:
    """``(config, model with its exported weights, schedule)`` of a finished mnist-ddpm or mnist-cfg run, its
    weights in the layout that runs fastest at ``precision`` on ``device``."""
    run_dir = Path(run_dir)
    recipe = read_run(run_dir)["recipe"]
    classes = {"mnist-ddpm": MnistDDPMConfig, "mnist-cfg": MnistCFGConfig}
    if recipe not in classes:
        raise ConfigError(f"{run_dir} is a {recipe!r} run; image sampling works on mnist-ddpm and mnist-cfg runs")
    config = read_run_config(run_dir, classes[recipe]())
    from difflab.models.unet import UNet

    schedule = NoiseSchedule.from_config(config.schedule)
    model = wrap_prediction(UNet(config.unet), config.objective.prediction, schedule)
    load_weights(model, run_dir / "checkpoints" / "denoiser.safetensors")
    schedule = schedule.to(device)
    model = to_fast_layout(model.to(device).eval(), device, precision)
    return config, model, schedule


def class_index(data: ImageDataConfig, label: int | str, classes: int, run_dir: str | Path | None = None) -> int:
    """The label index that ``--digit`` / ``--class`` names: the name of one of the run's classes (those it recorded
    at training, :func:`~difflab.experiments.images.recorded_classes`; for older image-folder runs the folder's
    current listing), else an index 0 .. ``classes`` - 1. A name wins over an index, so a folder class named
    ``10`` is that class, not label 10."""
    text = str(label)
    numeric = isinstance(label, int) or text.lstrip("+-").isdigit()
    names = recorded_classes(run_dir) if run_dir is not None else None
    if names is None and data.source == "imagefolder" and not numeric:
        names = image_folder_classes(data.path)
    if names is not None and text in names:
        index = names.index(text)
    elif numeric:
        index = int(text)
    elif names is not None:
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise ConfigError(f"the run has no class {text!r}; its classes: {shown}")
    else:
        raise ConfigError(f"--digit must be a class index 0 .. {classes - 1} for {data.source} data, got {text!r}")
    if not 0 <= index < classes:
        raise ConfigError(f"--digit must name a class or be an index 0 .. {classes - 1}, got {text!r}")
    return index


def sample_from_run(
    run_dir: str | Path,
    n: int = 16,
    digit: int | str | None = None,
    guidance: float = 1.0,
    sampler: str = "ddim",
    steps: int = 50,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    eta: float = 0.0,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> Path:
    """``difflab sample RUN --digit 7 --guidance 2 --n 16 --sampler ddim --steps 50``: a grid PNG (and the
    tensors as .pt beside it). Without ``digit`` a conditional model samples with its null label, or, with a
    ``guidance`` other than 1, every class in turn guided at that w. ``eta`` is DDIM's (0: the ODE, 1: DDPM's
    posterior variance); ``options`` go to any other registry sampler's function (e.g. ``{"spacing": "karras",
    "eta": 0.5}``); ``precision="bf16"`` runs the network under bf16 autocast (``--precision bf16``). Returns the
    PNG path."""
    resolved = resolve_device(device)
    config, model, schedule = load_run_model(run_dir, resolved, precision)
    classes = config.unet.num_classes
    labels = None
    if digit is None and guidance != 1.0:
        if not classes:
            raise ConfigError(
                f"{run_dir} holds an unconditional model: --guidance {guidance:g} needs a class-conditional "
                "(mnist-cfg) run"
            )
        labels = torch.arange(n) % classes  # every class in turn, guided at w
    if digit is not None:
        if not classes:
            raise ConfigError(f"{run_dir} holds an unconditional model: --digit needs a mnist-cfg run")
        digit = class_index(config.data, digit, classes, run_dir)
        labels = torch.full((n,), digit, dtype=torch.long)
    shape = image_shape(config)
    result = stages.sample_images(
        model,
        schedule,
        n,
        shape,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=min(n, 500),
        seed=seed,
        device=resolved,
        labels=labels,
        guidance=guidance,
        num_classes=classes,
        options=options,
        precision=precision,
    )
    word = "digit" if config.data.source in ("mnist", "digits") else "class"
    if not classes:
        digit_tag = ""  # an unconditional model: no label, no guidance
    elif digit is not None:
        digit_tag = f"{word}{digit}_w{guidance:g}_"
    else:  # the null label (w = 1: unconditional), or every class in turn at w
        digit_tag = "uncond_" if guidance == 1.0 else f"every{word}_w{guidance:g}_"
    tags = option_tags({**({"eta": eta} if eta else {}), **(options or {})}, "_")
    tags += "_bf16" if precision != "fp32" else ""
    name = f"sample_{digit_tag}{sampler}{steps}{tags}_seed{seed}"
    path = Path(out).with_suffix(".png") if out else Path(run_dir) / "samples" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(result.images, path, nrow=max(1, int(n**0.5)))
    stages.save_samples(path.with_suffix(".pt"), result)
    return path


def image_shape(config: Any) -> tuple[int, int, int]:
    """(C, H, W) of one image of an image run's config."""
    return (config.unet.in_channels, *(_image_size(config),) * 2)


def _image_size(config: Any) -> int:
    if config.data.source == "mnist":
        return 28
    if config.data.source == "digits":
        return 8
    return config.data.size


# Image recipes whose samples (``samples/*.pt`` with ``images``) ``difflab evaluate`` scores.
EVALUATED_RECIPES = ("mnist-ddpm", "mnist-cfg", "mnist-ncsn", "mnist-ldm")


def evaluate_run(
    run_dir: str | Path, inception_weights: str = "", device: str = "auto", echo: Callable[[str], object] = print
) -> dict[str, Any]:
    """``difflab evaluate RUN``: score every sample file of an image run (:data:`EVALUATED_RECIPES`;
    ``samples/*.pt`` holding ``images`` and optionally ``labels``) with the built-in evaluator, with calibration
    rows at each sample count; writes ``RUN/evaluation.json`` and returns its content."""
    import json

    from difflab.experiments import recipes

    run_dir = Path(run_dir)
    recipe = read_run(run_dir).get("recipe")
    if recipe not in EVALUATED_RECIPES:
        raise ConfigError(f"{run_dir} is a {recipe!r} run; difflab evaluate scores {', '.join(EVALUATED_RECIPES)} runs")
    config = read_run_config(run_dir, recipes()[recipe].config_class())
    resolved = resolve_device(device)
    evaluator = stages.evaluator_for(
        config.data,
        resolved,
        echo,
        inception_weights or getattr(getattr(config, "metrics", None), "inception_weights", ""),
        lambda: stages.load_image_data(config.data, config.seed),
    )
    if evaluator is None:
        raise ConfigError(
            f"{run_dir} was trained on {config.data.source!r} data: {stages.no_evaluator_reason(config.data)}"
        )
    files = sorted((run_dir / "samples").glob("*.pt"))
    if not files:
        raise ConfigError(f"{run_dir}/samples holds no sample files to evaluate")
    results: dict[str, Any] = {"samples": {}, "calibration": {}}
    for file in files:
        try:
            content = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged or foreign file
            raise ConfigError(
                f"cannot read {file} as a sample file ({torch_load_problem(exc)}); move it out of "
                "samples/ or draw it again"
            ) from None
        if not isinstance(content, dict) or "images" not in content:  # not written by difflab: said, not scored
            results.setdefault("skipped", {})[file.name] = "not a difflab sample file: no 'images' tensor"
            continue
        images, labels = content["images"], content.get("labels")
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
            found = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ConfigError(f"{file}: 'images' must be a float tensor (N, C, H, W), got {found}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.is_floating_point()):
            raise ConfigError(f"{file}: 'labels' must be an integer tensor (N,), got {type(labels).__name__}")
        if len(images) < 2:  # `difflab sample --n 1`: a picture, not a set a FID can describe
            results.setdefault("skipped", {})[file.name] = f"{len(images)} image(s): a FID needs 2 or more"
            continue
        try:
            results["samples"][file.name] = evaluator.evaluate(images, labels)
        except DataError as exc:
            raise DataError(f"{file}: {exc}") from None
    if not results["samples"]:
        raise ConfigError(f"{run_dir}/samples holds no set of 2 or more images to evaluate")
    counts = sorted({r["n"] for r in results["samples"].values() if r["n"] > 1})
    results["calibration"] = _calibration(evaluator, counts)
    # The floor of the metric itself: (up to) 10,000 real training images against the reference set.
    results["real_vs_real"] = evaluator.real_vs_real_floor(min(10_000, len(evaluator.train)))
    results["evaluator"] = evaluator.summary()
    (run_dir / "evaluation.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    return results


# -------------------------------------------------------------------------------------- sampler comparison, likelihood
# Width of one quantisation bin in [-1, 1] units: the step between a source's gray levels.
BIN_WIDTHS = {source: 2.0 / (levels - 1) for source, levels in QUANTISATION_LEVELS.items()}


class BalancedGuidance(torch.nn.Module):
    """An unconditional view of a class-conditional U-Net for the sampler comparison: a batch of B samples gets
    the labels ``arange(B) % K`` (every digit equally often), or all the label ``digit`` when one is given,
    combined by classifier-free guidance at ``w``."""

    def __init__(self, network: torch.nn.Module, num_classes: int, w: float, digit: int | None = None) -> None:
        super().__init__()
        from difflab.sampling.guidance import ClassifierFreeGuidance

        self.network, self.num_classes, self.digit = network, num_classes, digit
        self.guided = ClassifierFreeGuidance(network, 0, null_label=num_classes, w=w)

    def labels_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """The labels of a batch: (batch,) int64 on ``device``, all ``digit`` or ``arange(batch) % K``."""
        if self.digit is not None:
            return torch.full((batch,), self.digit, device=device, dtype=torch.long)
        return torch.arange(batch, device=device) % self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), t: (B,) -> the guided eps (B, C, H, W) (a learned variance's channels appended)."""
        self.guided.labels = self.labels_for(x.shape[0], x.device)
        return self.guided(x, t)


class NullLabel(torch.nn.Module):
    """``network(x, t, null label)``: the unconditional model a classifier-free-guidance network also is."""

    def __init__(self, network: torch.nn.Module, null_label: int) -> None:
        super().__init__()
        self.network, self.null_label = network, null_label

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, ...), t: (B,) -> ``network(x, t, null label)``, (B, ...)."""
        return self.network(x, t, torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long))


def load_sampling_target(path: Path, config: Any, device: torch.device) -> Any:
    """The :class:`~difflab.experiments.samplers.SamplingTarget` of a finished mnist-ddpm / mnist-cfg run, for
    ``difflab compare-samplers`` and ``difflab likelihood``.

    Quality is FID by the built-in evaluator (MNIST, or an image folder with Inception weights; real images
    outside the reference set at the same n are the reference row). Samplers see the model with x_0
    predictions clipped to [-1, 1], as the recipe samples; a class-conditional run is sampled at its
    ``guidance.w`` with every digit equally often. The likelihood uses the unclipped model (the probability-flow
    ODE needs a smooth eps; a class-conditional run: its null label, i.e. log p(x)) on the held-out images,
    dequantised uniformly within their 8-bit (or 17-level) bins.
    """
    from difflab.experiments.samplers import SamplingTarget
    from difflab.sampling.wrappers import DiffusionModel

    weights = path / "checkpoints" / "denoiser.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{path} has no trained denoiser ({weights} is missing); finish the run first")
    config, network, schedule = load_run_model(path, device)
    classes = config.unet.num_classes
    sampled = BalancedGuidance(network, classes, config.guidance.w) if classes else network
    unconditional = NullLabel(network, classes) if classes else network
    train, heldout = stages.load_image_data(config.data, config.seed)
    evaluator = stages.evaluator_for(
        config.data, device, lambda _: None, config.metrics.inception_weights, (train, heldout)
    )
    metrics, references_at = stages.fid_scoring(evaluator)
    guidance = f", guidance w = {config.guidance.w:g} (labels 0-9 in turn)" if classes else ""
    return SamplingTarget(
        path=path,
        recipe=config.recipe,
        model=DiffusionModel(sampled, schedule, "eps", clip_x0=1.0),
        schedule=schedule,
        sample_shape=image_shape(config),
        device=device,
        metrics=metrics,
        plot=lambda samples, out, title: save_grid(samples[:64], out, nrow=8),
        heldout=heldout.images,
        batch_size=config.metrics.batch_size,
        likelihood_model=DiffusionModel(unconditional, schedule, "eps"),
        bin_width=BIN_WIDTHS.get(config.data.source),
        references_at=references_at,
        description=f"{describe(config.unet, _image_size(config))}{guidance}; x_0 predictions clipped to [-1, 1]",
    )
