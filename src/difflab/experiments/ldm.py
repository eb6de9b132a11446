"""The ``mnist-ldm`` recipe: latent diffusion (Rombach et al. 2022) with classifier-free guidance, and the
improved-DDPM techniques (Nichol & Dhariwal 2021) as switches.

Stages, each resumable in the run folder:

1. the autoencoder (``vae.kind``): ``train`` trains difflab's KL-VAE as a stage of this recipe
   (``RUN/checkpoints/autoencoder.safetensors``, same code as the ``autoencoder`` recipe); ``run`` takes the VAE
   of a finished ``autoencoder`` run at ``vae.path``; ``diffusers`` loads a pretrained ``AutoencoderKL`` from the
   local folder ``vae.path`` (e.g. Stable Diffusion's, scaling factor 0.18215; nothing is downloaded);
2. the latents of the training and held-out images, encoded once and cached as
   ``RUN/latents/latents-<key>.safetensors`` where the key hashes the autoencoder's weights, its scaling factor
   and the images;
3. the latent U-Net (self-attention at the low resolutions, cross-attention to the label tokens, label dropout
   for classifier-free guidance), with the cosine schedule (``schedule.kind``) and the learned variance with the
   hybrid loss (``diffusion.learned_variance``) as switches;
4. sampling: DDPM with all T steps and with ``evaluation.respaced_steps`` respaced steps, DDIM, CFG at every
   ``guidance.sweep`` scale, decoding through the autoencoder; FID / IS / accuracy by the project's MNIST
   evaluator, time per 1,000 images; the full VLB in bits/dim on held-out latents.

``table=true`` (``difflab run mnist-ldm --table``) trains every model of the comparison in the same run folder
and writes one table: pixel DDPM (1,000 steps) and DDIM at 50/100/200 steps; latent DDPM; latent + CFG at each
scale; + cosine schedule; + learned variance (1,000 and respaced steps); all combined (+ attention at every
resolution). The pixel model is trained by the shared image stages (:mod:`difflab.experiments.images`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from difflab.data.images import ImageSet
from difflab.diffusion.schedule import NoiseSchedule, ScheduleConfig
from difflab.diffusion.vlb import FIXED_VARIANCES, full_vlb
from difflab.errors import CheckpointError, ConfigError
from difflab.experiments import images as stages
from difflab.experiments.autoencoder import (
    VAE_KINDS,
    AutoencoderTrainingConfig,
    build_autoencoder,
    check_autoencoder_input,
    compression,
    given_autoencoder,
    train_autoencoder,
)
from difflab.experiments.images import QUANTISATION_LEVELS, ImageDataConfig
from difflab.experiments.runs import RunFolder, setup_ranks, trained_only
from difflab.metrics.reconstruction import reconstruction_metrics
from difflab.models.unet import UNet, UNetConfig, count_parameters, describe
from difflab.report import sections
from difflab.report.document import Report
from difflab.report.markdown import figure_lines, table
from difflab.report.rundata import RunContents
from difflab.seeding import mix_seed, seed_everything, seeded_generator
from difflab.training import checkpoint as ckpt
from difflab.training.logging import RunLogger, read_series
from difflab.training.precision import to_fast_layout
from difflab.training.trainer import TrainConfig
from difflab.viz import plots2d
from difflab.viz.images import image_rows_figure, save_grid


@dataclass(frozen=True)
class VAEConfig:
    """Where the autoencoder comes from (see the module docstring). ``scaling_factor`` > 0 replaces the one from the
    data (``train``, ``run``) or from the pretrained VAE's config (``diffusers``); ``eval_images`` held-out images
    are reconstructed for PSNR / SSIM; ``batch_size`` for encoding and decoding."""

    kind: str = "train"
    path: str = ""
    scaling_factor: float = 0.0
    training: AutoencoderTrainingConfig = field(default_factory=AutoencoderTrainingConfig)
    batch_size: int = 500
    eval_images: int = 2000

    def __post_init__(self) -> None:
        if self.kind not in VAE_KINDS:
            raise ConfigError(f"vae.kind must be one of {', '.join(VAE_KINDS)}, got {self.kind!r}")
        if self.kind != "train" and not self.path:
            raise ConfigError(f"vae.kind={self.kind} needs vae.path=DIR")
        if self.scaling_factor < 0 or self.batch_size < 1 or self.eval_images < 2:
            raise ConfigError("vae.scaling_factor must be >= 0, vae.batch_size >= 1 and vae.eval_images >= 2")


@dataclass(frozen=True)
class DiffusionConfig:
    """Improved-DDPM switches. ``learned_variance``: the U-Net outputs ``[eps, v]`` and trains on
    ``L_simple + vlb_weight L_vlb``; DDPM then samples with the learned variance, else with ``fixed_variance``
    (``beta`` or ``posterior``)."""

    learned_variance: bool = False
    vlb_weight: float = 0.001
    fixed_variance: str = "beta"

    def __post_init__(self) -> None:
        if self.fixed_variance not in FIXED_VARIANCES:
            raise ConfigError(f"diffusion.fixed_variance must be one of {', '.join(FIXED_VARIANCES)}")
        if self.vlb_weight < 0:
            raise ConfigError("diffusion.vlb_weight must be >= 0")


@dataclass(frozen=True)
class LDMGuidanceConfig:
    """Classifier-free guidance ``eps_u + w (eps_c - eps_u)``: the main scale ``w``, the scales of the sweep, the
    label dropout of training, and digits per row of the grid."""

    w: float = 2.0
    sweep: tuple[float, ...] = (1.5, 2.0, 3.0)
    label_dropout: float = 0.1
    grid_per_digit: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.label_dropout < 1:
            raise ConfigError("guidance.label_dropout must be in [0, 1)")
        if not self.sweep or self.grid_per_digit < 1:
            raise ConfigError("guidance.sweep must not be empty and guidance.grid_per_digit must be >= 1")


@dataclass(frozen=True)
class LDMEvaluationConfig:
    """Samples scored per row (FID / IS by the project's MNIST evaluator against the 10k test digits), samplers,
    and the held-out images of the full VLB (``vlb_images``, 0 = skip; T network evaluations each).

    ``clip_latents`` clips every x_0 prediction of the latent samplers to ``[-m, m]`` with ``m`` the largest absolute
    value of the (scaled) training latents, as pixel samplers clip to [-1, 1] (Ho et al.'s ``clip_denoised``).
    Without it the cosine schedule fails: its last step has ``alpha_bar_T`` ~ 2e-9 (beta clipped to 0.999), so
    ``x0 = (x_T - sqrt(1 - alpha_bar_T) eps) / sqrt(alpha_bar_T)`` turns an eps error of 0.09 (measured) into an
    x_0 error of ~1,800, which the first posterior mean carries into x_{T-1} at ~3x its standard deviation."""

    n_samples: int = 300
    batch_size: int = 500
    ddim_steps: tuple[int, ...] = (50, 100, 200)
    respaced_steps: int = 100
    vlb_images: int = 32
    throughput_batch: int = 256
    seed: int = 4321
    clip_latents: bool = True

    def __post_init__(self) -> None:
        if self.n_samples < 2 or self.batch_size < 1 or not self.ddim_steps or min(self.ddim_steps) < 1:
            raise ConfigError("evaluation needs n_samples >= 2, batch_size >= 1 and ddim_steps >= 1")
        if self.respaced_steps < 1 or self.vlb_images < 0 or self.throughput_batch < 1:
            raise ConfigError("evaluation needs respaced_steps >= 1, vlb_images >= 0 and throughput_batch >= 1")


@dataclass(frozen=True)
class PixelBaselineConfig:
    """The pixel-space DDPM of the table (unconditional, fixed variance; trained by the image recipes' stages).

    Its training budget is the latent + CFG model's plus the autoencoder's ("comparable training compute"): on
    the CPU, 600 steps of this U-Net on 28 x 28 pixels (0.83 s each) cost about what 2,000 latent steps and 1,000
    autoencoder steps do; the report prints the measured seconds of each.
    """

    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("linear", 1000))
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, time_conditioning="film", mid_attention=True
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=600,
            batch_size=128,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.995,
            eval_every=250,
            log_every=50,
            checkpoint_every=250,
        )
    )
    vlb: bool = True


@dataclass(frozen=True)
class TableConfig:
    """The comparison of ``table=true``: the pixel baseline, and the attention levels of the combined model."""

    pixel: PixelBaselineConfig = field(default_factory=PixelBaselineConfig)
    combined_attention_levels: tuple[int, ...] = (0, 1)


def _vae_training(steps: int) -> AutoencoderTrainingConfig:
    """The autoencoder recipe's training config with ``steps`` steps."""
    base = AutoencoderTrainingConfig()
    return replace(base, train=replace(base.train, steps=steps))


@dataclass(frozen=True)
class MnistLDMConfig:
    """``mnist-ldm``: the CPU-sized defaults; ``configs/mnist-ldm.yaml`` holds the reference (GPU) sizes.

    ``unet.in_channels`` / ``unet.out_channels`` are set from the autoencoder's latent channels (doubled outputs
    with the learned variance); the values here are only documentation.
    """

    recipe: str = "mnist-ldm"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/mnist-ldm-cpu"
    progress: bool = True
    table: bool = False
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    vae: VAEConfig = field(default_factory=lambda: VAEConfig(training=_vae_training(steps=1000)))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig("linear", 1000))
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            in_channels=4,
            out_channels=4,
            base_channels=32,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_levels=(1,),
            mid_attention=True,
            time_conditioning="film",
            num_classes=10,
            cross_attention_levels=(0, 1),
            mid_cross_attention=True,
            context_tokens=4,
            class_conditioning="both",
        )
    )
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=2000,
            batch_size=128,
            lr=1e-3,
            weight_decay=1e-4,
            warmup_steps=200,
            ema_decay=0.999,
            eval_every=500,
            log_every=50,
            checkpoint_every=500,
        )
    )
    guidance: LDMGuidanceConfig = field(default_factory=LDMGuidanceConfig)
    evaluation: LDMEvaluationConfig = field(default_factory=LDMEvaluationConfig)
    table_config: TableConfig = field(default_factory=TableConfig)

    def __post_init__(self) -> None:
        if self.recipe != "mnist-ldm":
            raise ConfigError(f"this config is for the 'mnist-ldm' recipe, got recipe={self.recipe!r}")
        bad = [
            level
            for level in self.table_config.combined_attention_levels
            if not 0 <= level < len(self.unet.channel_mults)
        ]
        if bad:
            raise ConfigError(f"table_config.combined_attention_levels {bad} outside the U-Net's levels")
        # Sampler steps must fit every schedule they run on, checked before training rather than after it.
        limit = self.schedule.num_timesteps
        if self.table:
            limit = min(limit, self.table_config.pixel.schedule.num_timesteps)
        steps = {"evaluation.respaced_steps": self.evaluation.respaced_steps}
        steps["evaluation.ddim_steps"] = max(self.evaluation.ddim_steps)
        for key, value in steps.items():
            if value > limit:
                raise ConfigError(f"{key}={value} exceeds the schedules' num_timesteps={limit}")


# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One diffusion model of a run: where it works, how it is built and trained."""

    name: str
    label: str
    space: str  # "pixel" | "latent"
    schedule: ScheduleConfig
    unet: UNetConfig
    train: TrainConfig
    learned_variance: bool = False
    label_dropout: float = 0.0

    @property
    def conditional(self) -> bool:
        return self.unet.num_classes > 0


@dataclass(frozen=True)
class Row:
    """One line of the results: a variant sampled by ``sampler`` with ``steps`` (0 = all T) at CFG scale ``w``."""

    variant: str
    label: str
    sampler: str
    steps: int = 0
    w: float | None = None


def latent_variant(
    config: MnistLDMConfig,
    latent_channels: int,
    *,
    conditional: bool = True,
    schedule_kind: str | None = None,
    learned_variance: bool | None = None,
    attention_levels: tuple[int, ...] | None = None,
    label: str = "",
) -> Variant:
    """The latent model of ``config`` with some switches changed (None keeps the config's)."""
    schedule = replace(config.schedule, kind=schedule_kind or config.schedule.kind)
    learned = config.diffusion.learned_variance if learned_variance is None else learned_variance
    unet = replace(config.unet, in_channels=latent_channels, out_channels=latent_channels * (2 if learned else 1))
    extended = attention_levels is not None and tuple(sorted(attention_levels)) != tuple(sorted(unet.attention_levels))
    if attention_levels is not None:
        unet = replace(unet, attention_levels=tuple(attention_levels))
    if not conditional:
        unet = replace(
            unet, num_classes=0, class_conditioning="add", cross_attention_levels=(), mid_cross_attention=False
        )
    name = "latent" + ("-cfg" if unet.num_classes else "")
    name += f"-{schedule.kind}" if schedule.kind != "linear" else ""
    name += "-learned" if learned else ""
    name += "-attn" if extended else ""
    return Variant(
        name,
        label or name,
        "latent",
        schedule,
        unet,
        config.train,
        learned,
        config.guidance.label_dropout if unet.num_classes else 0.0,
    )


def table_plan(config: MnistLDMConfig, latent_channels: int) -> tuple[list[Variant], list[Row]]:
    """The models and rows of ``table=true``."""
    pixel_config = config.table_config.pixel
    pixel = Variant("pixel", "pixel DDPM", "pixel", pixel_config.schedule, pixel_config.unet, pixel_config.train)
    latent = latent_variant(
        config, latent_channels, conditional=False, schedule_kind="linear", learned_variance=False, label="latent DDPM"
    )
    cfg = latent_variant(config, latent_channels, schedule_kind="linear", learned_variance=False, label="latent + CFG")
    cosine = latent_variant(
        config, latent_channels, schedule_kind="cosine", learned_variance=False, label="+ cosine schedule"
    )
    learned = latent_variant(
        config, latent_channels, schedule_kind="linear", learned_variance=True, label="+ learned variance"
    )
    combined = latent_variant(
        config,
        latent_channels,
        schedule_kind="cosine",
        learned_variance=True,
        attention_levels=config.table_config.combined_attention_levels,
        label="combined (cosine + learned variance + attention at every level)",
    )
    w, respaced = config.guidance.w, config.evaluation.respaced_steps
    rows = [Row("pixel", "pixel DDPM", "ddpm")]
    rows += [Row("pixel", f"pixel DDIM-{steps}", "ddim", steps) for steps in config.evaluation.ddim_steps]
    rows += [Row(latent.name, "latent DDPM", "ddpm")]
    rows += [Row(cfg.name, f"latent + CFG, w = {scale:g}", "ddpm", 0, scale) for scale in config.guidance.sweep]
    rows += [
        Row(cfg.name, f"latent + CFG, w = {w:g}, DDPM-{respaced} respaced (fixed variance)", "ddpm", respaced, w),
        Row(cosine.name, f"+ cosine schedule, w = {w:g}", "ddpm", 0, w),
        Row(learned.name, f"+ learned variance, w = {w:g}", "ddpm", 0, w),
        Row(learned.name, f"+ learned variance, w = {w:g}, DDPM-{respaced} respaced", "ddpm", respaced, w),
        Row(combined.name, f"combined, w = {w:g}", "ddpm", 0, w),
        Row(combined.name, f"combined, w = {w:g}, DDPM-{respaced} respaced", "ddpm", respaced, w),
    ]
    return [pixel, latent, cfg, cosine, learned, combined], rows


def single_plan(config: MnistLDMConfig, latent_channels: int) -> tuple[list[Variant], list[Row]]:
    """The one latent model of ``config`` and its rows (guidance sweep, DDIM, respaced DDPM)."""
    variant = latent_variant(config, latent_channels)
    ev, w = config.evaluation, config.guidance.w
    if not variant.conditional:
        return [variant], [
            Row(variant.name, "latent DDPM", "ddpm"),
            Row(variant.name, f"latent DDIM-{ev.ddim_steps[0]}", "ddim", ev.ddim_steps[0]),
            Row(variant.name, f"latent DDPM-{ev.respaced_steps} respaced", "ddpm", ev.respaced_steps),
        ]
    rows = [Row(variant.name, f"latent DDPM, w = {scale:g}", "ddpm", 0, scale) for scale in config.guidance.sweep]
    rows += [
        Row(variant.name, f"latent DDIM-{ev.ddim_steps[0]}, w = {w:g}", "ddim", ev.ddim_steps[0], w),
        Row(variant.name, f"latent DDPM-{ev.respaced_steps} respaced, w = {w:g}", "ddpm", ev.respaced_steps, w),
    ]
    return [variant], rows


# --------------------------------------------------------------------------------------------------------------
def prepare_autoencoder(
    config: MnistLDMConfig,
    run: RunFolder,
    logger: RunLogger,
    train: ImageSet,
    heldout: ImageSet,
    device: torch.device,
    echo: Any,
    given: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """The autoencoder of ``config.vae`` (trained here, loaded from a run, or a pretrained diffusers VAE) in eval
    mode, and what to report about it. ``given``: the autoencoder of ``vae.kind=run|diffusers`` when the caller
    has already loaded it (:func:`given_autoencoder`), else it is loaded here."""
    vae_config = config.vae
    info: dict[str, Any] = {"kind": vae_config.kind, "path": vae_config.path}
    shape = tuple(train.images.shape[1:])
    if vae_config.kind == "train":
        vae, result = train_autoencoder(
            run,
            logger,
            train.images,
            heldout.images[:256],
            vae_config.training,
            config.seed,
            device,
            config.progress,
            echo,
            key="vae.training.model",
        )
        info["train_seconds"] = round(result.seconds, 1)
    else:
        vae = given if given is not None else given_autoencoder(vae_config, shape, device)
        record = Path(vae_config.path) / "metrics.json"
        if vae_config.kind == "run" and record.is_file():
            info["train_seconds"] = json.loads(record.read_text()).get("training", {}).get("seconds")
    vae = _ready(vae, vae_config, device)
    info.update(description=vae.description, scaling_factor=vae.scaling_factor, compression=compression(vae, shape))
    return vae, info


def _ready(vae: Any, vae_config: VAEConfig, device: torch.device) -> Any:
    """``vae`` on ``device`` in eval mode without gradients, with ``vae.scaling_factor`` overriding its own if set."""
    if vae_config.scaling_factor > 0:
        vae.scaling_factor = vae_config.scaling_factor
    return vae.to(device).eval().requires_grad_(False)


def latent_clip_bound(config: MnistLDMConfig, train_latents: ImageSet) -> float | None:
    """The bound latent samplers clip x_0 predictions to: the largest |value| of the scaled training latents
    (``evaluation.clip_latents``), else None."""
    return float(train_latents.images.abs().max()) if config.evaluation.clip_latents else None


def data_digest(train: ImageSet, heldout: ImageSet) -> str:
    return ckpt.tensor_digest(
        {
            "train": train.images,
            "train_labels": train.labels,
            "heldout": heldout.images,
            "heldout_labels": heldout.labels,
        }
    )


@torch.inference_mode()
def encode_all(vae: Any, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Scaled latents of images (N, C, H, W), encoded in batches; (N, c, h, w) float32 on the CPU."""
    return torch.cat(
        [vae.encode(images[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(images), batch_size)]
    )


def cached_latents(
    run_dir: Path,
    vae: Any,
    train: ImageSet,
    heldout: ImageSet,
    batch_size: int,
    device: torch.device,
    echo: Any = print,
    save: bool = True,
) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    """``(train latents, held-out latents, info)``: read from ``RUN/latents/latents-<key>.safetensors`` when the key
    (a hash of the autoencoder's weights and scaling factor and of the images) matches, else encoded and saved
    (``save=False``: not saved, for the ranks other than 0 of a torchrun job)."""
    weights = ckpt.tensor_digest({k: v for k, v in vae.state_dict().items()})
    key = hashlib.sha256(f"{weights}|{vae.scaling_factor!r}|{data_digest(train, heldout)}".encode()).hexdigest()[:16]
    path = Path(run_dir) / "latents" / f"latents-{key}.safetensors"
    info = {"path": str(path), "key": key}
    if path.is_file():
        tensors, metadata = ckpt.verified_tensors(path)
        if metadata.get("key") == key:
            info["cached"] = True
            return (
                ImageSet(tensors["train"], tensors["train_labels"], train.class_names),
                ImageSet(tensors["heldout"], tensors["heldout_labels"], heldout.class_names),
                info,
            )
    echo(f"[mnist-ldm] encoding {len(train) + len(heldout):,} images into latents -> {path}")
    start = time.perf_counter()
    tensors = {
        "train": encode_all(vae, train.images, batch_size, device),
        "train_labels": train.labels.clone(),
        "heldout": encode_all(vae, heldout.images, batch_size, device),
        "heldout_labels": heldout.labels.clone(),
    }
    info.update(cached=False, encode_seconds=round(time.perf_counter() - start, 1))
    metadata = {
        "key": key,
        "sha256": ckpt.tensor_digest(tensors),
        "scaling_factor": repr(vae.scaling_factor),
        "autoencoder": vae.description,
    }
    if save:
        ckpt.atomic_save_tensors(tensors, path, metadata)
    return (
        ImageSet(tensors["train"], tensors["train_labels"], train.class_names),
        ImageSet(tensors["heldout"], tensors["heldout_labels"], heldout.class_names),
        info,
    )


def decoder_of(variant: Variant) -> str:
    """The L_0 decoder of a variant's VLB: pixels are discretised (to their source's gray levels), latents
    continuous."""
    return "discretized" if variant.space == "pixel" else "gaussian"


def sampling_variance(variant: Variant, config: MnistLDMConfig) -> str:
    return "learned" if variant.learned_variance else config.diffusion.fixed_variance


@torch.inference_mode()
def measure_throughput(
    unet: UNetConfig,
    latent_shape: tuple[int, int, int],
    image_shape: tuple[int, int, int],
    decode: Any,
    batch: int,
    device: torch.device,
    repeats: int = 3,
) -> dict[str, Any]:
    """Seconds of one sampling step (a U-Net forward on ``batch`` inputs) in latent and in pixel space with the
    same U-Net width (``unet`` with the in/out channels changed), the decoder's seconds per batch, and the
    throughput ratio of sampling ``T`` steps: ``(T t_pixel) / (T t_latent + t_decode)`` at T = 1000.
    Weights are random: the cost of a forward pass does not depend on them."""

    def timed(fn: Any) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    generator = seeded_generator(0)
    results: dict[str, Any] = {"batch": batch}
    for name, shape in (("latent", latent_shape), ("pixel", image_shape)):
        config = replace(unet, in_channels=shape[0], out_channels=shape[0])
        model = to_fast_layout(UNet(config).to(device).eval(), device)
        x = torch.randn((batch, *shape), generator=generator).to(device)
        t = torch.full((batch,), 500, device=device, dtype=torch.long)
        y = torch.zeros(batch, dtype=torch.long, device=device) if config.num_classes else None
        results[f"{name}_step_seconds"] = timed(lambda m=model, x=x, t=t, y=y: m(x, t, y))
        results[f"{name}_parameters"] = count_parameters(model)
    z = torch.randn((batch, *latent_shape), generator=generator).to(device)
    results["decode_seconds"] = timed(lambda: decode(z))
    latent_total = 1000 * results["latent_step_seconds"] + results["decode_seconds"]
    results["speedup_1000_steps"] = 1000 * results["pixel_step_seconds"] / latent_total
    results["speedup_per_step"] = results["pixel_step_seconds"] / results["latent_step_seconds"]
    return results


def fit_to_data(config: MnistLDMConfig, data: ImageSet) -> tuple[MnistLDMConfig, list[str]]:
    """``config`` with the values only the data can give, as the pixel recipes fit theirs
    (:func:`~difflab.experiments.images.fit_unet_to_data`): the trained autoencoder's input channels, the
    conditional latent U-Net's class count and the table's pixel U-Net. Returns the config and the overrides
    (``key=value``), so a folder of RGB images or of 5 classes runs without further keys."""
    fitted: list[str] = []
    model = config.vae.training.model
    if config.vae.kind == "train" and model.in_channels != data.channels:
        training = replace(config.vae.training, model=replace(model, in_channels=data.channels))
        config = replace(config, vae=replace(config.vae, training=training))
        fitted.append(f"vae.training.model.in_channels={data.channels}")
    if config.unet.num_classes and config.unet.num_classes != data.num_classes:
        config = replace(config, unet=replace(config.unet, num_classes=data.num_classes))
        fitted.append(f"unet.num_classes={data.num_classes}")
    pixel_unet, changes = stages.fit_unet_to_data(config.table_config.pixel.unet, data)
    if changes:
        pixel = replace(config.table_config.pixel, unet=pixel_unet)
        config = replace(config, table_config=replace(config.table_config, pixel=pixel))
        fitted += [f"table_config.pixel.{change}" for change in changes]
    return config, fitted


# --------------------------------------------------------------------------------------------------------------
def run_mnist_ldm(
    config: MnistLDMConfig, fresh: bool = False, echo: Callable[[str], object] = print, train_only: bool = False
) -> RunFolder:
    """Latent diffusion (one model, or the whole comparison with ``config.table``) into ``config.run_dir``
    (``train_only``: ``difflab train``, the autoencoder, the latent cache and the diffusion models alone)."""
    wall = time.perf_counter()
    device, echo = setup_ranks(config, echo)
    train, heldout = stages.load_image_data(config.data, config.seed)
    config, fitted = fit_to_data(config, train)
    if fitted:
        echo(f"[mnist-ldm] from the data: {' '.join(fitted)}")
    # A given autoencoder is loaded, and one to train is built, before the run folder exists, so a bad vae.path or
    # an image size the autoencoder cannot halve leaves no folder behind.
    given = given_autoencoder(config.vae, tuple(train.images.shape[1:]), device)
    if given is None:
        check_autoencoder_input(config.vae.training.model, tuple(train.images.shape[1:]), "vae.training.model")
    # The plain run and the table share a folder: the autoencoder, the latents and equal models are reused.
    run = RunFolder.open(
        config.run_dir, "mnist-ldm", config, fresh=fresh, ignore_keys=("run_dir", "table", "table_config")
    )
    stages.record_classes(run, train)
    with run.guard():
        seed_everything(config.seed)
        logger = RunLogger(run.path)
        image_shape = tuple(train.images.shape[1:])
        pixel_levels = QUANTISATION_LEVELS[config.data.source]  # the pixel model's discretised decoder
        echo(
            f"[mnist-ldm] run folder {run.path} | {len(train):,} training images {image_shape} | device {device}"
            f"{' | the full table' if config.table else ''}"
        )
        with run.stage("evaluator"):
            evaluator = stages.evaluator_for(config.data, device, echo) if run.main and not train_only else None
        with run.stage("autoencoder"):
            vae, vae_info = prepare_autoencoder(config, run, logger, train, heldout, device, echo, given)
            scored = heldout.images[: config.vae.eval_images]
            vae_info["reconstruction"] = reconstruction_metrics(
                lambda x: vae.decode(vae.encode(x)), scored, config.vae.batch_size, device
            )
        with run.stage("latents"):
            train_latents, heldout_latents, cache_info = cached_latents(
                run.path, vae, train, heldout, config.vae.batch_size, device, echo, save=run.main
            )
        latent_shape = tuple(train_latents.images.shape[1:])
        latent_bound = latent_clip_bound(config, train_latents)
        # x_0 predictions are clipped to the data's range: [-1, 1] for pixels, the training latents' for latents.
        clip_of = {"pixel": 1.0, "latent": latent_bound}
        echo(
            f"[mnist-ldm] {vae.description}; latents {latent_shape}, "
            f"PSNR {vae_info['reconstruction']['psnr']:.2f} dB, SSIM {vae_info['reconstruction']['ssim']:.4f}"
        )
        plan = table_plan if config.table else single_plan
        variants, rows = plan(config, latent_shape[0])
        models: dict[str, dict[str, Any]] = {}
        trained: dict[str, tuple[torch.nn.Module, NoiseSchedule]] = {}
        for variant in variants:
            data, held = (train, heldout) if variant.space == "pixel" else (train_latents, heldout_latents)
            schedule = NoiseSchedule.from_config(variant.schedule).to(device)
            echo(
                f"[mnist-ldm] training '{variant.name}': {describe(variant.unet, data.size)}, "
                f"{variant.schedule.kind} schedule{', learned variance' if variant.learned_variance else ''}"
            )
            with run.stage(f"train {variant.name}"):
                trainer, result = stages.train_image_denoiser(
                    run,
                    logger,
                    data,
                    held,
                    schedule,
                    variant.unet,
                    variant.train,
                    config.seed,
                    device,
                    config.progress,
                    label_dropout=variant.label_dropout,
                    name=variant.name,
                    learned_variance=variant.learned_variance,
                    vlb_weight=config.diffusion.vlb_weight,
                    decoder=decoder_of(variant),
                    decoder_levels=pixel_levels,
                )
            model = trainer.eval_model.eval()
            trained[variant.name] = (model, schedule)
            models[variant.name] = {
                "label": variant.label,
                "space": variant.space,
                "schedule": variant.schedule.kind,
                "learned_variance": variant.learned_variance,
                "description": describe(variant.unet, data.size),
                "parameters": count_parameters(model),
                "train_seconds": round(result.seconds, 1),
                "steps": result.step,
                "batch_size": variant.train.batch_size,
                "final_validation": result.final_validation,
                "weights_sha256": ckpt.tensor_digest(model.state_dict()),
            }
        if train_only:
            logger.close()
            return trained_only(run, "mnist-ldm", wall, echo)
        results = []
        decode = vae.decode
        for row in rows:
            variant = next(v for v in variants if v.name == row.variant)
            model, schedule = trained[variant.name]
            shape = image_shape if variant.space == "pixel" else latent_shape
            labels = (
                stages.balanced_labels(config.evaluation.n_samples, variant.unet.num_classes)
                if variant.conditional
                else None
            )
            slug = _slug(row)
            clip_x0 = clip_of[variant.space]
            # A rerun reuses the samples of a row when they came from the same weights (and latents).
            identity = {
                "weights_sha256": models[variant.name]["weights_sha256"],
                "latents": cache_info["key"],
                "n": config.evaluation.n_samples,
                "seed": config.evaluation.seed,
                "variance": sampling_variance(variant, config),
                "clip_x0": clip_x0,
            }
            sampled = _reuse_samples(run, slug, identity)
            reused = sampled is not None
            if sampled is None:
                with run.stage(f"sample {variant.name}"):
                    sampled = stages.sample_images(
                        model,
                        schedule,
                        config.evaluation.n_samples,
                        shape,
                        sampler=row.sampler,
                        steps=row.steps,
                        eta=0.0,
                        batch_size=config.evaluation.batch_size,
                        seed=config.evaluation.seed,
                        device=device,
                        labels=labels,
                        guidance=1.0 if row.w is None else row.w,
                        num_classes=variant.unet.num_classes,
                        show_progress=config.progress,
                        variance=sampling_variance(variant, config),
                        clip_x0=clip_x0,
                        decode=decode if variant.space == "latent" else None,
                    )
                if run.main:  # every rank draws its shard of the samples; rank 0 keeps them
                    stages.save_samples(run.sub("samples", f"{slug}.pt"), sampled)
                    record = {
                        **identity,
                        "seconds": sampled.seconds,
                        "network_evaluations": sampled.network_evaluations,
                    }
                    ckpt.atomic_write_bytes(run.sub("samples", f"{slug}.json"), json.dumps(record).encode())
            with run.stage("evaluate"):
                scores = {"n": len(sampled.images)} if evaluator is None else evaluator.evaluate(sampled.images, labels)
            steps = row.steps or schedule.num_timesteps
            results.append(
                {
                    "label": row.label,
                    "variant": variant.name,
                    "sampler": row.sampler,
                    "steps": steps,
                    "w": row.w,
                    "slug": slug,
                    **scores,
                    "seconds_per_1000": sampled.seconds / len(sampled.images) * 1000,
                    "network_evaluations": sampled.network_evaluations,
                    "reused_samples": reused,
                    "train_seconds": models[variant.name]["train_seconds"],
                }
            )
            fid = f"FID {scores['fid']:.2f}" if "fid" in scores else "not scored (no evaluator for this data)"
            echo(f"[mnist-ldm] {row.label}: {fid}, {results[-1]['seconds_per_1000']:.1f} s per 1,000 images")
        if not run.main:  # rank 0 alone scores, draws and reports
            logger.close()
            return run
        vlb: dict[str, Any] = {}
        with run.stage("vlb"):
            count = config.evaluation.vlb_images
            for variant in variants:
                if not count or (variant.space == "pixel" and not config.table_config.pixel.vlb):
                    continue
                model, schedule = trained[variant.name]
                held = heldout if variant.space == "pixel" else heldout_latents
                x0, y = held.images[:count].to(device), held.labels[:count].to(device)
                result = full_vlb(
                    model,
                    schedule,
                    x0,
                    labels=y if variant.conditional else None,
                    generator=seeded_generator(mix_seed(config.seed, 0, 97), device),
                    decoder=decoder_of(variant),
                    batch_size=count,
                    clip_x0=clip_of[variant.space],
                    levels=pixel_levels,
                )
                vlb[variant.name] = {
                    "bits_per_dim": result.total,
                    "variance": result.variance,
                    "by_variance": result.by_variance,
                    "prior": result.prior,
                    "terms": result.terms,
                    "decoder_nll": result.decoder,
                    "n": count,
                    "decoder": decoder_of(variant),
                    "decoder_levels": pixel_levels if variant.space == "pixel" else None,
                    "space": variant.space,
                }
        with run.stage("throughput"):
            # The same U-Net (each model's own width) run on latents and on pixels: the latent model's, and in the
            # table also the pixel baseline's.
            throughput = []
            for variant in [variants[2], variants[0]] if config.table else variants[:1]:
                measured = measure_throughput(
                    variant.unet, latent_shape, image_shape, decode, config.evaluation.throughput_batch, device
                )
                measured["unet"] = describe(replace(variant.unet, in_channels=1, out_channels=1), image_shape[1])
                measured["model"] = variant.name
                throughput.append(measured)
        with run.stage("figures"):
            _figures(run, logger, results, variants, vae, heldout, config, device)
        logger.close()
        metrics: dict[str, Any] = {
            "autoencoder": vae_info,
            "latents": {**cache_info, "shape": list(latent_shape)},
            "models": models,
            "rows": results,
            "vlb": vlb,
            "throughput": throughput,
            "evaluation": {
                "n": config.evaluation.n_samples,
                "latent_clip_x0": latent_bound,
                "reference": "project MNIST evaluator (reference CNN features), MNIST test 10k"
                if evaluator is not None
                else "none (not MNIST)",
            },
        }
        if evaluator is not None:
            with run.stage("evaluate"):
                metrics["calibration"] = {
                    str(config.evaluation.n_samples): evaluator.calibration(config.evaluation.n_samples)
                }
        metrics["timings_seconds"] = {k: round(v, 1) for k, v in run.timings.items()}
        metrics["timings_seconds"]["total"] = round(time.perf_counter() - wall, 1)
        metrics["targets"] = ldm_targets(metrics, config)
        run.write_metrics(metrics)
        run.write_report(build_report)
        run.complete()
    echo(f"[mnist-ldm] done in {metrics['timings_seconds']['total']:.0f} s | report {run.sub('report.md')}")
    return run


def train_mnist_ldm(config: MnistLDMConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """``difflab train mnist-ldm`` (``table=true`` too): the autoencoder and every diffusion model, exported."""
    return run_mnist_ldm(config, fresh, echo, train_only=True)


def _reuse_samples(run: RunFolder, slug: str, identity: dict[str, Any]) -> stages.SampleResult | None:
    """The samples of a row saved by an earlier session, if their record matches ``identity``."""
    record_path, samples_path = run.sub("samples", f"{slug}.json"), run.sub("samples", f"{slug}.pt")
    if not (record_path.is_file() and samples_path.is_file()):
        return None
    try:
        record = json.loads(record_path.read_text())
        content = torch.load(samples_path, weights_only=True)
    except Exception:  # a damaged record or sample file: the row is drawn again
        return None
    if not isinstance(record, dict) or not isinstance(content, dict) or "images" not in content:
        return None
    if any(record.get(key) != value for key, value in identity.items()):
        return None
    return stages.SampleResult(
        content["images"], content.get("labels"), float(record["seconds"]), int(record["network_evaluations"])
    )


def _slug(row: Row) -> str:
    guidance = "" if row.w is None else f"_w{row.w:g}"
    return f"{row.variant}_{row.sampler}{row.steps or 'T'}{guidance}"


def _figures(
    run: RunFolder,
    logger: RunLogger,
    results: list[dict[str, Any]],
    variants: list[Variant],
    vae: Any,
    heldout: ImageSet,
    config: MnistLDMConfig,
    device: torch.device,
) -> None:
    """The autoencoder's reconstructions, a sample grid per model and the held-out loss curves, under ``figures/``."""
    shown = heldout.images[:16].to(device)
    with torch.no_grad():
        recon = vae.decode(vae.encode(shown)).clamp(-1, 1).cpu()
    image_rows_figure(
        [("held-out", shown.cpu()), ("reconstruction", recon)],
        run.sub("figures", "reconstructions.png"),
        "Autoencoder reconstructions of held-out digits",
    )
    per = config.guidance.grid_per_digit
    for variant in variants:
        candidates = [r for r in results if r["variant"] == variant.name and r["sampler"] == "ddpm"]
        if not candidates:
            continue
        preferred = [
            r for r in candidates if r["w"] == config.guidance.w and r["steps"] == max(c["steps"] for c in candidates)
        ]
        row = (preferred or candidates)[0]
        row_samples = run.sub("samples", f"{row['slug']}.pt")
        content = torch.load(row_samples, weights_only=True)
        images = content["images"]
        if "labels" in content:
            labels = content["labels"]
            picked = [images[labels == digit][:per] for digit in range(int(labels.max()) + 1)]
            images, nrow = torch.cat(picked), per
        else:
            images, nrow = images[: per * 8], per
        save_grid(images, run.sub("figures", f"grid_{variant.name}.png"), nrow=nrow)
    series = {}
    for variant in variants:
        steps, values = read_series(logger.path, f"{variant.name}/val_loss")
        if steps:
            series[variant.name] = (steps, values)
    if series:
        plots2d.curves(series, run.sub("figures", "loss.png"), "held-out eps MSE")


def ldm_targets(metrics: dict[str, Any], config: MnistLDMConfig) -> list[dict[str, Any]]:
    """The issue's figures to reach, where the run has the numbers for them."""
    targets: list[dict[str, Any]] = []
    rows = {r["label"]: r for r in metrics["rows"]}
    quality = metrics["autoencoder"].get("reconstruction", {})
    if config.data.source == "mnist" and quality:
        targets.append(
            {"target": "VAE reconstruction PSNR >= 22 dB", "value": quality["psnr"], "met": quality["psnr"] >= 22}
        )
        targets.append(
            {"target": "VAE reconstruction SSIM >= 0.90", "value": quality["ssim"], "met": quality["ssim"] >= 0.90}
        )
    w = config.guidance.w
    scored = "fid" in next(iter(rows.values()), {})
    main = next(
        (
            r
            for r in metrics["rows"]
            if r["w"] == w
            and r["sampler"] == "ddpm"
            and r["variant"].startswith("latent-cfg")
            and r["steps"] == max(x["steps"] for x in metrics["rows"] if x["variant"] == r["variant"])
        ),
        None,
    )
    pixel = rows.get("pixel DDPM")
    if not scored:
        main = pixel = None
    if main is not None and "accuracy" in main:
        targets.append(
            {
                "target": f"latent + CFG (w = {w:g}) class accuracy >= 97%",
                "value": main["accuracy"],
                "met": main["accuracy"] >= 0.97,
            }
        )
    if main is not None and pixel is not None:
        autoencoder_seconds = metrics["autoencoder"].get("train_seconds") or 0.0
        targets.append(
            {
                "target": f"latent + CFG (w = {w:g}) FID below pixel DDPM's ({pixel['fid']:.2f}); training "
                f"{main['train_seconds']:.0f} s + autoencoder {autoencoder_seconds:.0f} s vs "
                f"{pixel['train_seconds']:.0f} s",
                "value": main["fid"],
                "met": main["fid"] < pixel["fid"],
            }
        )
    for name in metrics["models"]:
        if not metrics["models"][name]["learned_variance"]:
            continue
        full = [r for r in metrics["rows"] if r["variant"] == name and r["sampler"] == "ddpm" and r["w"] == w]
        if len(full) >= 2 and scored:
            longest, shortest = max(full, key=lambda r: r["steps"]), min(full, key=lambda r: r["steps"])
            if longest["steps"] != shortest["steps"]:
                ratio = shortest["fid"] / longest["fid"]
                target = {
                    "target": f"{name}: DDPM-{shortest['steps']} respaced FID / DDPM-{longest['steps']} FID "
                    f"({longest['fid']:.2f}) <= 1.10 (within 10%)",
                    "value": ratio,
                    "met": ratio <= 1.10,
                }
                targets.append(stages.with_ratio_noise(target, longest, shortest, limit=0.10))
        fixed = name.replace("-learned", "")
        if name in metrics["vlb"] and fixed in metrics["vlb"]:
            ours, theirs = metrics["vlb"][name]["bits_per_dim"], metrics["vlb"][fixed]["bits_per_dim"]
            targets.append(
                {
                    "target": f"{name}: VLB below the fixed-variance {fixed}'s ({theirs:.3f} bits/dim)",
                    "value": ours,
                    "met": ours < theirs,
                }
            )
    speed = min(measured["speedup_1000_steps"] for measured in metrics["throughput"])
    targets.append(
        {
            "target": "latent sampling throughput >= 4x pixel sampling at equal U-Net width (the lower of "
            "the measured U-Nets)",
            "value": speed,
            "met": speed >= 4,
        }
    )
    return targets


def _clipping_sentence(bound: float | None) -> str:
    if bound is None:
        return (
            "Pixel samplers clip x_0 predictions to [-1, 1]; latent samplers do not clip (`evaluation.clip_latents="
            "false`), which breaks the cosine schedule's first steps (see `LDMEvaluationConfig`)."
        )
    return (
        f"Samplers clip x_0 predictions to the data's range: [-1, 1] for pixels, [-{bound:.2f}, {bound:.2f}] "
        "(the largest |value| of the scaled training latents) for latents."
    )


def _within(path: Path, folder: Path) -> Path:
    """``path`` relative to the run ``folder`` when it lies inside it (a run folder may have moved since)."""
    return path.relative_to(folder) if path.is_relative_to(folder) else path


def build_report(contents: RunContents) -> Report:
    """The ``mnist-ldm`` run's report, from its folder alone (``difflab report RUN`` rebuilds it; ``difflab invert``
    adds its round trips)."""
    config = contents.typed_config(MnistLDMConfig())
    metrics, folder, figures = contents.metrics, contents.path, contents.figure_file
    vae, comp = metrics["autoencoder"], metrics["autoencoder"]["compression"]
    quality = vae["reconstruction"]
    n = metrics["evaluation"]["n"]
    lines = [
        "# MNIST latent diffusion" + (": the comparison table" if config.table else ""),
        "",
        f"Autoencoder: {vae['description']} ({vae['kind']}"
        + (f", {vae['path']}" if vae["path"] else "")
        + (f", trained in {vae['train_seconds']:.0f} s" if vae.get("train_seconds") else "")
        + "). "
        f"Images {tuple(comp['image_shape'])} -> latents {tuple(comp['latent_shape'])} "
        f"({comp['values_factor']:g}x fewer values, {comp['spatial_factor']:g}x per side); held-out reconstruction "
        f"PSNR {quality['psnr']:.2f} dB, SSIM {quality['ssim']:.4f} (n = {quality['n']:,}). Latents cached in "
        f"`{_within(Path(metrics['latents']['path']), folder)}` (key {metrics['latents']['key']}).",
        "",
        f"Quality: FID and IS of n = {n:,} samples by the project's MNIST evaluator (features and softmax of its "
        "reference CNN, FID against the 10,000 MNIST test digits; not InceptionV3 numbers); accuracy = share of "
        "conditional samples the reference CNN assigns to the intended digit (balanced labels); FID sd = the FID's "
        "sampling noise at this n (bootstrap standard deviation, resampled within each intended digit). Time per 1,000 "
        "images includes decoding latents; training time is the diffusion model's (the autoencoder's is above). "
        "CFG: `eps_u + w (eps_c - eps_u)`. " + _clipping_sentence(metrics["evaluation"].get("latent_clip_x0")),
        "",
        "## Results",
        "",
        table(
            [
                "model",
                "sampler",
                "steps",
                "w",
                "n",
                "FID",
                "FID sd",
                "IS",
                "accuracy",
                "s per 1,000 images",
                "training s",
            ],
            [
                [
                    r["label"],
                    r["sampler"].upper(),
                    r["steps"],
                    "-" if r["w"] is None else f"{r['w']:g}",
                    r["n"],
                    r.get("fid"),
                    r.get("fid_std"),
                    r.get("inception_score"),
                    r.get("accuracy"),
                    r["seconds_per_1000"],
                    r["train_seconds"],
                ]
                for r in metrics["rows"]
            ],
            digits=2,
        ),
        "",
        "## Models",
        "",
        table(
            ["model", "space", "schedule", "variance", "network", "steps x batch", "training s"],
            [
                [
                    name,
                    m["space"],
                    m["schedule"],
                    "learned" if m["learned_variance"] else config.diffusion.fixed_variance,
                    m["description"],
                    f"{m['steps']:,} x {m['batch_size']}",
                    m["train_seconds"],
                ]
                for name, m in metrics["models"].items()
            ],
            digits=1,
        ),
        "",
    ]
    if metrics["vlb"]:
        lines += [
            "## Variational bound",
            "",
            "The full bound `L_T + sum_t L_t + L_0` over all T terms on held-out data, one network evaluation per "
            "term and image. Pixel models: bits per pixel of the 8-bit images (discretised decoder); latent models: "
            "bits per latent dimension of the continuous latents (Gaussian decoder density; comparable only "
            "between latent models with the same autoencoder). Fixed-variance models are scored with both "
            "sigma^2 = beta and sigma^2 = beta_tilde and the lower is reported. The reverse means use the clipped "
            "x_0 predictions the samplers use (above), so the bound is that of the model that is sampled.",
            "",
            table(
                ["model", "n", "bits/dim", "variance", "all variances", "L_T", "sum L_t", "L_0"],
                [
                    [
                        name,
                        v["n"],
                        v["bits_per_dim"],
                        v["variance"],
                        ", ".join(f"{k}: {x:.3f}" for k, x in v["by_variance"].items()),
                        v["prior"],
                        v["terms"],
                        v["decoder_nll"],
                    ]
                    for name, v in metrics["vlb"].items()
                ],
            ),
            "",
        ]
    lines += [
        "## Sampling throughput at equal U-Net width",
        "",
        f"Each U-Net run on latents {tuple(metrics['latents']['shape'])} and (1 in/out channel) on pixels "
        f"{tuple(comp['image_shape'])}: seconds per sampling step (one forward pass of a batch, median of 3, random "
        "weights: the cost does not depend on them), the autoencoder's decoding per batch, and the speed-up of "
        "sampling 1,000 steps + decoding over 1,000 pixel steps.",
        "",
        table(
            ["U-Net (of model)", "batch", "latent s/step", "pixel s/step", "decode s", "per step", "1,000 steps"],
            [
                [
                    f"{tp['unet']} ({tp['model']})",
                    tp["batch"],
                    tp["latent_step_seconds"],
                    tp["pixel_step_seconds"],
                    tp["decode_seconds"],
                    f"{tp['speedup_per_step']:.1f}x",
                    f"{tp['speedup_1000_steps']:.1f}x",
                ]
                for tp in metrics["throughput"]
            ],
            digits=4,
        ),
        "",
    ]
    if metrics["targets"]:
        lines += [
            "## Targets",
            "",
            table(["target", "measured", "met"], [[t["target"], t["value"], t["met"]] for t in metrics["targets"]]),
            "",
        ]
    for n_key, cal_rows in metrics.get("calibration", {}).items():
        lines += [
            f"Calibration rows at n = {int(n_key):,} (same evaluator, same count):",
            "",
            table(
                ["reference row", "n", "FID", "IS"],
                [[r["name"], r["n"], r["fid"], r["inception_score"]] for r in cal_rows],
            ),
            "",
        ]
    lines += ["## Figures", "", *figure_lines(figures("reconstructions.png"), folder, "Autoencoder reconstructions")]
    for name in metrics["models"]:
        caption = f"Samples of {name} (one row per digit when conditional)"
        lines += figure_lines(figures(f"grid_{name}.png"), folder, caption)
    lines += figure_lines(figures("loss.png"), folder, "Held-out eps MSE during training")
    return sections.markdown_report(contents, "\n".join(lines))


# -------------------------------------------------------------------------------------------- sampling commands
def _finished_autoencoder(config: MnistLDMConfig, path: Path, train: ImageSet, device: torch.device) -> Any:
    """The autoencoder a finished run used, loaded (never trained): its own, an autoencoder run's or diffusers'."""
    if config.vae.kind != "train":
        return _ready(given_autoencoder(config.vae, tuple(train.images.shape[1:]), device), config.vae, device)
    weights = path / "checkpoints" / "autoencoder.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no trained autoencoder ({weights} is missing); finish the run")
    vae = build_autoencoder(config.vae.training.model, tuple(train.images.shape[1:]), key="vae.training.model")
    ckpt.load_weights(vae, weights)
    return _ready(vae, config.vae, device)


def load_sampling_target(path: Path, config: MnistLDMConfig, device: torch.device) -> Any:
    """The :class:`~difflab.experiments.samplers.SamplingTarget` of a finished mnist-ldm run (the config's own
    latent model, also in a ``--table`` run), for ``difflab compare-samplers`` / ``sample`` / ``likelihood``.

    Samplers work on latents (C, h, w) with x_0 predictions clipped to the run's latent bound; a conditional model
    is sampled at ``guidance.w`` with the digits in turn, a learned-variance model through its eps channels.
    Quality is FID of the *decoded* samples by the built-in evaluator (MNIST only). The likelihood integrates the
    unclipped (null-label) model on held-out latents: bits per latent dimension of a continuous density, no
    dequantisation."""
    from difflab.experiments.mnist import BalancedGuidance, NullLabel, class_index
    from difflab.experiments.samplers import SamplingTarget
    from difflab.sampling.wrappers import DiffusionModel

    train, heldout = stages.load_image_data(config.data, config.seed)
    vae = _finished_autoencoder(config, path, train, device)
    image_shape = tuple(train.images.shape[1:])
    latent_shape = tuple(vae.latent_shape(image_shape))
    variant = latent_variant(config, latent_shape[0])
    weights = path / "checkpoints" / f"{variant.name}.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{path} has no trained '{variant.name}' ({weights} is missing); finish the run")
    network = UNet(variant.unet)
    ckpt.load_weights(network, weights)
    network = network.to(device).eval()
    schedule = NoiseSchedule.from_config(variant.schedule).to(device)
    # The run's latent cache (encoded again only if it is gone): the clipping bound and the held-out latents.
    train_latents, heldout_latents, _ = cached_latents(path, vae, train, heldout, config.vae.batch_size, device)
    bound = latent_clip_bound(config, train_latents)
    classes = variant.unet.num_classes
    guided = BalancedGuidance(network, classes, config.guidance.w) if classes else network
    unconditional = NullLabel(network, classes) if classes else network

    @torch.inference_mode()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, c, h, w), decoded in batches -> images (N, C, H, W) clipped to [-1, 1], on the CPU."""
        parts = [vae.decode(part.to(device)).clamp(-1, 1).cpu() for part in latents.split(config.vae.batch_size)]
        return torch.cat(parts)

    metrics, references_at = stages.fid_scoring(stages.evaluator_for(config.data, device, lambda _: None), decode)

    def variational_bound(x0: torch.Tensor) -> dict[str, Any]:
        # The full bound L_T + sum_t L_t + L_0 (T network evaluations per point) of the model the ODE integrates
        # (unconditional / null label, unclipped), Gaussian decoder for continuous latents.
        result = full_vlb(
            unconditional,
            schedule,
            x0.to(device),
            generator=seeded_generator(mix_seed(config.seed, 0, 97), device),
            decoder=decoder_of(variant),
            batch_size=config.evaluation.batch_size,
        )
        variance = "learned" if variant.learned_variance else f"best fixed: {result.variance}"
        return {
            "bits_per_dim": result.total,
            "variance": result.variance,
            "by_variance": result.by_variance,
            "n": len(x0),
            "description": f"n = {len(x0)}, all {schedule.num_timesteps} terms, variance {variance}, null label, "
            "x_0 unclipped, bits per latent dimension",
        }

    def conditioned(label: int | str | None, w: float | None) -> DiffusionModel:
        digit = None if label is None else class_index(config.data, label, classes, path)
        steered = BalancedGuidance(network, classes, config.guidance.w if w is None else w, digit)
        return DiffusionModel(stages.EpsPart(steered), schedule, "eps", clip_x0=bound)

    guidance = f", guidance w = {config.guidance.w:g} (labels 0-9 in turn)" if classes else ""
    clipping = f"x_0 predictions clipped to [-{bound:.2f}, {bound:.2f}]" if bound else "x_0 predictions not clipped"
    return SamplingTarget(
        path=path,
        recipe=config.recipe,
        model=DiffusionModel(stages.EpsPart(guided), schedule, "eps", clip_x0=bound),
        schedule=schedule,
        sample_shape=latent_shape,
        device=device,
        metrics=metrics,
        plot=lambda samples, out, title: save_grid(decode(samples[:64]), out, nrow=8),
        heldout=heldout_latents.images,
        batch_size=config.evaluation.batch_size,
        likelihood_model=DiffusionModel(stages.EpsPart(unconditional), schedule, "eps"),
        references_at=references_at,
        decode=decode,
        variational_bound=variational_bound,
        conditioned=conditioned if classes else None,
        class_index=(lambda label: class_index(config.data, label, classes, path)) if classes else None,
        description=f"{variant.name}: {describe(variant.unet, latent_shape[1])}{guidance}; {clipping}; "
        f"samples decoded by {vae.description}",
    )
