"""``difflab sample`` on a score-based run (``mnist-ncsn``, ``states-ncsn``, ``swissroll-ncsn``): more samples by
annealed Langevin dynamics (Song & Ermon 2019) from the run's trained score network, with its noise levels and
the step size and steps per level of its final samples (an ``mnist-ncsn`` run's sweep-chosen cell, else its
``langevin`` settings), which ``c`` and ``steps_per_level`` override.

    record = sample_score_run("runs/mnist-ncsn-cpu", n=64, steps_per_level=50, c=0.1)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difflab.errors import CheckpointError, ConfigError
from difflab.experiments import ncsn, ncsn2d
from difflab.experiments.mnist import image_shape
from difflab.experiments.ncsn_common import sample_langevin
from difflab.experiments.runs import option_tags, read_run, read_run_config, resolve_device
from difflab.metrics.points import KDE, check_finite
from difflab.training.checkpoint import load_weights
from difflab.viz import plots2d
from difflab.viz.images import save_grid

SCORE_RECIPES = ("mnist-ncsn", *ncsn2d.POINT_RECIPES)


def sample_score_run(
    run_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    steps_per_level: int | None = None,
    c: float | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    show_progress: bool = False,
) -> dict[str, Any]:
    """Draw ``n`` samples (default 16 images or 5,000 points) by annealed Langevin dynamics, save them as ``.pt``
    (images: ``{"images": (n, C, H, W)}`` in [-1, 1], as the recipe saves them; points: (n, 2)) with a PNG beside
    (a grid of at most 64 images, or the points over the training data) in ``RUN/samples/`` or at ``out``.

    Returns the record: settings, network evaluations per sample, seconds, the files, and for points the KDE scores
    ``nll_course`` (samples under the training data's KDE) and ``nll_reverse`` (held-out data under the samples')."""
    from difflab.experiments import recipes

    path = Path(run_dir)
    recipe = read_run(path).get("recipe")
    if recipe not in SCORE_RECIPES:
        raise ConfigError(f"{path} is a {recipe!r} run, not a score-based one ({', '.join(SCORE_RECIPES)})")
    if n is not None and n < 1:
        raise ConfigError(f"--n must be >= 1, got {n}")
    if (steps_per_level is not None and steps_per_level < 1) or (c is not None and c <= 0):
        raise ConfigError("annealed Langevin needs --steps (steps per noise level) >= 1 and c > 0")
    config = read_run_config(path, recipes()[recipe].config_class())
    weights = path / "checkpoints" / "score.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no trained score network ({weights} is missing); finish the run first")
    resolved = resolve_device(device)
    images = recipe == "mnist-ncsn"
    if images:
        shape = image_shape(config)
        model = ncsn.build_score_unet(config, shape[0], resolved)
    else:
        shape = (2,)
        model = ncsn2d.build_score_mlp(config.model).to(resolved)
    load_weights(model, weights)
    model.eval()
    n = n or (16 if images else 5000)
    final = _final_settings(path)
    c = final.get("c") if c is None else c
    steps_per_level = final.get("steps_per_level") if steps_per_level is None else steps_per_level
    drawn = sample_langevin(
        model,
        config.noise.sigmas(),
        n,
        shape,
        config.langevin,
        seed,
        resolved,
        c=c,
        steps_per_level=steps_per_level,
        show_progress=show_progress,
    )
    settings = drawn.settings
    stem = f"langevin{option_tags({'c': settings['c'], 'T': settings['steps_per_level']})}-n{n}-seed{seed}"
    pt_path = Path(out).with_suffix(".pt") if out else path / "samples" / f"{stem}.pt"
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    png = pt_path.with_suffix(".png")
    record: dict[str, Any] = {
        "sampler": "annealed Langevin",
        **settings,
        "n": n,
        "seed": seed,
        "network_evaluations_per_sample": drawn.network_evaluations // n,
        "seconds": round(drawn.seconds, 3),
        "samples": str(pt_path),
        "figure": str(png),
    }
    if images:
        samples = drawn.samples.clamp(-1, 1)
        torch.save({"images": samples}, pt_path)
        save_grid(samples[:64], png, nrow=max(1, int(min(n, 64) ** 0.5)))
        return record
    samples = drawn.samples
    check_finite(samples, "Langevin samples")
    train, heldout = ncsn2d.load_points(config)
    torch.save(samples, pt_path)
    title = f"annealed Langevin, c = {settings['c']:g}, {settings['steps_per_level']} steps per level, n = {n}"
    plots2d.scatter_over_data(samples, train.data, png, title)
    record["nll_course"] = KDE(train.data).nll(samples)
    if n > samples.shape[1]:  # a KDE of the samples needs more points than dimensions
        record["nll_reverse"] = KDE(samples).nll(heldout.data)
    else:
        record["not_scored"] = f"nll_reverse: n = {n} samples are too few for a KDE of them"
    return record


def _final_settings(path: Path) -> dict[str, Any]:
    """``c`` and ``steps_per_level`` of the run's final samples as its ``metrics.json`` records them (``best``:
    an ``mnist-ncsn`` run's chosen sweep cell), or nothing (then the config's ``langevin`` settings apply)."""
    try:
        best = json.loads((path / "metrics.json").read_text()).get("best", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {key: best[key] for key in ("c", "steps_per_level") if isinstance(best.get(key), int | float)}
