"""One recipe per reference experiment. ``RECIPES`` maps a recipe name to its config class and runner."""

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


def recipes() -> dict[str, Recipe]:
    """All recipes (imported lazily so ``difflab --help`` stays fast)."""
    from difflab.experiments import mnist, ncsn, ncsn2d, states, toy2d

    found = [
        Recipe(
            "states",
            states.StatesConfig,
            states.run_states,
            "STATES: DDPM + classifier-guided DDIM on five US state outlines",
        ),
    ]
    for name in toy2d.TOY_DATASETS:
        found.append(
            Recipe(
                name,
                toy2d.toy_config_class(name),
                toy2d.run_toy,
                f"2-D walkthrough on {name}: forward/reverse process, DDPM samples, NLL",
            )
        )
    found += [
        Recipe("mnist-ddpm", mnist.MnistDDPMConfig, mnist.run_mnist_ddpm,
               "MNIST Micro-UNet: DDPM-1000 vs DDIM-50 grids, timings, FID/IS"),
        Recipe("mnist-cfg", mnist.MnistCFGConfig, mnist.run_mnist_cfg,
               "MNIST class-conditional U-Net with classifier-free guidance, guidance sweep"),
        Recipe("mnist-ncsn", ncsn.MnistNCSNConfig, ncsn.run_mnist_ncsn,
               "MNIST noise-conditional score network (DSM) sampled by annealed Langevin dynamics, (c, T) sweep"),
    ]
    for name, data in ncsn2d.POINT_RECIPES.items():
        found.append(Recipe(name, ncsn2d.points_config_class(name), ncsn2d.run_points_ncsn,
                            f"NCSN on {data}: score MLP, annealed Langevin samples, score field, NLL"))
    return {r.name: r for r in found}
