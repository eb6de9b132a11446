"""Pieces shared by the samplers: the model-call protocol, timestep lists, noise and batching."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch

from difflab.diffusion.respacing import kept_timesteps
from difflab.errors import ConfigError
from difflab.memory import refuse_unless_fits
from difflab.progress import progress_bar

SPACINGS = ("leading", "trailing", "linspace")


class EpsModel(Protocol):
    """Anything called as ``model(x_t, t) -> eps``: x_t (B, ...), t (B,) int64 -> (B, ...)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


# callback(step_index, t, x_t, x0_pred) is called once per step, before the update.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def check_eta(eta: float, name: str = "eta") -> None:
    """A :class:`ConfigError` naming ``name`` unless ``eta`` (the scale of the posterior std that DDIM and the
    SDE samplers add back, Song et al. 2021a eq. 16) is finite and >= 0."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ConfigError(f"{name} must be finite and >= 0, got {eta}")


def timestep_list(num_timesteps: int, steps: int, spacing: str = "leading") -> list[int]:
    """The decreasing timestep indices a sampler visits, ``steps`` of them out of ``num_timesteps``.

    - ``leading`` (DDIM paper, diffusers' default): ``0, r, 2r, ...`` with ``r = T // steps``;
    - ``trailing`` (Lin et al. 2024): ``T-1, T-1-r, ...`` so the first step starts from pure noise;
    - ``linspace``: ``round(linspace(0, T-1, steps))``.
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must be between 1 and the schedule's {num_timesteps} timesteps, got {steps}")
    if spacing not in SPACINGS:
        raise ConfigError(f"spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    # the respacing's own list, so a respaced DDPM and these samplers visit the same timesteps for the same K
    return kept_timesteps(num_timesteps, steps, spacing)[::-1]


def needs_grad(model: object) -> bool:
    """Whether calling ``model`` differentiates through its input (classifier guidance does)."""
    return bool(getattr(model, "needs_grad", False))


def sampling_mode(model: object) -> contextlib.AbstractContextManager:
    """``inference_mode`` for plain sampling; ``no_grad`` when the model takes input gradients itself."""
    return torch.no_grad() if needs_grad(model) else torch.inference_mode()


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...) drawn from ``generator`` (on its own device), then moved to
    ``device``."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source).to(device)


def progress(iterable: list[int], enabled: bool, description: str) -> Iterator[int]:
    """A tqdm bar over the sampling steps when ``enabled``."""
    return iter(progress_bar(iterable, desc=description, disable=not enabled))


def check_output_fits(n: int, item_shape: tuple[int, ...], what: str = "samples") -> None:
    """A :class:`ConfigError` before any work when ``n`` float32 items of ``item_shape`` cannot be held: the
    batches are kept and concatenated at the end, so the output is held twice. A lower bound of what a run needs
    (the network's activations come on top), so it refuses only what cannot finish."""
    shape = " x ".join(map(str, item_shape))
    refuse_unless_fits(2 * 4 * n * math.prod(item_shape), f"{n} {what} of {shape} values", "ask for fewer", ConfigError)


def batched(total: int, batch_size: int) -> Iterator[int]:
    """Sizes of consecutive batches covering ``total`` items."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, total, batch_size):
        yield min(batch_size, total - start)
