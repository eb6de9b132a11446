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
    from difflab.experiments import autoencoder, ldm, mnist, states, toy2d

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
        Recipe("autoencoder", autoencoder.AutoencoderRecipeConfig, autoencoder.run_autoencoder,
               "KL-regularised VAE for latent diffusion: PSNR/SSIM, compression, scaling factor"),
        Recipe("mnist-ldm", ldm.MnistLDMConfig, ldm.run_mnist_ldm,
               "Latent diffusion + CFG, cosine schedule, learned variance, respacing; --table for the comparison"),
    ]
    return {r.name: r for r in found}
