"""The ``autoencoder`` recipe: a KL-regularised convolutional VAE for latent diffusion.

Trains :class:`~difflab.models.autoencoder.KLAutoencoder` with an L1 (or L2) reconstruction loss plus a small KL
term, computes the latent scaling factor (1 / std of the training latents) and stores it with the weights, and
reports PSNR / SSIM of held-out reconstructions, the compression factor and a reconstruction figure. No
perceptual (LPIPS) term: its pretrained VGG / AlexNet weights cannot be fetched offline, so the loss is pixel-wise
only.

The stages (:func:`train_autoencoder`, :func:`load_autoencoder_run`) are reused by the ``mnist-ldm`` recipe.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab.data.batches import ShuffledBatches
from difflab.errors import CheckpointError, ConfigError
from difflab.experiments import images as stages
from difflab.experiments.images import ImageDataConfig
from difflab.experiments.runs import RunFolder, read_run, read_run_config, setup_ranks, trained_only
from difflab.metrics.reconstruction import reconstruction_metrics
from difflab.models.autoencoder import AutoencoderConfig, KLAutoencoder, load_diffusers_autoencoder
from difflab.models.unet import count_parameters
from difflab.report import sections
from difflab.report.document import Report
from difflab.report.markdown import figure, table
from difflab.report.rundata import RunContents
from difflab.seeding import mix_seed, seed_everything
from difflab.training import checkpoint as ckpt
from difflab.training import distributed
from difflab.training.autoencoder import RECONSTRUCTIONS, autoencoder_loss, latent_scaling_factor, random_crops
from difflab.training.logging import RunLogger, read_series
from difflab.training.trainer import TrainConfig, Trainer, TrainResult
from difflab.viz import plots2d
from difflab.viz.images import image_rows_figure

PSNR_TARGET, SSIM_TARGET = 22.0, 0.90
VAE_KINDS = ("train", "run", "diffusers")  # where a recipe's VAE comes from (mnist-ldm, rgb2ir)


@dataclass(frozen=True)
class AutoencoderTrainingConfig:
    """How the VAE is built and trained: ``loss = rec + kl_weight * KL`` (per pixel, see
    :func:`~difflab.training.autoencoder.autoencoder_loss`) on random ``crop`` x ``crop`` windows of the training
    images (0, or a crop as large as the images: whole images; the VAE is fully convolutional, so it then encodes
    whole images); ``scaling_images`` whole training images (0 = all) give the latent std whose inverse is the
    scaling factor."""

    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=2000,
            batch_size=64,
            lr=2e-3,
            warmup_steps=100,
            grad_clip=1.0,
            eval_every=250,
            log_every=50,
            checkpoint_every=250,
        )
    )
    kl_weight: float = 1e-6
    reconstruction: str = "l1"
    scaling_images: int = 10000
    crop: int = 0

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}")
        if self.kl_weight < 0 or self.scaling_images < 0:
            raise ConfigError("kl_weight and scaling_images must be >= 0")
        if self.crop < 0 or self.crop % self.model.downsample_factor:
            raise ConfigError(f"crop must be 0 or a multiple of {self.model.downsample_factor}, got {self.crop}")


@dataclass(frozen=True)
class ReconstructionEvalConfig:
    """Held-out images scored (0 = all of them) and shown in the figure."""

    n_heldout: int = 0
    batch_size: int = 500
    figure_images: int = 16

    def __post_init__(self) -> None:
        if self.n_heldout < 0 or self.batch_size < 1 or self.figure_images < 1:
            raise ConfigError("evaluation needs n_heldout >= 0, batch_size >= 1 and figure_images >= 1")


@dataclass(frozen=True)
class AutoencoderRecipeConfig:
    """``autoencoder``: a 4 x 7 x 7 latent for MNIST (compression x4 in values, x4 per side)."""

    recipe: str = "autoencoder"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/autoencoder"
    progress: bool = True
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    autoencoder: AutoencoderTrainingConfig = field(default_factory=AutoencoderTrainingConfig)
    evaluation: ReconstructionEvalConfig = field(default_factory=ReconstructionEvalConfig)

    def __post_init__(self) -> None:
        if self.recipe != "autoencoder":
            raise ConfigError(f"this config is for the 'autoencoder' recipe, got recipe={self.recipe!r}")


# --------------------------------------------------------------------------------------------------------------
def check_autoencoder_input(config: AutoencoderConfig, image_shape: tuple[int, ...], key: str) -> None:
    """A one-line ConfigError, naming the keys that change it, when a VAE of ``config`` cannot take images of
    ``image_shape`` (C, H, W): other channels, or sides its downsampling factor does not divide. ``key``: where
    ``config`` sits in the recipe's config (e.g. ``vae.training.model``)."""
    channels, height, width = image_shape
    if config.in_channels != channels:
        raise ConfigError(
            f"{key}.in_channels={config.in_channels} but the images have {channels} channels; set "
            f"{key}.in_channels={channels}"
        )
    factor = config.downsample_factor
    if height % factor or width % factor:
        raise ConfigError(
            f"the autoencoder takes images whose sides are multiples of {factor}, got {tuple(image_shape)}: "
            f"choose a data.size that {factor} divides, or fewer {key}.channel_mults"
        )


def build_autoencoder(
    config: AutoencoderConfig, image_shape: tuple[int, ...], key: str = "autoencoder.model"
) -> KLAutoencoder:
    """A VAE for images of ``image_shape`` (C, H, W), checked by :func:`check_autoencoder_input` first."""
    check_autoencoder_input(config, tuple(image_shape), key)
    return KLAutoencoder(config)


def train_autoencoder(
    run: RunFolder,
    logger: RunLogger,
    images: torch.Tensor,
    check: torch.Tensor,
    config: AutoencoderTrainingConfig,
    seed: int,
    device: torch.device,
    show_progress: bool,
    echo: Any = print,
    name: str = "autoencoder",
    key: str = "autoencoder.model",
) -> tuple[KLAutoencoder, TrainResult]:
    """Train (or resume) the VAE in ``run`` on ``images`` (N, C, H, W) in [-1, 1] (random ``config.crop`` crops
    when that is set and smaller than the images), validated on ``check`` (M, C, H, W); set its scaling factor
    from the first ``config.scaling_images`` whole training images and export ``checkpoints/<name>.safetensors``
    (weights + ``scaling_factor_buffer``) and ``<name>.json``. ``key``: where ``config.model`` sits in the recipe's
    config, for the error messages."""
    image_shape = tuple(images.shape[1:])
    torch.manual_seed(mix_seed(seed, 0, 71))
    model = build_autoencoder(config.model, image_shape, key).to(device)
    batches = ShuffledBatches((images.to(device),), config.train.batch_size, seed=mix_seed(seed, 0, 72))
    check = check.to(device)
    crop = config.crop if 0 < config.crop < min(image_shape[1:]) else 0
    if config.crop >= min(image_shape[1:]):
        echo(
            f"autoencoder crop {config.crop} is not smaller than the {image_shape[1]} x {image_shape[2]} images: "
            "training on whole images"
        )

    def loss_fn(net: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """batch: (images (B, C, H, W),), cropped to (B, C, crop, crop) when ``crop`` -> the VAE loss, a scalar."""
        x = random_crops(batch[0], crop, generator) if crop else batch[0]
        loss, _ = autoencoder_loss(net, x, generator, config.kl_weight, config.reconstruction)
        return loss

    def validate(net: torch.nn.Module) -> dict[str, float]:
        recon, mean, log_variance = net(check)
        kl = 0.5 * (mean**2 + torch.exp(log_variance) - 1.0 - log_variance).flatten(1).sum(dim=1).mean()
        return {"l1": float((recon - check).abs().mean()), "kl": float(kl)}

    signature = {
        "model": "KLAutoencoder",
        "config": repr(config.model),
        "kl_weight": config.kl_weight,
        "reconstruction": config.reconstruction,
    }
    if crop:
        signature["crop"] = crop
    trainer = Trainer(
        name,
        model,
        loss_fn,
        batches,
        config.train,
        run.path,
        logger,
        validate=validate,
        signature=signature,
        seed=mix_seed(seed, 0, 73),
        device=device,
        show_progress=show_progress,
        echo=echo,
    )
    result = trainer.fit()
    vae = trainer.eval_model.eval()
    count = config.scaling_images or len(images)
    vae.scaling_factor = latent_scaling_factor(vae, images[:count])
    info = {
        "name": name,
        "step": trainer.step,
        "signature": signature,
        "config": repr(config.model),
        "scaling_factor": vae.scaling_factor,
        "scaling_images": min(count, len(images)),
        "image_shape": list(image_shape),
        "latent_shape": list(vae.latent_shape(image_shape)),
    }
    # The export again, now with the scaling factor: rank 0 alone writes it, as the trainer's own export.
    distributed.on_main(lambda: ckpt.export_weights(trainer.weights_path, vae.state_dict(), info))
    return vae, result


def given_autoencoder(vae_config: Any, image_shape: tuple[int, ...], device: torch.device) -> Any:
    """The autoencoder a recipe's ``vae`` section names instead of training one: ``vae.kind=run`` (an
    ``autoencoder`` run's, on ``device``, which must take the images' channels) or ``vae.kind=diffusers`` (a local
    AutoencoderKL for images of ``image_shape`` (C, H, W)); None for ``vae.kind=train``. ``vae_config`` has
    ``kind``, ``path`` and ``scaling_factor``."""
    if vae_config.kind == "train":
        return None
    if vae_config.kind == "run":
        vae = load_autoencoder_run(vae_config.path, device)
        if vae.config.in_channels != image_shape[0]:
            raise ConfigError(
                f"vae.path={vae_config.path} holds a {vae.config.in_channels}-channel autoencoder; these images have "
                f"{image_shape[0]} channels"
            )
        return vae
    return load_diffusers_autoencoder(vae_config.path, image_shape, vae_config.scaling_factor)


def load_autoencoder_run(run_dir: str | Path, device: torch.device | str = "cpu") -> KLAutoencoder:
    """The VAE of a finished ``autoencoder`` run (its scaling factor comes with the weights)."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise ConfigError(f"{run_dir} is not an autoencoder run folder (no run.json)")
    recipe = read_run(run_dir)["recipe"]
    if recipe != "autoencoder":
        raise ConfigError(f"{run_dir} is a {recipe!r} run; vae.kind=run needs an 'autoencoder' run")
    config = read_run_config(run_dir, AutoencoderRecipeConfig())
    path = run_dir / "checkpoints" / "autoencoder.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the autoencoder run has not finished")
    model = KLAutoencoder(config.autoencoder.model)
    ckpt.load_weights(model, path)
    return model.to(device).eval()


def compression(vae: Any, image_shape: tuple[int, int, int]) -> dict[str, Any]:
    """Latent shape, values per image before / after and the compression factors."""
    latent = vae.latent_shape(tuple(image_shape))
    pixels, values = image_shape[0] * image_shape[1] * image_shape[2], latent[0] * latent[1] * latent[2]
    return {
        "image_shape": list(image_shape),
        "latent_shape": list(latent),
        "values_factor": pixels / values,
        "spatial_factor": image_shape[1] / latent[1],
    }


@torch.no_grad()
def latent_statistics(vae: Any, images: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """Mean and std of the scaled latents, overall and per channel."""
    latents = torch.cat([vae.encode(images[s : s + batch_size]).cpu() for s in range(0, len(images), batch_size)])
    return {
        "mean": float(latents.mean()),
        "std": float(latents.std()),
        "channel_std": [round(float(v), 4) for v in latents.transpose(0, 1).flatten(1).std(dim=1)],
    }


# --------------------------------------------------------------------------------------------------------------
def run_autoencoder(
    config: AutoencoderRecipeConfig,
    fresh: bool = False,
    echo: Callable[[str], object] = print,
    train_only: bool = False,
) -> RunFolder:
    """Train and evaluate the VAE into ``config.run_dir`` (``train_only``: ``difflab train``, no evaluation)."""
    wall = time.perf_counter()
    device, echo = setup_ranks(config, echo)
    train, heldout = stages.load_image_data(config.data, config.seed)
    run = RunFolder.open(config.run_dir, "autoencoder", config, fresh=fresh)
    with run.guard():
        seed_everything(config.seed)
        logger = RunLogger(run.path)
        shape = tuple(train.images.shape[1:])
        echo(f"[autoencoder] run folder {run.path} | {len(train):,} training images {shape} | device {device}")
        with run.stage("train"):
            vae, result = train_autoencoder(
                run,
                logger,
                train.images,
                heldout.images[:256],
                config.autoencoder,
                config.seed,
                device,
                config.progress,
                echo,
            )
        if train_only or not run.main:  # `difflab train`; or a rank other than 0 (rank 0 alone scores and reports)
            logger.close()
            return trained_only(run, "autoencoder", wall, echo) if train_only else run
        ev = config.evaluation
        scored = heldout.images[: ev.n_heldout] if ev.n_heldout else heldout.images
        with run.stage("evaluate"):
            quality = reconstruction_metrics(lambda x: vae.decode(vae.encode(x)), scored, ev.batch_size, device)
            stats = latent_statistics(vae, train.images[:5000].to(device))
        with run.stage("figures"):
            shown = heldout.images[: ev.figure_images].to(device)
            with torch.no_grad():
                recon = vae.decode(vae.encode(shown)).clamp(-1, 1).cpu()
                latent = vae.latent_shape(shape)
                prior = vae.decode(
                    torch.randn((ev.figure_images, *latent), generator=torch.Generator().manual_seed(config.seed)).to(
                        device
                    )
                )
            rows = [
                ("held-out", shown.cpu()),
                ("reconstruction", recon),
                ("|difference|", (recon - shown.cpu()).abs() * 2 - 1),
                ("decoded N(0, I)", prior.clamp(-1, 1).cpu()),
            ]
            image_rows_figure(
                rows,
                run.sub("figures", "reconstructions.png"),
                "Held-out images, their reconstructions, and decoded random latents",
            )
            series = {
                "train loss": read_series(logger.path, "autoencoder/train_loss"),
                "held-out L1": read_series(logger.path, "autoencoder/val_l1"),
            }
            plots2d.curves(series, run.sub("figures", "loss.png"), "autoencoder loss")
        logger.close()
        metrics: dict[str, Any] = {
            "reconstruction": quality,
            "compression": compression(vae, shape),
            "scaling_factor": vae.scaling_factor,
            "latents": stats,
            "model": {"parameters": count_parameters(vae), "description": vae.description},
            "training": {
                "step": result.step,
                "seconds": round(result.seconds, 1),
                "final_train_loss": result.final_train_loss,
                "validation": result.final_validation,
            },
            "timings_seconds": {k: round(v, 1) for k, v in run.timings.items()},
        }
        metrics["timings_seconds"]["total"] = round(time.perf_counter() - wall, 1)
        metrics["targets"] = autoencoder_targets(metrics) if config.data.source == "mnist" else []
        run.write_metrics(metrics)
        run.write_report(build_report)
        run.complete()
    echo(
        f"[autoencoder] done in {metrics['timings_seconds']['total']:.0f} s: held-out PSNR {quality['psnr']:.2f} dB, "
        f"SSIM {quality['ssim']:.4f}, latent {metrics['compression']['latent_shape']} | report {run.sub('report.md')}"
    )
    return run


def train_autoencoder_recipe(
    config: AutoencoderRecipeConfig, fresh: bool = False, echo: Callable[[str], object] = print
) -> RunFolder:
    """``difflab train autoencoder``: the VAE's training and its exported weights alone."""
    return run_autoencoder(config, fresh, echo, train_only=True)


def autoencoder_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    quality = metrics["reconstruction"]
    return [
        {
            "target": f"held-out PSNR >= {PSNR_TARGET:g} dB",
            "value": quality["psnr"],
            "met": quality["psnr"] >= PSNR_TARGET,
        },
        {
            "target": f"held-out SSIM >= {SSIM_TARGET:g}",
            "value": quality["ssim"],
            "met": quality["ssim"] >= SSIM_TARGET,
        },
    ]


def build_report(contents: RunContents) -> Report:
    """The ``autoencoder`` run's report, from its folder alone (``difflab report RUN`` rebuilds it)."""
    config = contents.typed_config(AutoencoderRecipeConfig())
    metrics, folder = contents.metrics, contents.path
    ae, quality, comp = config.autoencoder, metrics["reconstruction"], metrics["compression"]
    lines = [
        "# Autoencoder for latent diffusion (KL-regularised VAE)",
        "",
        f"{metrics['model']['description']}; {metrics['model']['parameters']:,} parameters. Loss: "
        f"{ae.reconstruction.upper()} reconstruction per pixel + {ae.kl_weight:g} x KL(q(z|x) || N(0, I)) per pixel; "
        "no perceptual term (LPIPS needs pretrained VGG/AlexNet weights, which cannot be fetched offline). "
        f"Trained {metrics['training']['step']:,} steps of batch {ae.train.batch_size} in "
        f"{metrics['training']['seconds']:.0f} s.",
        "",
        f"Images {tuple(comp['image_shape'])} -> latents {tuple(comp['latent_shape'])}: "
        f"{comp['values_factor']:g}x fewer values, {comp['spatial_factor']:g}x smaller per side. Scaling factor "
        f"1 / std(latents) = {metrics['scaling_factor']:.4f} (from {ae.scaling_images or 'all'} training images, "
        f"stored with the weights); the scaled latents have mean {metrics['latents']['mean']:.3f} and std "
        f"{metrics['latents']['std']:.3f} (per channel {metrics['latents']['channel_std']}).",
        "",
        f"## Reconstruction of {quality['n']:,} held-out images",
        "",
        table(
            ["PSNR (dB)", "SSIM", "MSE", "L1"],
            [[quality["psnr"], quality["ssim"], quality["mse"], quality["l1"]]],
            digits=4,
        ),
        "",
        "PSNR: mean over images of 10 log10(1 / MSE) on [0, 1] pixels; SSIM: torchmetrics' (11 x 11 Gaussian window, "
        "sigma 1.5), reconstructions clipped to [0, 1].",
        "",
    ]
    recon_figure = contents.figure_file("reconstructions.png")
    if recon_figure:
        lines += [
            figure(recon_figure, folder, "Held-out digits, reconstructions, |difference|, decoded N(0, I) latents"),
            "",
        ]
    if metrics["targets"]:
        lines += [
            "## Targets",
            "",
            table(["target", "measured", "met"], [[t["target"], t["value"], t["met"]] for t in metrics["targets"]]),
            "",
        ]
    loss_figure = contents.figure_file("loss.png")
    if loss_figure:
        lines += ["## Training", "", figure(loss_figure, folder, "Training loss and held-out L1"), ""]
    return sections.markdown_report(contents, "\n".join(lines))
