"""One recipe per reference experiment. :func:`recipes` maps a recipe name to its config class, its runner
(``difflab run``: train, sample, score, report) and its trainer (``difflab train``: the training stages and
the exported weights only)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    name: str
    config_class: Callable[[], Any]
    run: Callable[..., Any]
    summary: str
    train: Callable[..., Any]


def recipes() -> dict[str, Recipe]:
    """All recipes (imported lazily so ``difflab --help`` stays fast)."""
    from difflab.experiments import mnist, states, toy2d

    found = [
        Recipe(
            "states",
            states.StatesConfig,
            states.run_states,
            "STATES: DDPM + classifier-guided DDIM on five US state outlines",
            states.train_states,
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
    ]
    return {r.name: r for r in found}
