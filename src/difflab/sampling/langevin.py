"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) over a noise-conditional score model.

For each level ``sigma_1 > ... > sigma_L`` in turn, ``T`` Langevin steps at step size ``alpha_i``:

    x <- x + (alpha_i / 2) s_theta(x, sigma_i) + sqrt(alpha_i) z,   z ~ N(0, I)

with ``alpha_i = epsilon sigma_i^2 / sigma_L^2``. difflab states the step through the dimensionless
``c = epsilon / sigma_L^2``, so ``alpha_i = c sigma_i^2``: every level takes steps of the same size
relative to its own noise variance. (NCSN's MNIST/CIFAR setting epsilon = 2e-5 at sigma_L = 0.01 is
c = 0.2; NCSNv2's 6.2e-6 is c = 0.062.) On a Gaussian target N(mu, v I) the update is an AR(1) chain
contracting by ``a / (2 v)`` per step with stationary variance ``v / (1 - a / (4 v))``; at level i the
noised data has variance ``v >= sigma_i^2`` along every direction, so ``a / v <= c``: c bounds both the
mixing per step (at most ``c / 2`` e-folds) and the variance inflation (at most ``1 / (1 - c / 4)``).

After the last level an optional denoising step (on by default) returns Tweedie's estimate of the clean
sample, ``E[x | x~] = x~ + sigma_L^2 grad log p_{sigma_L}(x~)`` (Efron 2011; Jolicoeur-Martineau et al.
2021), which removes the ``sigma_L`` noise the chain still carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from difflab.errors import ConfigError
from difflab.progress import progress_bar
from difflab.sampling.common import randn, sampling_mode

INITS = ("uniform", "gaussian")


class NoiseConditionalScore(Protocol):
    """Anything called as ``model(x, sigma) -> score``: x (B, ...), sigma (B,) float -> (B, ...)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def initial_state(
    shape: tuple[int, ...], init: str, sigma_max: float, generator: torch.Generator | None, device: torch.device | str
) -> torch.Tensor:
    """The chain's start: ``uniform`` on [-1, 1] (NCSN's uniform noise over the data range, for data in
    [-1, 1]) or ``gaussian`` N(0, sigma_max^2 I) (NCSNv2's choice when sigma_max covers the data). A tensor of
    ``shape`` (B, ...) on ``device``."""
    if init == "uniform":
        source = generator.device if generator is not None else device
        return (torch.rand(shape, generator=generator, device=source) * 2 - 1).to(device)
    if init == "gaussian":
        return sigma_max * randn(shape, generator, device)
    raise ConfigError(f"Langevin init must be one of {', '.join(INITS)}, got {init!r}")


def langevin_steps(
    score_model: NoiseConditionalScore,
    x: torch.Tensor,
    sigma: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``steps`` Langevin updates ``x <- x + (a / 2) s(x, sigma) + sqrt(a) z`` at one level, ``a = step_size``.

    x: (B, ...). Returns the new x, (B, ...) (the input is not modified).
    """
    level = torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)
    for _ in range(steps):
        noise = randn(tuple(x.shape), generator, x.device)
        x = x + 0.5 * step_size * score_model(x, level) + step_size**0.5 * noise
    return x


def annealed_langevin(
    score_model: NoiseConditionalScore,
    sigmas: torch.Tensor | Sequence[float],
    shape: tuple[int, ...],
    *,
    c: float = 0.1,
    steps_per_level: int = 100,
    denoise: bool = True,
    init: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    record_levels: Sequence[int] | None = None,
    x_init: torch.Tensor | None = None,
    show_progress: bool = False,
) -> tuple[torch.Tensor, list[tuple[int, float, torch.Tensor]]]:
    """Draw ``shape[0]`` samples by annealed Langevin dynamics; returns ``(x, trajectory)``.

    sigmas: the K decreasing noise levels; ``alpha_i = c sigma_i^2`` (see the module docstring);
    ``steps_per_level`` is T, so the sampler calls the model ``K T (+1 with denoise)`` times.
    The chain starts from ``x_init`` or from :func:`initial_state` (``init``: ``uniform`` on [-1, 1] or
    ``gaussian`` N(0, sigma_1^2)); all randomness is drawn from ``generator`` (the start first).

    trajectory: ``(i, sigma_i, x after the T steps of level i)`` (on the CPU) for each ``i`` in
    ``record_levels``; with ``denoise`` and any ``record_levels`` the denoised output is appended as
    ``(K, 0.0, x)``.
    """
    sigma_list = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(sigma_list) < 1 or any(s <= 0 for s in sigma_list):
        raise ConfigError("annealed Langevin needs at least one positive noise level")
    if any(a <= b for a, b in zip(sigma_list, sigma_list[1:])):
        raise ConfigError("annealed Langevin needs strictly decreasing noise levels (sigma_1 > ... > sigma_L)")
    if c <= 0:
        raise ConfigError(f"the Langevin step constant c must be > 0, got {c}")
    if steps_per_level < 1:
        raise ConfigError(f"steps_per_level must be >= 1, got {steps_per_level}")
    recorded = set(record_levels or ())
    trajectory: list[tuple[int, float, torch.Tensor]] = []
    with sampling_mode(score_model):
        if x_init is None:
            x = initial_state(shape, init, sigma_list[0], generator, device)
        else:
            x = x_init.to(device)
        levels = progress_bar(list(enumerate(sigma_list)), desc="Langevin levels", disable=not show_progress)
        for i, sigma in levels:
            x = langevin_steps(score_model, x, sigma, c * sigma**2, steps_per_level, generator)
            if i in recorded:
                trajectory.append((i, sigma, x.detach().cpu().clone()))
        if denoise:
            # Tweedie: E[x | x~] = x~ + sigma_L^2 grad log p_{sigma_L}(x~)
            level = torch.full((x.shape[0],), sigma_list[-1], device=x.device, dtype=x.dtype)
            x = x + sigma_list[-1] ** 2 * score_model(x, level)
            if recorded:
                trajectory.append((len(sigma_list), 0.0, x.detach().cpu().clone()))
    return x, trajectory


def network_evaluations(num_levels: int, steps_per_level: int, denoise: bool) -> int:
    """Model calls per sample of :func:`annealed_langevin`: ``K T + 1`` with the denoising step."""
    return num_levels * steps_per_level + int(denoise)
