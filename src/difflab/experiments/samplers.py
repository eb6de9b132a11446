"""Sampling, sampler comparison and exact likelihood for a finished run, whatever its recipe.

A *loader* turns a run folder into a :class:`SamplingTarget`: the trained model (as a
:class:`~difflab.sampling.wrappers.DiffusionModel`), its schedule, the shape of one sample, the quality
metrics (name -> function of a sample batch, lower is better), a figure function and held-out data.
Loaders are registered per recipe in :data:`LOADERS`; the 2-D recipes (STATES and the walkthroughs) are
here, and an image recipe adds its own (with FID as the metric) by calling :func:`register_loader`.

    target = load_target("runs/states")
    samples, info = draw_samples(target, "dpmpp-2m", steps=20, n=5000, seed=0)
    rows = compare_samplers(target, ["ddpm", "dpmpp-2m", "heun"], nfes=(10, 20, 50), n=5000, seed=0)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import CheckpointError, ConfigError
from difflab.experiments.runs import option_tags, read_run, read_run_config, resolve_device
from difflab.report.markdown import fmt, table
from difflab.sampling.common import batched, check_output_fits
from difflab.sampling.likelihood import LikelihoodSettings, batched_likelihood, bits_per_dim
from difflab.sampling.solvers import SAMPLERS, get_sampler
from difflab.sampling.wrappers import DiffusionModel
from difflab.seeding import mix_seed, seeded_generator
from difflab.training.checkpoint import atomic_write_bytes, load_weights
from difflab.viz import quality

DEFAULT_NFES = (5, 10, 20, 50, 100, 1000)
DEFAULT_COMPARED = tuple(SAMPLERS)  # every registered sampler

Metric = Callable[[torch.Tensor], float]


@dataclass
class SamplingTarget:
    """What sampling needs from a run folder (see the module docstring)."""

    path: Path
    recipe: str
    model: DiffusionModel
    schedule: NoiseSchedule
    sample_shape: tuple[int, ...]
    device: torch.device
    metrics: dict[str, Metric]
    plot: Callable[[torch.Tensor, Path, str], Path] | None = None
    heldout: torch.Tensor | None = None
    references: dict[str, float] = field(default_factory=dict)  # metric values of real held-out data
    batch_size: int = 5000
    # The model the likelihood integrates (default ``model``; image runs sample with clipped x_0 predictions,
    # which the probability-flow ODE must not see).
    likelihood_model: DiffusionModel | None = None
    # Images: width of one quantisation bin of the held-out data in model units; the likelihood then dequantises
    # them uniformly within their bins and reports bits per dimension.
    bin_width: float | None = None
    # Metric values of real held-out data at a sample count n (image FIDs depend on n), else ``references``.
    references_at: Callable[[int], dict[str, float]] | None = None
    description: str = ""
    # Latent diffusion: maps samples (latents) to images; ``difflab sample`` then saves both.
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None
    # The variational bound of held-out points (N, ...) -> a record with ``bits_per_dim``, reported by
    # ``difflab likelihood`` beside the exact likelihood of the same points (diffusion models with a VLB).
    variational_bound: Callable[[torch.Tensor], dict[str, Any]] | None = None
    # Class-conditional runs that ``difflab sample --digit/--guidance`` can steer: ``conditioned(label, w)`` is the
    # model that samples class ``label`` (an index, or an image folder's class name; None: every class in turn)
    # at guidance ``w`` (None: the run's own).
    conditioned: Callable[[int | str | None, float | None], DiffusionModel] | None = None
    # ...and the class index a ``--digit`` value names (an index, or an image folder's class name)
    class_index: Callable[[int | str], int] | None = None
    # 2-D runs: KDE scores of given held-out points (N, 2), beside their exact likelihood in ``difflab likelihood``
    kde_scores: Callable[[torch.Tensor], dict[str, float]] | None = None

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        return {name: float(metric(samples)) for name, metric in self.metrics.items()}


Loader = Callable[[Path, Any, torch.device], SamplingTarget]
LOADERS: dict[str, Loader] = {}


def register_loader(recipes: Sequence[str], loader: Loader) -> None:
    """Make :func:`load_target` use ``loader(run_path, config, device)`` for runs of these recipes."""
    for name in recipes:
        LOADERS[name] = loader


def load_target(run_dir: str | Path, device: str = "auto") -> SamplingTarget:
    """The :class:`SamplingTarget` of a run folder (its recipe picks the loader)."""
    from difflab.experiments import recipes

    path = Path(run_dir)
    record = read_run(path)
    recipe = record.get("recipe")
    _register_builtin_loaders()
    if recipe not in LOADERS:
        from difflab.experiments.score_runs import SCORE_RECIPES

        known = ", ".join(sorted(LOADERS))
        score = " (difflab sample draws annealed Langevin samples of NCSN runs)" if recipe in SCORE_RECIPES else ""
        raise ConfigError(f"{path} is a {recipe!r} run; this command knows the recipes {known}{score}")
    config = read_run_config(path, recipes()[recipe].config_class())
    return LOADERS[recipe](path, config, resolve_device(device))


def _register_builtin_loaders() -> None:
    from difflab.experiments import ldm, mnist, toy2d

    register_loader(("states",), load_points_run)
    register_loader(tuple(toy2d.TOY_DATASETS), load_points_run)
    register_loader(("mnist-ddpm", "mnist-cfg"), mnist.load_sampling_target)
    register_loader(("mnist-ldm",), ldm.load_sampling_target)


def load_points_run(path: Path, config: Any, device: torch.device) -> SamplingTarget:
    """A 2-D run (STATES or a walkthrough): the denoiser MLP, KDE metrics, held-out points."""
    from difflab.data.toy import make_toy
    from difflab.experiments import points2d, states
    from difflab.metrics.points import KDE, check_finite
    from difflab.viz import plots2d

    weights = path / "checkpoints" / "denoiser.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no trained denoiser ({weights} is missing); finish the run first")
    if config.recipe == "states":
        train, heldout, _ = states.load_data(config.data, config.seed)
    else:
        train = make_toy(config.recipe, config.data.n_train, config.data.noise, seed=0)
        heldout = make_toy(config.recipe, config.data.n_heldout, config.data.noise, seed=1)
    network = points2d.build_denoiser(config.denoiser, config.schedule.num_timesteps)
    load_weights(network, weights)
    network.to(device).eval()
    schedule = NoiseSchedule.from_config(config.schedule).to(device)
    train_kde = KDE(train.data)

    def nll_course(samples: torch.Tensor) -> float:
        check_finite(samples)
        return train_kde.nll(samples)

    def nll_reverse(samples: torch.Tensor) -> float:
        check_finite(samples)
        return KDE(samples).nll(heldout.data)

    references = {"nll_course": train_kde.nll(heldout.data), "nll_reverse": KDE(train.data).nll(heldout.data)}

    def kde_scores(points: torch.Tensor) -> dict[str, float]:
        """``points`` (N, 2) under the KDE of the training points and under that of the run's own samples."""
        scores = {"heldout_under_training_kde": nll_course(points.cpu())}
        for name in ("uncond_gen_samples.pt", "samples.pt"):  # the STATES recipe's, the walkthroughs'
            file = path / "samples" / name
            if file.is_file():
                try:
                    samples = torch.load(file, map_location="cpu", weights_only=True)
                except Exception:  # a damaged file: the held-out points are scored under the training KDE only
                    samples = None
                if isinstance(samples, torch.Tensor) and samples.ndim == 2 and samples.shape[1] == 2:
                    scores["heldout_under_sample_kde"] = KDE(samples).nll(points.cpu())
                break
        return scores

    return SamplingTarget(
        path=path,
        recipe=config.recipe,
        model=DiffusionModel(network, schedule, "eps"),
        schedule=schedule,
        sample_shape=(2,),
        device=device,
        metrics={"nll_course": nll_course, "nll_reverse": nll_reverse},
        plot=lambda samples, out, title: plots2d.scatter_over_data(samples, train.data, out, title),
        heldout=heldout.data,
        references=references,
        kde_scores=kde_scores,
    )


# ------------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------------
def draw_samples(
    target: SamplingTarget,
    sampler: str,
    steps: int,
    n: int,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``n`` samples by the registered ``sampler`` with ``steps`` steps; returns ``(samples, info)``.

    Batch ``b`` draws from its own generator seeded by ``(seed, b)``, its ``x_T`` first, so every sampler
    starts from the same noise for the same seed. ``info`` holds the NFE per batch, steps and seconds.
    """
    spec = get_sampler(sampler)
    spec.check_steps(steps, target.schedule.num_timesteps)
    if n < 1:
        raise ConfigError(f"the number of samples must be >= 1, got {n}")
    check_output_fits(n, target.sample_shape)
    outputs, nfe = [], 0
    start = time.perf_counter()
    for b, size in enumerate(batched(n, target.batch_size)):
        generator = seeded_generator(mix_seed(seed, b, 1), target.device)
        target.model.reset_nfe()
        x = spec(
            target.model,
            target.schedule,
            (size, *target.sample_shape),
            steps=steps,
            generator=generator,
            device=target.device,
            show_progress=show_progress,
            **(options or {}),
        )
        nfe = target.model.nfe
        outputs.append(x.detach().float().cpu())
    seconds = time.perf_counter() - start
    return torch.cat(outputs), {"sampler": sampler, "steps": steps, "nfe": nfe, "seconds": round(seconds, 3)}


MIN_SCORED = 3  # samples a score needs: a KDE of 2-D samples more than 2 points, a FID at least 2 images


def sample_run(
    run_dir: str | Path,
    sampler: str,
    steps: int,
    n: int = 5000,
    seed: int = 0,
    out: str | Path | None = None,
    device: str = "auto",
    options: dict[str, Any] | None = None,
    show_progress: bool = False,
    digit: int | str | None = None,
    guidance: float | None = None,
) -> dict[str, Any]:
    """``difflab sample``: draw, save ``.pt`` + scatter PNG (RUN/samples/ or ``out``), score; returns the record.

    ``options`` go to the sampler's function (e.g. ``{"eta": 1.0}`` for ``ddim``) and into the file name.
    The ``.pt`` holds the samples tensor, or for a latent target ``{"latents": ..., "images": decoded}``.
    ``digit`` / ``guidance`` steer a class-conditional run (:attr:`SamplingTarget.conditioned`); samples of one
    class are not scored (the metrics compare with data of every class)."""
    target = load_target(run_dir, device)
    steer = {"digit": digit, "w": guidance}
    steer = {key: value for key, value in steer.items() if value is not None}
    if steer:
        if target.conditioned is None:
            raise ConfigError(
                f"{target.path} is a {target.recipe} run: --digit and --guidance steer class-conditional image runs "
                "(mnist-cfg, a conditional mnist-ldm)"
            )
        model = target.conditioned(digit, guidance)
        target = replace(target, model=model, metrics={} if digit is not None else target.metrics)
    samples, info = draw_samples(target, sampler, steps, n, seed, options, show_progress=show_progress)
    stem = f"{sampler}{option_tags({**steer, **(options or {})})}-{steps}steps-seed{seed}"
    pt_path = Path(out).with_suffix(".pt") if out else target.path / "samples" / f"{stem}.pt"
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    if target.decode is None:
        torch.save(samples, pt_path)
    else:
        content = {"latents": samples, "images": target.decode(samples)}
        if digit is not None and target.class_index is not None:  # so `difflab evaluate` scores the intended class
            content["labels"] = torch.full((len(samples),), target.class_index(digit), dtype=torch.long)
        torch.save(content, pt_path)
    record: dict[str, Any] = {**info, **steer, **(options or {}), "n": n, "seed": seed, "samples": str(pt_path)}
    if n >= MIN_SCORED:
        record.update(target.score(samples))
    elif target.metrics:
        record["not_scored"] = f"n = {n}: the scores need at least {MIN_SCORED} samples"
    if target.plot is not None:
        title = f"{sampler}, {steps} steps ({info['nfe']} NFE), n = {n}"
        record["figure"] = str(target.plot(samples, pt_path.with_suffix(".png"), title))
    return record


# ------------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------------
def compare_samplers(
    target: SamplingTarget,
    samplers: Sequence[str] = DEFAULT_COMPARED,
    nfes: Sequence[int] = DEFAULT_NFES,
    n: int = 5000,
    seed: int = 0,
    include_full: bool = True,
    echo: Callable[[str], None] | None = None,
    full_for: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Score every sampler at every NFE budget (same seeds, so the same starting noise).

    Each budget is spent on the most steps that fit (``SamplerSpec.steps_for_nfe``; Heun's ``2 N - 1``
    evaluations make its NFE odd); budgets a sampler cannot take (more than T discrete steps) are skipped.
    ``include_full`` adds the budget ``T`` (DDPM's own), for every sampler or only those named in ``full_for``
    (e.g. ``["ddpm"]``: the T-step reference without T-step runs of the fast samplers). ``options`` go to every
    sampler's function (each must take them: checked before any sampling) and into each row. Returns one row per
    (sampler, budget).
    """
    full = target.schedule.num_timesteps
    if not target.metrics:
        raise ConfigError(
            f"{target.path}: the built-in evaluator has no score for this run's data (it scores MNIST, or an image "
            "folder with metrics.inception_weights), so there is nothing to compare"
        )
    if not samplers:
        raise ConfigError("no sampler to compare (--samplers names none)")
    for name in full_for or ():
        get_sampler(name)  # an unknown name fails before any sampling
    for name in samplers:
        get_sampler(name).check_options(options or {})
    plan = []  # (sampler, budget, steps): every check before any sampling
    for name in samplers:
        spec = get_sampler(name)
        gets_full = include_full and (full_for is None or name in full_for)
        for budget in sorted(set(nfes) | ({full} if gets_full else set())):
            steps = spec.steps_for_nfe(budget, full)
            if steps is not None:
                plan.append((name, budget, steps))
    if not plan:
        raise ConfigError(
            f"none of the samplers {', '.join(samplers)} can spend any NFE budget in {sorted(nfes)} on this run "
            f"(T = {full}: a budget buys at most T steps)"
        )
    if options:  # their values are checked by the samplers' functions: one step on one sample each, before any work
        for name in dict.fromkeys(name for name, _, _ in plan):
            try:
                draw_samples(target, name, 1, 1, seed, options)
            except ConfigError as exc:
                raise ConfigError(f"sampler {name}: {exc}") from None
    rows = []
    for name, budget, steps in plan:
        samples, info = draw_samples(target, name, steps, n, seed, options)
        row = {"budget": budget, **info, **({"options": options} if options else {}), **target.score(samples)}
        rows.append(row)
        if echo is not None:
            scores = "  ".join(f"{k} {fmt(row[k])}" for k in target.metrics)
            echo(f"  {name:9s} budget {budget:5d}: {steps:4d} steps, {info['nfe']:4d} NFE, {scores}")
    return rows


def comparison_table(rows: list[dict[str, Any]], metrics: Sequence[str], num_timesteps: int) -> str:
    """Markdown: one row per sampler, one column per NFE budget, cells ``metric1 / metric2 [(NFE)]``."""
    budgets = sorted({row["budget"] for row in rows})
    samplers = list(dict.fromkeys(row["sampler"] for row in rows))
    lookup = {(row["sampler"], row["budget"]): row for row in rows}
    lines = []
    for name in samplers:
        cells: list[Any] = [name]
        for budget in budgets:
            row = lookup.get((name, budget))
            if row is None:
                cells.append("–")
                continue
            text = " / ".join(fmt(row[m]) for m in metrics)
            cells.append(text if row["nfe"] == budget else f"{text} ({row['nfe']})")
        lines.append(cells)
    headers = ["sampler"] + [f"NFE {b}" + (" (=T)" if b == num_timesteps else "") for b in budgets]
    return table(headers, lines)


COMPARISON_FILES = ("table.md", "results.json", "quality_vs_nfe.png")


def keep_earlier_comparison(out: Path) -> Path | None:
    """Move the comparison ``out`` holds (:data:`COMPARISON_FILES`) to ``out/earlier/<its UTC time>/`` so a new
    one does not overwrite it; returns where it went (None when there was none)."""
    present = [out / name for name in COMPARISON_FILES if (out / name).is_file()]
    if not present:
        return None
    written = max(path.stat().st_mtime for path in present)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(written))
    folder, k = out / "earlier" / stamp, 1
    while folder.exists():
        k += 1
        folder = out / "earlier" / f"{stamp}-{k}"
    folder.mkdir(parents=True)
    for path in present:
        path.replace(folder / path.name)
    return folder


def write_comparison(
    target: SamplingTarget, rows: list[dict[str, Any]], n: int, seed: int, echo: Callable[[str], object] = print
) -> dict[str, Path]:
    """RUN/compare_samplers/{table.md, results.json, quality_vs_nfe.png}; an earlier comparison there is kept in
    ``RUN/compare_samplers/earlier/<time>/`` (:func:`keep_earlier_comparison`), not overwritten."""
    out = target.path / "compare_samplers"
    out.mkdir(parents=True, exist_ok=True)
    kept = keep_earlier_comparison(out)
    if kept is not None:
        echo(f"[compare-samplers] the earlier comparison is kept in {kept}")
    metrics = list(target.metrics)
    references = target.references_at(n) if target.references_at is not None else target.references
    notes = [
        f"# Sampler comparison: {target.recipe} run {target.path}",
        "",
        f"Cells: {' / '.join(metrics)} (lower is better) of {n} samples, seed {seed} (the same starting noise "
        "for every sampler). A number in brackets is the NFE actually spent when the budget does not fit "
        "the sampler (Heun and the +pc samplers cost 2 N - 1 evaluations for N steps). – : budget not "
        f"possible (discrete-timestep samplers take at most T = {target.schedule.num_timesteps} steps).",
        "",
        f"Real held-out data at the same n: {', '.join(f'{k} {fmt(v)}' for k, v in references.items())}.",
        "",
        *([f"Model: {target.description}.", ""] if target.description else []),
        comparison_table(rows, metrics, target.schedule.num_timesteps),
        "",
        "Samplers: "
        + "; ".join(f"`{name}` {SAMPLERS[name].description}" for name in dict.fromkeys(row["sampler"] for row in rows))
        + ".",
        "",
    ]
    paths = {"table": out / "table.md", "results": out / "results.json", "figure": out / "quality_vs_nfe.png"}
    atomic_write_bytes(paths["table"], "\n".join(notes).encode())
    record = {
        "recipe": target.recipe,
        "n": n,
        "seed": seed,
        "written_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "references": references,
        "rows": rows,
    }
    atomic_write_bytes(paths["results"], (json.dumps(record, indent=2) + "\n").encode())
    series = {
        metric: {
            name: [(row["nfe"], row[metric]) for row in rows if row["sampler"] == name]
            for name in dict.fromkeys(row["sampler"] for row in rows)
        }
        for metric in metrics
    }
    quality.quality_vs_nfe(series, paths["figure"], f"{target.recipe}: quality vs NFE (n = {n})", references)
    return paths


# ------------------------------------------------------------------------------------------------------
# Likelihood
# ------------------------------------------------------------------------------------------------------
def heldout_likelihood(
    target: SamplingTarget,
    n: int = 1000,
    settings: LikelihoodSettings | None = None,
    batch_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Exact model NLL (probability-flow ODE) of the first ``n`` held-out points; writes RUN/likelihood.json."""
    if target.heldout is None:
        raise ConfigError(f"the {target.recipe} recipe has no held-out data to score")
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    points = target.heldout[:n].to(target.device)
    clean = points
    if target.bin_width is not None:
        # Uniform dequantisation: x + a u, u ~ U[0, 1)^D, a the bin width (Theis et al. 2016; Song et al. 2021).
        uniform = torch.rand(points.shape, generator=seeded_generator(mix_seed(seed, 1, 81)), dtype=torch.float64)
        points = points + target.bin_width * uniform.to(points.device, points.dtype)
    model = target.likelihood_model or target.model
    start = time.perf_counter()
    result = batched_likelihood(
        model,
        target.schedule,
        points,
        batch_size=batch_size,
        settings=settings,
        generator=seeded_generator(mix_seed(seed, 0, 81)),
        device=target.device,
    )
    summary = result.summary()
    summary["seconds"] = round(time.perf_counter() - start, 2)
    summary["noise_floor_sigma_vp"] = float(
        (1 - model.alpha_bar_at(summary["t_min"] * (model.num_timesteps - 1))).sqrt()
    )
    if target.bin_width is not None:
        summary["bits_per_dim"] = float(bits_per_dim(summary["nll_nats"], result.dims, target.bin_width))
        summary["dequantization"] = (
            f"uniform within each quantisation bin (width {target.bin_width:.6g} in model units); bits/dim "
            "= nll / (D ln 2) - log2(bin width), an upper bound on the discrete model's"
        )
    elif points.ndim > 2:
        # Continuous data such as VAE latents: a density, no bins to dequantise.
        summary["bits_per_dim"] = float(summary["nll_nats"] / (result.dims * math.log(2)))
        summary["dequantization"] = "none: the density of continuous data (latents); bits/dim = nll / (D ln 2)"
    record: dict[str, Any] = {"recipe": target.recipe, "model": summary}
    if target.variational_bound is not None:
        start = time.perf_counter()
        record["vlb"] = {**target.variational_bound(clean), "seconds": round(time.perf_counter() - start, 2)}
    if target.kde_scores is not None:  # the same points as the exact likelihood
        record["kde"] = target.kde_scores(clean)
    atomic_write_bytes(target.path / "likelihood.json", (json.dumps(record, indent=2) + "\n").encode())
    return record
