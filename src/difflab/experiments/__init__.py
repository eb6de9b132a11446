"""One recipe per reference experiment. :func:`recipes` maps a recipe name to its config class, its runner
(``difflab run``: train, sample, score, report), its trainer (``difflab train``: the training stages and the
exported weights only) and its report styles."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STYLE = "default"


@dataclass(frozen=True)
class Recipe:
    """A recipe: ``run(config, fresh=...)`` makes a run folder; ``reports`` maps a report style name to a
    builder ``(RunContents) -> Report`` (``default`` is what the recipe writes when it completes)."""

    name: str
    config_class: Callable[[], Any]
    run: Callable[..., Any]
    summary: str
    train: Callable[..., Any] | None = None
    reports: Mapping[str, Callable[..., Any]] = field(default_factory=dict)


def recipes() -> dict[str, Recipe]:
    """All recipes (imported lazily so ``difflab --help`` stays fast)."""
    from difflab.experiments import autoencoder, ldm, mnist, ncsn, ncsn2d, states, toy2d

    found = [
        Recipe(
            "states",
            states.StatesConfig,
            states.run_states,
            "STATES: DDPM + classifier-guided DDIM on five US state outlines",
            states.train_states,
            {DEFAULT_STYLE: states.build_report},
        ),
    ]
    for name in toy2d.TOY_DATASETS:
        found.append(
            Recipe(
                name,
                toy2d.toy_config_class(name),
                toy2d.run_toy,
                f"2-D walkthrough on {name}: forward/reverse process, DDPM samples, NLL",
                toy2d.train_toy,
                {DEFAULT_STYLE: toy2d.build_report},
            )
        )
    found += [
        Recipe(
            "mnist-ddpm",
            mnist.MnistDDPMConfig,
            mnist.run_mnist_ddpm,
            "MNIST Micro-UNet: DDPM-1000 vs DDIM-50 grids, timings, FID/IS",
            mnist.train_mnist_ddpm,
        ),
        Recipe(
            "mnist-cfg",
            mnist.MnistCFGConfig,
            mnist.run_mnist_cfg,
            "MNIST class-conditional U-Net with classifier-free guidance, guidance sweep",
            mnist.train_mnist_cfg,
        ),
        Recipe(
            "mnist-ncsn",
            ncsn.MnistNCSNConfig,
            ncsn.run_mnist_ncsn,
            "MNIST noise-conditional score network (DSM) sampled by annealed Langevin dynamics, (c, T) sweep",
        ),
        Recipe(
            "autoencoder",
            autoencoder.AutoencoderRecipeConfig,
            autoencoder.run_autoencoder,
            "KL-regularised VAE for latent diffusion: PSNR/SSIM, compression, scaling factor",
        ),
        Recipe(
            "mnist-ldm",
            ldm.MnistLDMConfig,
            ldm.run_mnist_ldm,
            "Latent diffusion + CFG, cosine schedule, learned variance, respacing; --table for the comparison",
        ),
    ]
    for name, data in ncsn2d.POINT_RECIPES.items():
        found.append(
            Recipe(
                name,
                ncsn2d.points_config_class(name),
                ncsn2d.run_points_ncsn,
                f"NCSN on {data}: score MLP, annealed Langevin samples, score field, NLL",
            )
        )
    return {r.name: r for r in found}


def report_run(path: Any, style: str = DEFAULT_STYLE, require_complete: bool = True) -> tuple[Any, Any]:
    """Rebuild ``report.md`` and ``report.html`` of the run folder ``path`` in report ``style``, from the
    folder alone; returns both paths. Refuses (one-line ConfigError) a folder that is not a completed run."""
    from difflab.errors import ConfigError
    from difflab.report.render import write_report
    from difflab.report.rundata import load_run

    contents = load_run(path, require_complete=require_complete)
    known = recipes()
    recipe = known.get(contents.recipe)
    if recipe is None:
        raise ConfigError(f"{path} was made by recipe {contents.recipe!r}, which this difflab does not know")
    builder = recipe.reports.get(style)
    if builder is None:
        raise ConfigError(
            f"recipe {recipe.name} has no report style {style!r}; choose one of {', '.join(recipe.reports) or 'none'}"
        )
    return write_report(builder(contents), contents.path)
