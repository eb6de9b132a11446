"""Pieces shared by the NCSN recipes (``mnist-ncsn``, ``states-ncsn``, ``swissroll-ncsn``): the Langevin
settings, training a score network by denoising score matching, and batched annealed Langevin sampling."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from difflab.data.batches import ShuffledBatches
from difflab.diffusion.score_matching import dsm_loss, dsm_terms, dsm_validation
from difflab.errors import ConfigError
from difflab.experiments.runs import RunFolder
from difflab.sampling.common import batched
from difflab.sampling.langevin import INITS, annealed_langevin, network_evaluations
from difflab.seeding import mix_seed, seeded_generator
from difflab.training import distributed
from difflab.training.logging import RunLogger, read_series
from difflab.training.trainer import TrainConfig, Trainer, TrainResult
from difflab.viz import plots2d


@dataclass(frozen=True)
class LangevinConfig:
    """Annealed Langevin dynamics (``sampling.langevin.annealed_langevin``): step ``alpha_i = c sigma_i^2``
    (Song & Ermon's ``epsilon sigma_i^2 / sigma_L^2`` with ``epsilon = c sigma_L^2``), ``steps_per_level``
    (T) steps at each level, the final Tweedie denoising step ``x + sigma_L^2 s(x, sigma_L)`` when
    ``denoise``, the chain started from ``init`` (``uniform`` on [-1, 1] or ``gaussian`` N(0, sigma_max^2)),
    ``batch_size`` chains at a time."""

    c: float = 0.1
    steps_per_level: int = 100
    denoise: bool = True
    init: str = "uniform"
    batch_size: int = 128

    def __post_init__(self) -> None:
        if self.c <= 0 or self.steps_per_level < 1 or self.batch_size < 1:
            raise ConfigError("langevin needs c > 0, steps_per_level >= 1 and batch_size >= 1")
        if self.init not in INITS:
            raise ConfigError(f"langevin.init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass
class LangevinSamples:
    """What :func:`sample_langevin` returns: samples (N, ...), the first batch's trajectory, wall time, NFE."""

    samples: torch.Tensor
    trajectory: list[tuple[int, float, torch.Tensor]]
    seconds: float
    network_evaluations: int
    settings: dict[str, Any] = field(default_factory=dict)


def sample_langevin(
    model: torch.nn.Module,
    sigmas: torch.Tensor,
    n: int,
    shape: tuple[int, ...],
    langevin: LangevinConfig,
    seed: int,
    device: torch.device,
    *,
    c: float | None = None,
    steps_per_level: int | None = None,
    record_levels: tuple[int, ...] = (),
    show_progress: bool = False,
) -> LangevinSamples:
    """``n`` samples by annealed Langevin dynamics in batches of ``langevin.batch_size`` (``c`` and
    ``steps_per_level`` override the config's). Batch b draws from a generator seeded by ``(seed, b)``
    and draws its starting point first, so every setting starts from the same chains (common random
    numbers for a sweep). The first batch records ``record_levels`` (see ``annealed_langevin``).

    Under torchrun rank r draws the batches b = r, r + W, ... and every rank receives all of them: the samples are
    the single process's, whatever the number of processes (the trajectory is rank 0's, which draws batch 0)."""
    c = langevin.c if c is None else c
    steps = langevin.steps_per_level if steps_per_level is None else steps_per_level
    context = distributed.current()
    sizes = list(batched(n, langevin.batch_size))
    drawn, trajectory, start = {}, [], time.perf_counter()
    for b in range(context.rank, len(sizes), context.world_size):
        generator = seeded_generator(mix_seed(seed, b, 17), device)
        x, recorded = annealed_langevin(
            model,
            sigmas,
            (sizes[b], *shape),
            c=c,
            steps_per_level=steps,
            denoise=langevin.denoise,
            init=langevin.init,
            generator=generator,
            device=device,
            record_levels=record_levels if b == 0 else None,
            show_progress=show_progress and context.is_main,
        )
        drawn[b] = x.detach().cpu()
        trajectory = trajectory or recorded
    if context.enabled:
        for part in distributed.gather_objects(drawn, context):
            drawn.update(part)
    nfe = n * network_evaluations(len(sigmas), steps, langevin.denoise)
    return LangevinSamples(
        torch.cat([drawn[b] for b in range(len(sizes))]),
        trajectory,
        time.perf_counter() - start,
        nfe,
        {"c": c, "steps_per_level": steps, "denoise": langevin.denoise, "init": langevin.init},
    )


def dsm_level_validation(
    sigmas: torch.Tensor, points: torch.Tensor, device: torch.device, seed: int
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """DSM loss of held-back points at every level with fixed noise: ``loss`` (the mean over levels, the
    training objective's expectation) and ``level_i`` for each level i."""
    x0, sigma, noise = dsm_validation(sigmas, points.to(device), seeded_generator(mix_seed(seed, 0, 33)))
    count, levels = points.shape[0], len(sigmas)

    def validate(model: torch.nn.Module) -> dict[str, float]:
        terms = torch.cat(
            [dsm_terms(model, x0[i : i + 512], sigma[i : i + 512], noise[i : i + 512]) for i in range(0, len(x0), 512)]
        )
        per_level = terms.reshape(levels, count).mean(dim=1)
        values = {"loss": float(per_level.mean())}
        values.update({f"level_{i}": float(v) for i, v in enumerate(per_level)})
        return values

    return validate


def train_score_model(
    run: RunFolder,
    logger: RunLogger,
    model: torch.nn.Module,
    signature: dict[str, Any],
    train_points: torch.Tensor,
    validation_points: torch.Tensor,
    sigmas: torch.Tensor,
    config: TrainConfig,
    seed: int,
    device: torch.device,
    show_progress: bool,
    hooks: list[Callable[[Trainer], None]] | None = None,
) -> tuple[torch.nn.Module, TrainResult]:
    """Train (or resume) ``model`` by denoising score matching (``dsm_loss``, levels drawn uniformly);
    returns the weights to sample with (EMA when on) in eval mode and the result."""
    batches = ShuffledBatches((train_points.to(device),), config.batch_size, seed=mix_seed(seed, 0, 34))
    device_sigmas = sigmas.to(device)

    def loss_fn(net: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """batch: (x0 (B, ...),), points or images -> :func:`dsm_loss`, a scalar."""
        return dsm_loss(net, batch[0], device_sigmas, generator)

    trainer = Trainer(
        "score",
        model,
        loss_fn,
        batches,
        config,
        run.path,
        logger,
        validate=dsm_level_validation(sigmas, validation_points, device, seed),
        signature=signature,
        seed=mix_seed(seed, 0, 35),
        device=device,
        show_progress=show_progress,
        hooks=hooks,
    )
    result = trainer.fit()
    return trainer.eval_model.eval(), result


def dsm_loss_figure(run: RunFolder, logger: RunLogger, sigmas: torch.Tensor, title: str) -> Any:
    """Training and validation DSM loss, and the validation loss at the largest, middle and smallest level."""
    series = {
        "train": read_series(logger.path, "score/train_loss"),
        "validation (mean over levels)": read_series(logger.path, "score/val_loss"),
    }
    for i in sorted({0, len(sigmas) // 2, len(sigmas) - 1}):
        series[f"validation, sigma = {float(sigmas[i]):.3g}"] = read_series(logger.path, f"score/val_level_{i}")
    return plots2d.curves(series, run.sub("figures", "loss.png"), title, ylabel="DSM loss")
