"""``difflab invert RUN``: DDIM inversion round trips of real images with a trained image model, and their
reconstruction error (MSE, PSNR, SSIM) against the number of steps."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.experiments import images as stages
from difflab.experiments.runs import read_run, resolve_device
from difflab.metrics.image_quality import psnr, psnr_per_image, ssim
from difflab.progress import progress_bar
from difflab.sampling.inversion import INVERSION_ORDERS, INVERSION_SPACINGS, ddim_round_trip, default_inversion_end
from difflab.viz.images import image_rows_figure


def round_trip_cases(
    steps: tuple[int, ...],
    n: int,
    fixed_point: int = 0,
    spacings: tuple[str, ...] = ("uniform",),
    orders: tuple[int, ...] = (1,),
) -> list[tuple[str, int, int, int, int, str]]:
    """The round trips ``difflab invert`` runs: ``(spacing, order, fixed-point iterations, steps, NFE, label)`` for
    every spacing, order and step count, plain and (when ``fixed_point`` K > 0, for the first-order DDIM steps it
    refines) refined by K iterations; checks the arguments first."""
    if n < 1 or not steps or min(steps) < 1 or fixed_point < 0:
        raise ConfigError("invert needs n >= 1, step counts >= 1 and --fixed-point >= 0")
    unknown = [s for s in spacings if s not in INVERSION_SPACINGS]
    if not spacings or unknown:
        raise ConfigError(
            f"--spacing must be among {', '.join(INVERSION_SPACINGS)}, got {', '.join(unknown) or 'none'}"
        )
    wrong = [str(o) for o in orders if o not in INVERSION_ORDERS]
    if not orders or wrong:
        raise ConfigError(
            f"--order must be among {', '.join(map(str, INVERSION_ORDERS))}, got {', '.join(wrong) or 'none'}"
        )
    return [
        # NFE: inversion (1 + K per step) and reconstruction (1 per step)
        (
            spacing,
            order,
            iterations,
            count,
            count * (2 + iterations),
            f"{count} steps"
            + (f", {spacing} spacing" if spacing != "uniform" else "")
            + (", 2nd order" if order == 2 else "")
            + (f", {iterations} fixed-point" if iterations else ""),
        )
        for spacing in dict.fromkeys(spacings)
        for order in dict.fromkeys(orders)
        for iterations in (sorted({0, fixed_point}) if order == 1 else [0])
        for count in steps
    ]


def resolved_t_end(schedule: NoiseSchedule, t_end: int | None, steps: tuple[int, ...]) -> int:
    """``--t-end`` checked against the schedule, or its default (:func:`default_inversion_end`) when None; each of
    ``steps`` must fit below it (every step spans at least one timestep)."""
    given = t_end
    if t_end is None:
        t_end = default_inversion_end(schedule)
    elif not 0 <= t_end < schedule.num_timesteps:
        raise ConfigError(f"--t-end must be in [0, {schedule.num_timesteps - 1}], got {t_end}")
    if t_end < 1:
        raise ConfigError(
            f"a round trip needs --t-end >= 1 (one step up and back), got {t_end}"
            + (" (the default end of this schedule)" if given is None else "")
        )
    if max(steps) > t_end:
        raise ConfigError(f"--steps {max(steps)} do not fit between t = 0 and --t-end {t_end}: use at most {t_end}")
    return t_end


INVERSION_BATCH = 256  # items per network batch: bounds the memory of a round trip of any number of items


def round_trip_rows(
    model: Any,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    cases: list[tuple[str, int, int, int, int, str]],
    t_end: int,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    echo: Any = print,
    name: str = "",
    fields: dict[str, Any] | None = None,
    labels: torch.Tensor | None = None,
    batch_size: int = INVERSION_BATCH,
) -> tuple[list[dict[str, Any]], list[tuple[str, torch.Tensor]]]:
    """Every round trip of ``cases`` (:func:`round_trip_cases`) of ``x0`` (N, ...) to ``t_end`` under the eps
    ``model``: one row each (its settings, NFE, MSE of the round trip, PSNR of the MSE pooled over the images and
    the mean of the images' own PSNRs, SSIM, std of the inverted x_t, wall time) and the first 8 reconstructions
    for a figure, as ``(rows, [(label, images (8, C, H, W))])``.

    ``x0`` are images in [-1, 1] (``mse``), or latents that ``decode`` maps to images (``latent_mse``; PSNR and
    SSIM then compare the decoded round trip with the decoded original, the inversion's own error without the
    autoencoder's). ``fields`` are added to every row; ``name`` starts each printed line. ``labels`` (N,): a
    class-conditional ``model(x, t, labels)`` is conditioned on each item's own label. The items go through the
    network ``batch_size`` at a time (each item's round trip is independent of the others'), so memory stays
    bounded for any N; the scores are of all N together."""
    if batch_size < 1:
        raise ConfigError(f"the inversion batch size must be >= 1, got {batch_size}")
    original = x0.cpu() if decode is None else decode(x0)
    error = "mse" if decode is None else "latent_mse"
    rows: list[dict[str, Any]] = []
    figure_rows: list[tuple[str, torch.Tensor]] = []
    calls = sum(case[4] for case in cases)
    chunks = [slice(start, start + batch_size) for start in range(0, len(x0), batch_size)]
    echo(
        f"[invert] {name}{len(x0)} item(s), {len(cases)} round trip(s) to t = {t_end}: {calls} network calls on "
        f"each of {len(chunks)} batch(es) of at most {batch_size}"
    )
    bar = progress_bar(total=calls * len(chunks), desc="invert (NFE)", unit="NFE", disable=calls * len(x0) < 20_000)
    for spacing, order, iterations, count, nfe, label in cases:
        start = time.perf_counter()
        latents, reconstructions = [], []
        with torch.no_grad():
            for chunk in chunks:
                network = model if labels is None else WithLabels(model, labels[chunk])
                latent, reconstruction = ddim_round_trip(
                    network, schedule, x0[chunk], count, t_end, iterations, spacing, order
                )
                latents.append(latent)
                reconstructions.append(reconstruction)
                bar.update(nfe)
            latent, reconstruction = torch.cat(latents), torch.cat(reconstructions)
            images = reconstruction.clamp(-1, 1).cpu() if decode is None else decode(reconstruction)
        seconds = time.perf_counter() - start
        row = {
            **(fields or {}),
            "spacing": spacing,
            "order": order,
            "steps": count,
            "fixed_point_iterations": iterations,
            "nfe": nfe,
            "n": len(x0),
            # pixels: of the reconstruction clipped to [-1, 1], as it is shown; latents: as they are
            error: float(((reconstruction if decode else images.to(x0.device)) - x0).square().mean()),
            "psnr_db": psnr(images, original),  # of the pooled MSE
            "psnr_db_mean_per_image": float(psnr_per_image(images, original).mean()),
            "ssim": ssim(images, original),
            "latent_std": float(latent.std()),
            "seconds": seconds,
        }
        rows.append(row)
        figure_rows.append((label, images[:8]))
        echo(
            f"[invert] {name}{label}: {'latent ' if decode else ''}MSE {row[error]:.2e}, "
            f"{'decoded ' if decode else ''}PSNR {row['psnr_db']:.2f} dB (mean per image "
            f"{row['psnr_db_mean_per_image']:.2f}), SSIM {row['ssim']:.4f}, "
            f"latent std {row['latent_std']:.3f}, {seconds:.1f} s"
        )
    bar.close()
    return rows, figure_rows


def write_inversion(
    run_dir: Path,
    schedule: NoiseSchedule,
    t_end: int,
    rows: list[dict[str, Any]],
    figure_rows: list[tuple[str, torch.Tensor]],
    title: str,
    **about: str,
) -> dict[str, Any]:
    """Write ``RUN/inversion.json`` (``t_end``, its alpha_bar, the rows, and ``about``: what the images and the model
    are) and the figure ``RUN/figures/inversion.png`` of ``figure_rows``; returns the JSON's content."""
    result = {"t_end": t_end, "alpha_bar_t_end": float(schedule.alpha_bar[t_end]), "rows": rows, **about}
    (run_dir / "inversion.json").write_text(json.dumps(result, indent=2) + "\n")
    image_rows_figure(figure_rows, run_dir / "figures" / "inversion.png", title)
    return result


def held_out_choice(count: int, n: int, seed: int) -> torch.Tensor:
    """The indices (min(n, count),) of the held-out items ``difflab invert --seed`` round-trips: a seeded
    permutation's first ``n``, the same for every kind of run."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[: min(n, count)]


class WithLabels(torch.nn.Module):
    """``network(x, t, labels)`` with fixed ``labels`` (B,): a class-conditional model as the ``model(x, t)`` the
    inversion integrates, for a batch of exactly those B images."""

    def __init__(self, network: torch.nn.Module, labels: torch.Tensor) -> None:
        super().__init__()
        self.network, self.labels = network, labels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, ...), t: (B,) -> ``network(x, t, labels)``, (B, ...)."""
        return self.network(x, t, self.labels)


def invert_run(
    run_dir: str | Path,
    steps: tuple[int, ...] = (10, 20, 50, 100),
    n: int = 64,
    t_end: int | None = None,
    seed: int = 0,
    device: str = "auto",
    echo: Callable[[str], object] = print,
    fixed_point: int = 0,
    spacings: tuple[str, ...] = ("uniform",),
    orders: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    """Invert ``n`` held-out images of the run's data to ``t_end`` (default: the last t with alpha_bar >= 1e-3)
    and back with each number of DDIM ``steps``; writes ``RUN/inversion.json`` and ``RUN/figures/inversion.png``;
    returns the results. ``fixed_point`` K > 0 adds, for every step count, the round trip whose inversion steps
    are refined by K fixed-point iterations (:func:`~difflab.sampling.inversion.ddim_invert`); ``spacings`` lists
    the timestep spacings to run (``uniform`` in t, or ``logsnr``; see
    :func:`~difflab.sampling.inversion.round_trip_timesteps`); ``orders`` the integrators (1: DDIM, 2: the
    second-order Adams-Bashforth flow of :func:`~difflab.sampling.inversion.adams_bashforth_flow`, both directions,
    same NFE). A class-conditional (``mnist-cfg``) model is conditioned on each image's own label (w = 1). An
    ``rgb2ir`` run (with latent eps models) is inverted in latent space instead, by
    :func:`difflab.experiments.rgb2ir.invert_latent_run`, and a ``mnist-ldm`` run's held-out latents under its
    latent model with the null label."""
    from difflab.experiments.mnist import load_run_model

    run_dir = Path(run_dir)
    recipe = read_run(run_dir).get("recipe")
    if recipe == "rgb2ir":
        from difflab.experiments.rgb2ir import invert_latent_run

        return invert_latent_run(run_dir, steps, n, t_end, device, echo, fixed_point, spacings, orders)
    if recipe == "mnist-ldm":
        return _invert_ldm_run(run_dir, steps, n, t_end, seed, device, echo, fixed_point, spacings, orders)
    if recipe not in ("mnist-ddpm", "mnist-cfg"):
        raise ConfigError(
            f"{run_dir} is a {recipe!r} run; difflab invert takes mnist-ddpm, mnist-cfg, mnist-ldm and rgb2ir runs"
        )
    resolved = resolve_device(device)
    config, model, schedule = load_run_model(run_dir, resolved)
    cases = round_trip_cases(steps, n, fixed_point, spacings, orders)
    t_end = resolved_t_end(schedule, t_end, steps)
    _, heldout = stages.load_image_data(config.data, config.seed)
    index = held_out_choice(len(heldout), n, seed)
    x0 = heldout.images[index].to(resolved)
    # a mnist-cfg model is conditioned on each image's own label (guidance w = 1)
    labels = heldout.labels[index].to(resolved) if config.unet.num_classes else None
    rows, figure_rows = round_trip_rows(model, schedule, x0, cases, t_end, echo=echo, labels=labels)
    figure_rows.insert(0, ("original", x0[:8].cpu()))
    return write_inversion(
        run_dir,
        schedule,
        t_end,
        rows,
        figure_rows,
        f"DDIM inversion to t = {t_end} and back",
        images="held-out images of the run's data, pixel range [-1, 1] mapped to [0, 1] for PSNR/SSIM",
        model="class-conditional, each image's own label (w = 1)" if config.unet.num_classes else "unconditional",
    )


def _invert_ldm_run(
    run_dir: Path,
    steps: tuple[int, ...],
    n: int,
    t_end: int | None,
    seed: int,
    device: str,
    echo: Any,
    fixed_point: int,
    spacings: tuple[str, ...],
    orders: tuple[int, ...],
) -> dict[str, Any]:
    """:func:`invert_run` on a ``mnist-ldm`` run: ``n`` of its held-out latents (seeded choice) inverted under its
    latent model as ``difflab likelihood`` sees it (null label, x_0 unclipped, a learned variance's eps channels),
    PSNR / SSIM of the decoded round trips against the decoded originals."""
    from difflab.experiments.samplers import load_target

    target = load_target(run_dir, device)
    cases = round_trip_cases(steps, n, fixed_point, spacings, orders)
    schedule = target.schedule
    t_end = resolved_t_end(schedule, t_end, steps)
    if target.heldout is None or target.decode is None or target.likelihood_model is None:
        raise ConfigError(f"{run_dir} holds no held-out latents and decoder to invert")
    index = held_out_choice(len(target.heldout), n, seed)
    x0 = target.heldout[index].to(target.device)
    rows, figure_rows = round_trip_rows(
        target.likelihood_model, schedule, x0, cases, t_end, target.decode, echo, "latents, ", {"side": "latents"}
    )
    figure_rows.insert(0, ("decoded latent", target.decode(x0[:8])))
    return write_inversion(
        run_dir,
        schedule,
        t_end,
        rows,
        figure_rows,
        f"DDIM inversion of latents to t = {t_end} and back (decoded)",
        images="held-out latents of the mnist-ldm run; PSNR/SSIM of the decoded round trip against the decoded "
        "original latent, [-1, 1] mapped to [0, 1]",
        model="the latent model with the null label, x_0 unclipped",
    )
