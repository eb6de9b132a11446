"""NCSN on 2-D points: ``states-ncsn`` (the five STATES outlines) and ``swissroll-ncsn``.

A noise-conditional score MLP ``s_theta(x, sigma)`` trained by denoising score matching at K geometric
noise levels, sampled by annealed Langevin dynamics, scored with the STATES metrics (KDE negative
log-likelihoods, per-outline shares), with figures of the learned score field at three noise levels next
to the exact score of the noised training set, the Langevin trajectory and the loss curves.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from difflab.data.points import PointCloud
from difflab.data.states import load_states
from difflab.data.toy import make_toy
from difflab.diffusion.score_matching import NoiseLevelsConfig
from difflab.errors import ConfigError
from difflab.experiments import ncsn_common, points2d, states
from difflab.experiments.ncsn_common import LangevinConfig
from difflab.experiments.runs import RunFolder, setup_ranks, trained_only
from difflab.metrics import points as point_metrics
from difflab.models.score import ScoreMLP
from difflab.report import sections
from difflab.report.document import Report
from difflab.report.markdown import figure_lines, table
from difflab.report.rundata import RunContents
from difflab.sampling.langevin import network_evaluations
from difflab.seeding import mix_seed, seed_everything
from difflab.training.logging import RunLogger
from difflab.training.trainer import TrainConfig
from difflab.viz import plots2d

POINT_RECIPES = {"states-ncsn": "states", "swissroll-ncsn": "swissroll"}
STATES_NLL_COURSE_MAX = 2.30
OUTPUT_WORDS = {"scaled": "the MLP predicts sigma s, divided by sigma", "direct": "the MLP predicts the score"}


@dataclass(frozen=True)
class PointsNCSNDataConfig:
    """STATES: the shipped 5,000 training / 5,000 held-out points (``n_train``, ``n_heldout`` and ``noise`` do not
    apply; values other than the defaults are refused). Swiss roll: ``n_train`` points (seed 0) and ``n_heldout``
    (seed 1) with ``noise``.
    ``val_fraction`` of the training points is held back for the validation loss."""

    n_train: int = 5000
    n_heldout: int = 5000
    noise: float = 0.0
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.n_train < 10 or self.n_heldout < 10 or not 0 < self.val_fraction < 1:
            raise ConfigError(
                "data needs n_train >= 10, n_heldout >= 10 and val_fraction in (0, 1), got "
                f"{self.n_train}, {self.n_heldout} and {self.val_fraction}"
            )


@dataclass(frozen=True)
class ScoreMLPConfig:
    """``models.score.ScoreMLP``: hidden widths, activation, how log sigma enters, and the output
    (``scaled``: the MLP predicts ``sigma s`` and the model returns it divided by sigma; ``direct``)."""

    hidden: tuple[int, ...] = (256, 256, 256, 256)
    activation: str = "silu"
    sigma_encoding: str = "sinusoidal"
    embedding_dim: int = 32
    log_sigma_scale: float = 100.0
    output: str = "scaled"


@dataclass(frozen=True)
class PointsSamplingConfig:
    n: int = 5000
    seed: int = 1234


@dataclass(frozen=True)
class PointsFigureConfig:
    """Noise-level indices (0 = sigma_max) of the score-field figure and of the Langevin trajectory."""

    score_levels: tuple[int, ...] = (2, 5, 8)
    trajectory_levels: tuple[int, ...] = (0, 3, 5, 7, 9)
    grid: int = 25


@dataclass(frozen=True)
class PointsNCSNConfig:
    """A 2-D NCSN run; ``configs/states-ncsn.yaml`` / ``configs/swissroll-ncsn.yaml`` hold these defaults.

    sigma_max = 3 is about the largest distance between two training points (Song & Ermon 2020,
    technique 1; data standardised to unit variance), so the Langevin chain starts from
    N(0, sigma_max^2), which covers every outline.
    """

    AFTER_TRAINING_KEYS: ClassVar[tuple[str, ...]] = ("langevin", "sampling", "figures")  # training never reads them

    recipe: str = "states-ncsn"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/states-ncsn"
    progress: bool = True
    data: PointsNCSNDataConfig = field(default_factory=PointsNCSNDataConfig)
    noise: NoiseLevelsConfig = field(default_factory=lambda: NoiseLevelsConfig(3.0, 0.01, 10))
    model: ScoreMLPConfig = field(default_factory=ScoreMLPConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=6000,
            batch_size=1024,
            lr=2e-3,
            warmup_steps=100,
            ema_decay=0.995,
            eval_every=500,
            log_every=50,
            checkpoint_every=1000,
        )
    )
    langevin: LangevinConfig = field(
        default_factory=lambda: LangevinConfig(c=0.1, steps_per_level=100, init="gaussian", batch_size=5000)
    )
    sampling: PointsSamplingConfig = field(default_factory=PointsSamplingConfig)
    figures: PointsFigureConfig = field(default_factory=PointsFigureConfig)

    def __post_init__(self) -> None:
        if self.recipe not in POINT_RECIPES:
            raise ConfigError(f"recipe must be one of {', '.join(POINT_RECIPES)}, got {self.recipe!r}")
        shipped = PointsNCSNDataConfig()
        changed = [k for k in ("n_train", "n_heldout", "noise") if getattr(self.data, k) != getattr(shipped, k)]
        if POINT_RECIPES[self.recipe] == "states" and changed:
            keys, verb = " and ".join(f"data.{k}" for k in changed), "does" if len(changed) == 1 else "do"
            raise ConfigError(f"states-ncsn trains on the shipped STATES points: {keys} {verb} not apply")
        levels = self.noise.num_levels
        for key in ("score_levels", "trajectory_levels"):
            bad = [i for i in getattr(self.figures, key) if not 0 <= i < levels]
            if bad:
                raise ConfigError(f"figures.{key} {bad} outside the noise levels 0..{levels - 1}")
            if not getattr(self.figures, key):
                raise ConfigError(f"figures.{key} must list at least one noise level (0..{levels - 1})")
        if self.figures.grid < 2:
            raise ConfigError(f"figures.grid must be >= 2 (points per side of the score map), got {self.figures.grid}")
        if self.sampling.n < 3:
            raise ConfigError("sampling.n must be >= 3 (the KDE metrics need more points than dimensions)")


def points_config_class(name: str) -> Any:
    """The zero-argument default-config factory of recipe ``name`` (``states-ncsn`` or ``swissroll-ncsn``)."""

    def factory(**kwargs: Any) -> PointsNCSNConfig:
        defaults: dict[str, Any] = {"recipe": name, "run_dir": f"runs/{name}"}
        defaults.update(kwargs)
        return PointsNCSNConfig(**defaults)

    factory.__name__ = f"{name.replace('-', '_')}_config"
    return factory


def build_score_mlp(config: ScoreMLPConfig) -> ScoreMLP:
    return ScoreMLP(
        2,
        config.hidden,
        config.activation,
        config.sigma_encoding,
        config.embedding_dim,
        config.log_sigma_scale,
        config.output,
    )


def load_points(config: PointsNCSNConfig) -> tuple[PointCloud, PointCloud]:
    source = POINT_RECIPES[config.recipe]
    if source == "states":
        return load_states("train"), load_states("heldout")
    return (
        make_toy(source, config.data.n_train, config.data.noise, seed=0),
        make_toy(source, config.data.n_heldout, config.data.noise, seed=1),
    )


def empirical_score(points: torch.Tensor, data: torch.Tensor, sigma: float, chunk: int = 1024) -> torch.Tensor:
    """The exact score of the noised training set ``p_sigma = 1/N sum_i N(x_i, sigma^2 I)`` (what DSM's optimum
    is for the empirical data): ``sum_i r_i(x) (x_i - x) / sigma^2`` with softmax responsibilities.
    points (M, 2), data (N, 2) -> (M, 2)."""
    out = []
    for start in range(0, len(points), chunk):
        x = points[start : start + chunk]
        responsibility = torch.softmax(-torch.cdist(x, data).pow(2) / (2 * sigma**2), dim=1)
        out.append((responsibility @ data - x) / sigma**2)
    return torch.cat(out)


def run_points_ncsn(
    config: PointsNCSNConfig, fresh: bool = False, echo: Callable[[str], object] = print, train_only: bool = False
) -> RunFolder:
    """Run a 2-D NCSN recipe into ``config.run_dir``; returns the completed run folder (``train_only``:
    ``difflab train``, the score network alone)."""
    wall = time.perf_counter()
    device, echo = setup_ranks(config, echo)
    train_cloud, heldout_cloud = load_points(config)
    run = RunFolder.open(config.run_dir, config.recipe, config, fresh=fresh)
    with run.guard():
        _run(run, config, device, train_cloud, heldout_cloud, wall, echo, train_only)
    return run


def train_points_ncsn(
    config: PointsNCSNConfig, fresh: bool = False, echo: Callable[[str], object] = print
) -> RunFolder:
    """``difflab train states-ncsn`` (``swissroll-ncsn``): the score network's training and its weights alone."""
    return run_points_ncsn(config, fresh, echo, train_only=True)


def _run(
    run: RunFolder,
    config: PointsNCSNConfig,
    device: torch.device,
    train_cloud: PointCloud,
    heldout_cloud: PointCloud,
    wall: float,
    echo,
    train_only: bool = False,
) -> None:
    seed_everything(config.seed)
    sigmas = config.noise.sigmas()
    splits = points2d.make_splits(train_cloud, heldout_cloud, config.data.val_fraction, config.seed)
    logger = RunLogger(run.path)
    echo(
        f"[{config.recipe}] run folder {run.path} | {len(train_cloud)} training points | {len(sigmas)} noise levels "
        f"{float(sigmas[0]):g} .. {float(sigmas[-1]):g} | device {device}"
    )
    with run.stage("train score network"):
        torch.manual_seed(mix_seed(config.seed, 0, 36))
        model = build_score_mlp(config.model).to(device)
        signature = {"model": "ScoreMLP", "config": repr(config.model), "noise": repr(config.noise)}
        model, result = ncsn_common.train_score_model(
            run,
            logger,
            model,
            signature,
            splits.fit.data,
            splits.validation.data,
            sigmas,
            config.train,
            config.seed,
            device,
            config.progress,
        )
    if train_only:
        logger.close()
        trained_only(run, config.recipe, wall, echo)
        return
    with run.stage("sample (annealed Langevin)"):
        drawn = ncsn_common.sample_langevin(
            model,
            sigmas,
            config.sampling.n,
            (2,),
            config.langevin,
            config.sampling.seed,
            device,
            record_levels=config.figures.trajectory_levels,
            show_progress=config.progress,
        )
        samples = drawn.samples
        point_metrics.check_finite(samples, "Langevin samples")
        if run.main:
            torch.save(samples, run.sub("samples", "samples.pt"))
    if not run.main:  # every rank drew its batches of the samples; rank 0 alone scores and reports
        logger.close()
        return
    with run.stage("metrics"):
        metrics = states.compute_metrics(splits, samples, [], None, device, train_cloud.names)
        metrics["samples"] = metrics.pop("uncond")
        metrics.pop("cond")
        metrics["sampling"] = {
            **drawn.settings,
            "n": len(samples),
            "seconds": round(drawn.seconds, 2),
            "network_evaluations_per_sample": network_evaluations(
                len(sigmas), drawn.settings["steps_per_level"], drawn.settings["denoise"]
            ),
        }
    with run.stage("figures"):
        data = train_cloud.data
        plots2d.scatter_over_data(
            samples, data, run.sub("figures", "samples.png"), f"{config.recipe}: annealed Langevin samples"
        )
        plots2d.panels(
            [(f"level {i}: σ = {sigma:.3g}" if i < len(sigmas) else "denoised", x) for i, sigma, x in drawn.trajectory],
            run.sub("figures", "langevin_trajectory.png"),
            "Annealed Langevin dynamics: the chains after each level",
            reference=data,
        )
        score_field_figures(run, model, data, sigmas, config.figures, device)
        ncsn_common.dsm_loss_figure(run, logger, sigmas, "Denoising score matching loss")
    logger.close()
    total = time.perf_counter() - wall
    summary = asdict(result)
    summary["seconds"] = round(summary["seconds"], 2)
    metrics["training"] = summary
    metrics["noise_levels"] = [round(float(s), 6) for s in sigmas]
    metrics["timings_seconds"] = {k: round(v, 2) for k, v in run.timings.items()} | {"total": round(total, 2)}
    metrics["targets"] = points_targets(config, metrics)
    run.write_metrics(metrics)
    run.write_report(build_report)
    run.complete()
    echo(
        f"[{config.recipe}] done in {total:.0f} s: nll_course {metrics['samples']['nll_course']:.3f} "
        f"(real {metrics['real']['nll_course']:.3f}), nll_reverse {metrics['samples']['nll_reverse']:.3f}"
    )


def score_field_figures(
    run: RunFolder,
    model: torch.nn.Module,
    data: torch.Tensor,
    sigmas: torch.Tensor,
    figures: PointsFigureConfig,
    device: torch.device,
) -> dict[str, Path]:
    """The learned score and the exact score of the noised training set on a grid, at ``figures.score_levels``."""
    low, high = data.min(0).values - 0.6, data.max(0).values + 0.6
    xs = torch.linspace(float(low[0]), float(high[0]), figures.grid)
    ys = torch.linspace(float(low[1]), float(high[1]), figures.grid)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)
    learned, exact = [], []
    for i in figures.score_levels:
        sigma = float(sigmas[i])
        with torch.inference_mode():
            vectors = model(grid.to(device), torch.full((len(grid),), sigma, device=device)).cpu()
        caption = f"σ = {sigma:.3g} (level {i})"
        learned.append((caption, grid, vectors))
        exact.append((caption, grid, empirical_score(grid, data, sigma)))
    return {
        "score_field": plots2d.score_field(
            learned,
            data,
            run.sub("figures", "score_field.png"),
            "Learned score s_θ(x, σ) (arrows: direction; colour: log |s|)",
        ),
        "score_field_exact": plots2d.score_field(
            exact,
            data,
            run.sub("figures", "score_field_exact.png"),
            "Exact score of the noised training set, for comparison",
        ),
    }


def points_targets(config: PointsNCSNConfig, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    if config.recipe != "states-ncsn":
        return []
    value = metrics["samples"]["nll_course"]
    return [
        {
            "target": f"STATES nll_course <= {STATES_NLL_COURSE_MAX} with annealed Langevin",
            "value": value,
            "met": value <= STATES_NLL_COURSE_MAX,
        }
    ]


def build_report(contents: RunContents) -> Report:
    """A ``states-ncsn`` / ``swissroll-ncsn`` run's report, from its folder alone (``difflab report RUN``)."""
    config = contents.typed_config(points_config_class(contents.recipe)())
    metrics, folder, figures = contents.metrics, contents.path, contents.figure_file
    s, r, sampling = metrics["samples"], metrics["real"], metrics["sampling"]
    noise, train = config.noise, metrics["training"]
    lines = [
        f"# {config.recipe}: a noise-conditional score network sampled by annealed Langevin dynamics",
        "",
        f"Run folder `{folder}`; config in `config.yaml`; every number below is also in `metrics.json`.",
        "",
        f"Score MLP {list(config.model.hidden)} on `[x, enc(log sigma)]` (`{config.model.sigma_encoding}`), output "
        f"`{config.model.output}` ({OUTPUT_WORDS[config.model.output]}); "
        f"K = {noise.num_levels} noise levels geometric from sigma_max = {noise.sigma_max:g} to sigma_min = "
        f"{noise.sigma_min:g}; denoising score matching with lambda(sigma) = sigma^2, levels drawn uniformly. "
        f"Annealed Langevin dynamics: alpha_i = c sigma_i^2 with c = {sampling['c']:g}, T = "
        f"{sampling['steps_per_level']} steps per level ({sampling['network_evaluations_per_sample']:,} network "
        f"evaluations per sample), chains started from "
        f"{'N(0, sigma_max^2)' if sampling['init'] == 'gaussian' else 'uniform noise on [-1, 1]'}, final denoising "
        f"step x + sigma_L^2 s(x, sigma_L) {'on' if sampling['denoise'] else 'off'}.",
        "",
        "## Samples",
        "",
        f"{s['n']:,} samples in {sampling['seconds']:.1f} s. Scores are mean negative log-likelihoods in nats under "
        "Gaussian KDEs (Scott's rule); lower is better.",
        "",
        table(
            ["metric", "samples", "real held-out data (floor)"],
            [
                ["nll_course (KDE of training points)", s["nll_course"], r["nll_course"]],
                ["nll_heldout (KDE of held-out points)", s["nll_heldout"], r["nll_heldout"]],
                ["nll_reverse (held-out under KDE of samples)", s["nll_reverse"], r["nll_reverse"]],
            ],
        ),
        "",
    ]
    if len(s["class_share"]) > 1:
        lines += [
            "Share of samples nearest to each outline (real data: 20% each): "
            + ", ".join(f"{k} {v:.1%}" for k, v in s["class_share"].items())
            + ".",
            "",
        ]
    if metrics["targets"]:
        lines += [
            table(["target", "measured", "met"], [[t["target"], t["value"], t["met"]] for t in metrics["targets"]]),
            "",
        ]
    lines += [
        *figure_lines(figures("samples.png"), folder, "Samples (blue) over the training data (grey)"),
        *figure_lines(
            figures("langevin_trajectory.png"), folder, "The chains after each level (and after the denoising step)"
        ),
        "## The learned score field",
        "",
        *figure_lines(figures("score_field.png"), folder, "Learned score at three noise levels next to the data"),
        *figure_lines(
            figures("score_field_exact.png"),
            folder,
            "Exact score of the training points convolved with N(0, sigma^2 I): DSM's optimum on this data",
        ),
        "## Training",
        "",
        f"{train['step']:,} AdamW steps of batch {config.train.batch_size}, lr {config.train.lr}, EMA "
        f"{config.train.ema_decay or 'off'}, {train['seconds']:.1f} s; final training loss "
        f"{train['final_train_loss'] if train['final_train_loss'] is not None else float('nan'):.4f}. The DSM loss "
        "per level is 1/2 E|| sigma s + z ||^2 (sum over the 2 dimensions); it cannot reach 0 (its minimum is the "
        "variance of the noise given the noisy point).",
        "",
        table(
            ["level", "sigma", "validation DSM loss"],
            [
                [i, float(sig), train["final_validation"].get(f"level_{i}")]
                for i, sig in enumerate(metrics["noise_levels"])
            ],
        ),
        "",
        *figure_lines(figures("loss.png"), folder, "Training and validation loss"),
    ]
    return sections.markdown_report(contents, "\n".join(lines))
