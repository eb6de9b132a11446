"""One recipe per reference experiment. :func:`recipes` maps a recipe name to its config class, its runner
(``difflab run``: train, sample, score, report), its trainer (``difflab train``: the training stages and the
exported weights only) and its report styles.

``difflab report RUN --style S`` rebuilds a report from the run folder: style ``default`` writes
``report.md`` + ``report.html`` (what the recipe wrote), any other style ``report-S.md`` + ``report-S.html``
beside them. A style's builder may take other runs by keyword (``mnist-ddpm``'s ``ddpm-vs-ddim`` takes
``ablation`` and ``forward``, given as ``--with RUN`` and ``--forward RUN``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_STYLE = "default"
COMPANION_FLAGS = {"ablation": "--with", "forward": "--forward"}  # a builder's keyword -> its CLI flag


@dataclass(frozen=True)
class Recipe:
    """A recipe: ``run(config, fresh=...)`` makes a run folder; ``train(config, fresh=...)`` only its training
    stages and exported weights (``difflab train``); ``reports`` maps a report style name to a builder
    ``(RunContents) -> Report`` (``default``, which every recipe has, is what it writes when it completes)."""

    name: str
    config_class: Callable[[], Any]
    run: Callable[..., Any]
    summary: str
    train: Callable[..., Any]
    reports: Mapping[str, Callable[..., Any]] = field(default_factory=dict)


def recipes() -> dict[str, Recipe]:
    """All recipes (imported lazily so ``difflab --help`` stays fast)."""
    from difflab.experiments import autoencoder, ldm, mnist, mnist_reports, ncsn, ncsn2d, rgb2ir, states, toy2d

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
            {
                DEFAULT_STYLE: mnist_reports.build_ddpm_report,
                "ddpm-vs-ddim": mnist_reports.build_ddpm_vs_ddim_report,
            },
        ),
        Recipe(
            "mnist-cfg",
            mnist.MnistCFGConfig,
            mnist.run_mnist_cfg,
            "MNIST class-conditional U-Net with classifier-free guidance, guidance sweep",
            mnist.train_mnist_cfg,
            {DEFAULT_STYLE: mnist_reports.build_cfg_report},
        ),
        Recipe(
            "mnist-ncsn",
            ncsn.MnistNCSNConfig,
            ncsn.run_mnist_ncsn,
            "MNIST noise-conditional score network (DSM) sampled by annealed Langevin dynamics, (c, T) sweep",
            ncsn.train_mnist_ncsn,
            reports={DEFAULT_STYLE: ncsn.build_report},
        ),
        Recipe(
            "autoencoder",
            autoencoder.AutoencoderRecipeConfig,
            autoencoder.run_autoencoder,
            "KL-regularised VAE for latent diffusion: PSNR/SSIM, compression, scaling factor",
            autoencoder.train_autoencoder_recipe,
            reports={DEFAULT_STYLE: autoencoder.build_report},
        ),
        Recipe(
            "mnist-ldm",
            ldm.MnistLDMConfig,
            ldm.run_mnist_ldm,
            "Latent diffusion + CFG, cosine schedule, learned variance, respacing; --table for the comparison",
            ldm.train_mnist_ldm,
            reports={DEFAULT_STYLE: ldm.build_report},
        ),
        Recipe(
            "rgb2ir",
            rgb2ir.RGB2IRConfig,
            rgb2ir.run_rgb2ir,
            "RGB to infrared translation in VAE latents (noisy, denoised and clean latent regression), PSNR/SSIM",
            rgb2ir.train_rgb2ir,
            reports={DEFAULT_STYLE: rgb2ir.build_report},
        ),
    ]
    for name, data in ncsn2d.POINT_RECIPES.items():
        found.append(
            Recipe(
                name,
                ncsn2d.points_config_class(name),
                ncsn2d.run_points_ncsn,
                f"NCSN on {data}: score MLP, annealed Langevin samples, score field, NLL",
                ncsn2d.train_points_ncsn,
                reports={DEFAULT_STYLE: ncsn2d.build_report},
            )
        )
    return {r.name: r for r in found}


def report_name(style: str) -> str:
    """The file stem a report style writes: ``report`` for the default, ``report-STYLE`` otherwise."""
    return "report" if style == DEFAULT_STYLE else f"report-{style}"


def report_run(
    path: Any,
    style: str = DEFAULT_STYLE,
    require_complete: bool = True,
    companions: Mapping[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Rebuild the report of the run folder ``path`` in report ``style``, from the folder alone (and the
    ``companions``: other run folders by the builder's keyword, e.g. ``{"ablation": "runs/mnist-ddpm-no-t"}``);
    writes ``report_name(style)`` ``.md`` and ``.html`` and returns both paths. Refuses (one-line ConfigError) a
    folder that is not a completed run, an unknown style, and companions the style does not take."""
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
            f"recipe {recipe.name} has no report style {style!r}; choose one of {', '.join(recipe.reports)}"
        )
    accepted = set(list(inspect.signature(builder).parameters)[1:])
    extra = {}
    for role, other in (companions or {}).items():
        if other is None:
            continue
        if role not in accepted:
            flag = COMPANION_FLAGS.get(role, role)
            raise ConfigError(f"report style {style!r} of recipe {recipe.name} takes no {flag} run")
        extra[role] = load_run(other)
    try:
        report = builder(contents, **extra)
    except (KeyError, TypeError) as exc:  # a metrics.json edited by hand, or from another difflab version
        raise ConfigError(
            f"{contents.path / 'metrics.json'} lacks what the {recipe.name} report needs "
            f"({type(exc).__name__}: {exc}); was it written by another version of difflab?"
        ) from None
    return write_report(report, contents.path, report_name(style))
