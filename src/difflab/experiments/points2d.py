"""Shared pieces of the 2-D recipes (STATES and the toy walkthroughs): configs, data splits, the
denoiser stage, unconditional sampling with reverse-process snapshots, and the common figures."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.data.batches import ShuffledBatches
from difflab.data.points import PointCloud, split_points
from difflab.diffusion.objectives import NoisyPairs, epsilon_loss, pairs_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import FIXED_VARIANCES
from difflab.errors import ConfigError
from difflab.experiments.runs import RunFolder
from difflab.models.mlp import DenoiserMLP
from difflab.sampling.common import EpsModel, StepCallback, batched, check_output_fits, timestep_list
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.ddpm import ddpm_sample
from difflab.sampling.trajectory import TrajectoryRecorder, choose_frames
from difflab.seeding import mix_seed, seeded_generator
from difflab.training.distributed import sample_sharded, shard_seed
from difflab.training.logging import RunLogger, read_series
from difflab.training.trainer import TrainConfig, Trainer, TrainResult
from difflab.viz import plots2d

TRAIN_MODES = ("fresh", "pairs")
SAMPLERS = ("ddpm", "ddim")


def check_timesteps(key: str, steps: tuple[int, ...], num_timesteps: int) -> None:
    """``steps`` (a figure's timesteps) must be non-empty and within ``[0, num_timesteps]``."""
    if not steps or any(not 0 <= t <= num_timesteps for t in steps):
        raise ConfigError(
            f"{key} must be a non-empty list of timesteps in [0, {num_timesteps}] "
            f"(schedule.num_timesteps = {num_timesteps}), got {list(steps)}"
        )


def check_sampling(prefix: str, sampler: str, steps: int, num_timesteps: int, eta: float = 0.0) -> None:
    """The settings ``<prefix>sampler``, ``<prefix>steps`` (0 = all T, at most T) and ``<prefix>eta`` of a sampling
    stage, checked before any training; DDPM takes all T steps and no eta."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"{prefix}sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if not 0 <= steps <= num_timesteps:
        raise ConfigError(f"{prefix}steps must be in 0..{num_timesteps} (schedule.num_timesteps; 0 = all), got {steps}")
    if eta < 0:
        raise ConfigError(f"{prefix}eta must be >= 0, got {eta}")
    if sampler == "ddpm" and (steps not in (0, num_timesteps) or eta != 0):  # they would be ignored
        raise ConfigError(
            f"{prefix}sampler=ddpm runs all T steps with its fixed variance: {prefix}steps and {prefix}eta are "
            f"DDIM's (set {prefix}steps=0 and {prefix}eta=0, or {prefix}sampler=ddim), got {steps} and {eta}"
        )


def check_variance(key: str, variance: str) -> None:
    """DDPM's fixed variance: ``beta`` or ``posterior`` (beta tilde)."""
    if variance not in FIXED_VARIANCES:
        raise ConfigError(f"{key} must be one of {', '.join(FIXED_VARIANCES)}, got {variance!r}")


@dataclass(frozen=True)
class MLPConfig:
    """An MLP: hidden widths, activation and how the timestep enters (see ``models.mlp.TimeEncoding``)."""

    hidden: tuple[int, ...] = (256, 256, 256, 256)
    activation: str = "silu"
    time_encoding: str = "centered"

    def __post_init__(self) -> None:
        if any(width < 1 for width in self.hidden):  # checked before the run folder is made; [] is a linear map
            raise ConfigError(f"hidden layer widths must be >= 1, got {list(self.hidden)}")


@dataclass(frozen=True)
class DenoiserTrainConfig(TrainConfig):
    """:class:`TrainConfig` plus the choice of the reference's large-batch mode.

    ``mode=fresh`` (default): every batch draws new data points, timesteps and noise.
    ``mode=pairs``: the reference's in-memory ``N x T`` noisy pairs (or a random ``pairs_subset`` of
    them), re-noised every ``refresh_every`` epochs; use ``batch_size`` > 10,000 as the reference does.
    """

    mode: str = "fresh"
    refresh_every: int = 100
    pairs_subset: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in TRAIN_MODES:
            raise ConfigError(f"denoiser_train.mode must be one of {', '.join(TRAIN_MODES)}, got {self.mode!r}")


@dataclass(frozen=True)
class Splits:
    """Training points (split into fit and validation parts) and held-out points."""

    train: PointCloud
    fit: PointCloud
    validation: PointCloud
    heldout: PointCloud


def make_splits(train: PointCloud, heldout: PointCloud, val_fraction: float, seed: int) -> Splits:
    fit, validation = split_points(train, val_fraction, seed)
    return Splits(train=train, fit=fit, validation=validation, heldout=heldout)


def build_denoiser(config: MLPConfig, num_timesteps: int) -> DenoiserMLP:
    return DenoiserMLP(2, config.hidden, num_timesteps, config.time_encoding, config.activation)


def denoiser_validation(
    schedule: NoiseSchedule, points: torch.Tensor, device: torch.device, seed: int
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """Mean eps-MSE of held-back points at 50 evenly spaced timesteps with fixed noise (deterministic)."""
    steps = torch.linspace(0, schedule.num_timesteps - 1, min(50, schedule.num_timesteps)).round().long()
    x0 = points.repeat(len(steps), 1).to(device)
    t = steps.repeat_interleave(len(points)).to(device)
    noise = torch.randn(x0.shape, generator=seeded_generator(mix_seed(seed, 0, 31))).to(device)
    x_t = schedule.q_sample(x0, t, noise)

    def validate(model: torch.nn.Module) -> dict[str, float]:
        return {"loss": float(torch.nn.functional.mse_loss(model(x_t, t), noise))}

    return validate


def train_denoiser(
    run: RunFolder,
    logger: RunLogger,
    splits: Splits,
    schedule: NoiseSchedule,
    model_config: MLPConfig,
    train_config: DenoiserTrainConfig,
    seed: int,
    device: torch.device,
    show_progress: bool,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train (or resume) the eps-prediction MLP; returns the weights to sample with and the result."""
    torch.manual_seed(mix_seed(seed, 0, 41))
    model = build_denoiser(model_config, schedule.num_timesteps).to(device)
    fit = splits.fit.data.to(device)
    if train_config.mode == "pairs":
        batches: Any = NoisyPairs(
            fit,
            schedule,
            train_config.batch_size,
            train_config.refresh_every,
            train_config.pairs_subset,
            seed=mix_seed(seed, 0, 42),
        )

        def loss_fn(net: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
            """batch: (x_t (B, D), t (B,), eps (B, D)) -> :func:`pairs_loss`, a scalar."""
            return pairs_loss(net, batch)
    else:
        batches = ShuffledBatches((fit,), train_config.batch_size, seed=mix_seed(seed, 0, 43))

        def loss_fn(net: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
            """batch: (points (B, D),) -> :func:`epsilon_loss`, a scalar."""
            return epsilon_loss(net, schedule, batch[0], generator)

    signature = {"model": "DenoiserMLP", "config": repr(model_config), "num_timesteps": schedule.num_timesteps}
    trainer = Trainer(
        "denoiser",
        model,
        loss_fn,
        batches,
        train_config,
        run.path,
        logger,
        validate=denoiser_validation(schedule, splits.validation.data, device, seed),
        signature=signature,
        seed=mix_seed(seed, 0, 44),
        device=device,
        show_progress=show_progress,
    )
    result = trainer.fit()
    return trainer.eval_model.eval(), result


def sample_points(
    model: EpsModel,
    schedule: NoiseSchedule,
    n: int,
    *,
    sampler: str,
    steps: int,
    eta: float,
    ddpm_variance: str,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    snapshot_steps: tuple[int, ...] = (),
    show_progress: bool = False,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """``n`` 2-D samples in batches; returns ``(samples (n, 2), snapshots)``.

    ``snapshot_steps`` are DDPM steps (``T`` = pure noise, ``0`` = the output) at which the first batch is
    recorded for the reverse-process figure; DDIM records the nearest visited step. ``callback`` (e.g. a
    :class:`TrajectoryRecorder`) sees every step of the first batch.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    check_output_fits(n, (2,), "points")
    outputs, snapshots = [], []
    wanted = set(snapshot_steps)
    for b, size in enumerate(batched(n, batch_size)):
        record: Callable[[int, int, torch.Tensor, torch.Tensor], None] | None = callback if b == 0 else None
        if b == 0 and wanted:
            visited: dict[int, torch.Tensor] = {}

            def record(
                k: int, t: int, x: torch.Tensor, x0: torch.Tensor, visited: dict = visited, outer=callback
            ) -> None:
                visited[t + 1] = x.detach().cpu().clone()  # x is x_{t+1} in DDPM step numbering
                if outer is not None:
                    outer(k, t, x, x0)

        if sampler == "ddpm":
            x = ddpm_sample(
                model,
                schedule,
                (size, 2),
                generator=generator,
                device=device,
                variance=ddpm_variance,
                callback=record,
                show_progress=show_progress,
            )
        else:
            x = ddim_sample(
                model,
                schedule,
                (size, 2),
                steps=steps or schedule.num_timesteps,
                eta=eta,
                generator=generator,
                device=device,
                callback=record,
                show_progress=show_progress,
            )
        if b == 0 and wanted:
            visited[0] = x.detach().cpu().clone()
            for step in sorted(wanted, reverse=True):
                nearest = min(visited, key=lambda s: abs(s - step))
                snapshots.append((nearest, visited[nearest]))
        outputs.append(x.detach().cpu())
    return torch.cat(outputs), snapshots


def sample_points_sharded(
    model: EpsModel,
    schedule: NoiseSchedule,
    n: int,
    *,
    seed: int,
    sampler: str,
    steps: int,
    eta: float,
    ddpm_variance: str,
    batch_size: int,
    device: torch.device,
    snapshot_steps: tuple[int, ...] = (),
    show_progress: bool = False,
    callback: StepCallback | None = None,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """:func:`sample_points` spread over the ranks of a data-parallel run and gathered on every rank.

    Rank r draws shard r of the ``n`` samples with a generator seeded ``shard_seed(seed, r)``; snapshots
    (and the ``callback``'s steps) come from shard 0. On a single process this is exactly ``sample_points``
    with a generator seeded ``seed``.
    """
    snapshots: list[tuple[int, torch.Tensor]] = []

    def draw(shard: int, count: int) -> torch.Tensor:
        """The ``count`` samples (count, 2) of shard ``shard`` (whose snapshots only shard 0 records)."""
        samples, recorded = sample_points(
            model,
            schedule,
            count,
            sampler=sampler,
            steps=steps,
            eta=eta,
            ddpm_variance=ddpm_variance,
            batch_size=batch_size,
            generator=seeded_generator(shard_seed(seed, shard), device),
            device=device,
            snapshot_steps=snapshot_steps if shard == 0 else (),
            show_progress=show_progress and shard == 0,
            callback=callback if shard == 0 else None,
        )
        snapshots.extend(recorded)
        return samples

    return sample_sharded(draw, n), snapshots


def trajectory_recorder(
    schedule: NoiseSchedule, sampler: str, steps: int, frames: int, points: int
) -> TrajectoryRecorder | None:
    """A recorder of ``frames`` evenly spread timesteps of the first ``points`` samples of ``sampler``
    (``None`` when ``frames`` is 0)."""
    if frames <= 0:
        return None
    num_timesteps = schedule.num_timesteps
    if sampler == "ddpm":
        visited = list(range(num_timesteps - 1, -1, -1))
    else:
        visited = timestep_list(num_timesteps, steps or num_timesteps)
    keep = choose_frames(visited, frames)
    return TrajectoryRecorder(keep, points, {"sampler": sampler, "num_timesteps": str(num_timesteps)})


def forward_figure(data: torch.Tensor, schedule: NoiseSchedule, steps: tuple[int, ...], path: Path, seed: int) -> Path:
    """Scatter of ``q(x_t | x_0)`` at DDPM steps ``steps`` (0 = the data itself)."""
    generator = seeded_generator(mix_seed(seed, 0, 51))
    noise = torch.randn(data.shape, generator=generator)
    snapshots = []
    for step in steps:
        if step < 0 or step > schedule.num_timesteps:
            raise ConfigError(f"figure steps must be between 0 and T={schedule.num_timesteps}, got {step}")
        if step == 0:
            snapshots.append(("t = 0 (data)", data))
            continue
        t = torch.full((len(data),), step - 1, dtype=torch.long)
        alpha_bar = float(schedule.alpha_bar[step - 1])
        snapshots.append((f"t = {step}  (ᾱ = {alpha_bar:.3f})", schedule.q_sample(data, t, noise)))
    return plots2d.panels(snapshots, path, "Forward process q(x_t | x_0)")


def reverse_figure(snapshots: list[tuple[int, torch.Tensor]], data: torch.Tensor, path: Path, title: str) -> Path:
    return plots2d.panels([(f"t = {step}", x) for step, x in snapshots], path, title, reference=data)


def loss_figure(logger: RunLogger, name: str, path: Path, title: str, extra: tuple[str, ...] = ()) -> Path:
    series = {
        "train": read_series(logger.path, f"{name}/train_loss"),
        "validation": read_series(logger.path, f"{name}/val_loss"),
    }
    for tag in extra:
        series[tag] = read_series(logger.path, f"{name}/val_{tag}")
    return plots2d.curves(series, path, title)
