"""The ``rgb2ir`` recipe: RGB to infrared translation in a VAE's latent space, on aligned image pairs.

The reference pipeline, and what this recipe adds to it:

1. data: a folder pair (``data.input`` RGB, ``data.target`` grayscale IR; RoadScene by default), matched by file
   name, centre-cropped and resized to ``data.size``, split into train / test by a seeded hash of each name
   (:mod:`difflab.data.paired`);
2. the autoencoder (``vae.kind``): ``train`` trains difflab's KL-VAE on both modalities of the training split (the
   IR image repeated to 3 channels, so one VAE serves both sides; trained on random ``vae.training.crop`` crops, it
   is fully convolutional), ``run`` takes a finished ``autoencoder`` run's VAE (3 channels), ``diffusers`` a pretrained
   ``AutoencoderKL`` from a local folder (e.g. Stable Diffusion's; nothing is downloaded). A decoded IR image is
   the mean of the decoder's 3 channels;
3. latents: both sides encoded and diffused to ``latents.t_start`` with SD v1's scaled-linear schedule,
   ``z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps``, with a fixed noise per image drawn from a seed
   derived from its file name (``latents.noise=shared``: the same eps for the RGB and the IR latent of a pair,
   ``independent``: one each). Training pairs are doubled by horizontal flips (``latents.hflip``). The latent
   pairs are cached as safetensors shards under ``latents/pairs-<key>/``, the key a hash of the autoencoder's
   weights, the images and every setting that changes a latent; a cache of another key is stale and removed,
   a damaged one rebuilt;
4. two latent U-Net regressors trained with MSE (AdamW): ``z_IR,t`` from ``z_RGB,t`` at ``t_start`` (the
   reference's), and ``z_IR,0`` from ``z_RGB,0`` (plain latent regression). With ``regressor.residual`` each
   predicts the difference to its input (the same function class; the shared noise passes through exactly);
5. three scorings on the test split, decoded and compared with the true IR image by PSNR and SSIM (mean and per
   image): ``t_start`` (the noisy prediction decoded as it is, the reference's), ``denoised`` (the noisy
   prediction mapped back to t = 0 by the known forward relation ``z_0 = (z_t - sqrt(1 - alpha_bar) eps) /
   sqrt(alpha_bar)``, exact because the noise of every image is the fixed seeded noise of its name, also at test
   time), and ``t0`` (the clean-latent regressor), beside baselines (the autoencoder's own reconstruction of the
   true IR, the decoded true noisy latent, the mean training IR image, the grayscale input).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from difflab.data.batches import ShuffledBatches
from difflab.data.images import ImageSet, check_intensity
from difflab.data.paired import PairedData, PairedSet, load_paired_folders, name_seed
from difflab.diffusion.schedule import NoiseSchedule, ScheduleConfig
from difflab.errors import CheckpointError, ConfigError
from difflab.experiments.autoencoder import (
    VAE_KINDS,
    AutoencoderTrainingConfig,
    check_autoencoder_input,
    given_autoencoder,
    train_autoencoder,
)
from difflab.experiments.runs import RunFolder, read_run_config, resolve_device, setup_ranks, trained_only
from difflab.metrics.image_quality import at_low_resolution, guided_filter, psnr_per_image, ssim_per_image
from difflab.models.autoencoder import AutoencoderConfig, KLAutoencoder
from difflab.models.unet import UNet, UNetConfig, count_parameters, describe
from difflab.report.document import (
    Figure,
    MetricRow,
    MetricTable,
    Paragraph,
    Report,
    Table,
    Value,
    lookup,
    metric,
    prose,
)
from difflab.report.references import reference_text, reference_value
from difflab.sampling.inversion import INVERSION_ORDERS, INVERSION_SPACINGS
from difflab.seeding import mix_seed, seed_everything
from difflab.training import checkpoint as ckpt
from difflab.training import distributed
from difflab.training.logging import RunLogger, read_series
from difflab.training.precision import to_fast_layout
from difflab.training.trainer import TrainConfig, Trainer
from difflab.viz import plots2d
from difflab.viz.images import image_rows_figure

NOISE_MODES = ("shared", "independent")
SCORINGS = ("t_start", "denoised", "t0")  # the inversion-based scoring "inversion" is added when enabled
PSNR_TARGET, SSIM_TARGET, SECONDS_TARGET = 20.0, 0.60, 1800.0
REFERENCE_LABEL = "reference RGB->IR"


@dataclass(frozen=True)
class PairedDataConfig:
    """The folder pair (relative paths are looked up from the working directory, then from the checkout and its
    parent folders), the square ``size``, the hash split, ``max_pairs`` (first pairs by name, 0 = all) and
    ``intensity`` (``full``: 16-bit targets on 0..65535; ``stretch``: 16-bit / float targets mapped from the training
    split's 0.5th..99.5th percentile to the full range, for raw thermal counts)."""

    kind: str = "paired"
    input: str = "../shared/data/RoadScene/vis"
    target: str = "../shared/data/RoadScene/ir"
    size: int = 64
    test_fraction: float = 0.2
    split_seed: int = 0
    strict: bool = False
    max_pairs: int = 0
    intensity: str = "full"

    def __post_init__(self) -> None:
        check_intensity(self.intensity, "data.intensity", ConfigError)
        if self.kind != "paired":
            raise ConfigError(f"data.kind must be 'paired' for rgb2ir, got {self.kind!r}")
        if not self.input.strip() or not self.target.strip():
            raise ConfigError("data.input and data.target must name the two image folders (RGB inputs, IR targets)")
        if self.size < 8 or self.size % 4:
            raise ConfigError(f"data.size must be a multiple of 4 and >= 8, got {self.size}")
        if not 0 < self.test_fraction < 1 or self.max_pairs < 0:
            raise ConfigError("data.test_fraction must be in (0, 1) and data.max_pairs >= 0")


def _paired_autoencoder_training() -> AutoencoderTrainingConfig:
    """The CPU-sized VAE for 64 x 64 pairs: 4 x 16 x 16 latents, trained on random 32 x 32 crops."""
    return AutoencoderTrainingConfig(
        model=AutoencoderConfig(
            in_channels=3, latent_channels=4, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=1
        ),
        train=TrainConfig(
            steps=1500,
            batch_size=32,
            lr=2e-3,
            warmup_steps=100,
            grad_clip=1.0,
            eval_every=250,
            log_every=50,
            checkpoint_every=250,
        ),
        kl_weight=1e-6,
        reconstruction="l1",
        scaling_images=0,
        crop=32,
    )


@dataclass(frozen=True)
class RGB2IRVAEConfig:
    """Where the autoencoder comes from, as in ``mnist-ldm``; ``kind=train``: its shape and training
    (``vae.training``, the ``autoencoder`` recipe's section: random ``crop`` x ``crop`` windows of the training
    images of both modalities, ``loss = rec + kl_weight * KL``); ``batch_size`` for encoding and decoding."""

    kind: str = "train"
    path: str = ""
    scaling_factor: float = 0.0
    training: AutoencoderTrainingConfig = field(default_factory=_paired_autoencoder_training)
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.kind not in VAE_KINDS:
            raise ConfigError(f"vae.kind must be one of {', '.join(VAE_KINDS)}, got {self.kind!r}")
        if self.kind != "train" and not self.path:
            raise ConfigError(f"vae.kind={self.kind} needs vae.path=DIR")
        if self.training.model.in_channels != 3:
            raise ConfigError("vae.training.model.in_channels must be 3 (RGB, and IR repeated to 3 channels)")
        if self.scaling_factor < 0 or self.batch_size < 1:
            raise ConfigError("vae.scaling_factor must be >= 0 and vae.batch_size >= 1")


@dataclass(frozen=True)
class LatentConfig:
    """The forward diffusion of the latents: ``t_start`` (index into the schedule), the fixed noise per image
    (``noise``: ``shared`` or ``independent`` between the two sides; ``noise_seed`` mixed with each name),
    horizontal-flip augmentation of the training pairs, and the cache folder (empty: ``RUN/latents``)."""

    t_start: int = 400
    noise: str = "shared"
    noise_seed: int = 0
    hflip: bool = True
    cache_dir: str = ""
    shard_rows: int = 256

    def __post_init__(self) -> None:
        if self.noise not in NOISE_MODES:
            raise ConfigError(f"latents.noise must be one of {', '.join(NOISE_MODES)}, got {self.noise!r}")
        if self.t_start < 0 or self.shard_rows < 1:
            raise ConfigError("latents.t_start must be >= 0 and latents.shard_rows >= 1")


@dataclass(frozen=True)
class RegressorConfig:
    """The latent U-Net regressor (no time input: one network per noise level), trained with MSE and AdamW;
    ``residual``: the network predicts ``z_IR - z_RGB``."""

    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            in_channels=4,
            out_channels=4,
            base_channels=32,
            channel_mults=(1, 2),
            num_res_blocks=1,
            mid_attention=True,
            time_conditioning="none",
            dropout=0.1,
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=500,
            batch_size=32,
            lr=1e-3,
            weight_decay=1e-4,
            warmup_steps=50,
            grad_clip=1.0,
            eval_every=100,
            log_every=50,
            checkpoint_every=250,
        )
    )
    residual: bool = True


@dataclass(frozen=True)
class InversionConfig:
    """Inversion-based translation (``enabled``): an eps U-Net on the RGB latents and one on the IR latents
    (``schedule``, all timesteps), DDIM inversion of both sides to ``t_start`` in ``steps`` steps, a regressor (the
    ``regressor`` settings) from the inverted RGB latent to the inverted IR latent, then DDIM sampling with the IR
    model from the regressed latent back to t = 0. ``spacing``: the inversion's timesteps, ``uniform`` in t or
    ``logsnr`` (:func:`~difflab.sampling.inversion.round_trip_timesteps`). ``order``: 1 for DDIM both ways, 2 for
    the second-order Adams-Bashforth flow on the same timesteps
    (:func:`~difflab.sampling.inversion.adams_bashforth_flow`, same NFE)."""

    enabled: bool = False
    steps: int = 20
    spacing: str = "uniform"
    order: int = 1
    unet: UNetConfig = field(
        default_factory=lambda: UNetConfig(
            in_channels=4,
            out_channels=4,
            base_channels=32,
            channel_mults=(1, 2),
            num_res_blocks=1,
            mid_attention=True,
            time_conditioning="film",
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=1000,
            batch_size=64,
            lr=1e-3,
            warmup_steps=100,
            ema_decay=0.999,
            eval_every=250,
            log_every=50,
            checkpoint_every=500,
        )
    )

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"inversion.steps must be >= 1, got {self.steps}")
        if self.spacing not in INVERSION_SPACINGS:
            allowed = " or ".join(INVERSION_SPACINGS)
            raise ConfigError(f"inversion.spacing must be {allowed}, got {self.spacing!r}")
        if self.order not in INVERSION_ORDERS:
            allowed = " or ".join(map(str, INVERSION_ORDERS))
            raise ConfigError(f"inversion.order must be {allowed}, got {self.order!r}")


@dataclass(frozen=True)
class RGB2IREvaluationConfig:
    """``headline``: the scoring the targets and the summary use; ``figure_images`` test pairs in the figure."""

    headline: str = "t0"
    figure_images: int = 8
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.headline not in (*SCORINGS, "inversion"):
            raise ConfigError(
                f"evaluation.headline must be one of {', '.join(SCORINGS)}, inversion; got {self.headline!r}"
            )
        if self.figure_images < 1 or self.batch_size < 1:
            raise ConfigError("evaluation.figure_images and evaluation.batch_size must be >= 1")


@dataclass(frozen=True)
class RGB2IRConfig:
    """``rgb2ir``: the CPU-sized defaults (64 x 64 images, 16 x 16 x 4 latents)."""

    recipe: str = "rgb2ir"
    seed: int = 0
    device: str = "auto"
    run_dir: str = "runs/rgb2ir"
    progress: bool = True
    data: PairedDataConfig = field(default_factory=PairedDataConfig)
    vae: RGB2IRVAEConfig = field(default_factory=RGB2IRVAEConfig)
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    )
    latents: LatentConfig = field(default_factory=LatentConfig)
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    inversion: InversionConfig = field(default_factory=InversionConfig)
    evaluation: RGB2IREvaluationConfig = field(default_factory=RGB2IREvaluationConfig)

    def __post_init__(self) -> None:
        if self.recipe != "rgb2ir":
            raise ConfigError(f"this config is for the 'rgb2ir' recipe, got recipe={self.recipe!r}")
        if self.evaluation.headline == "inversion" and not self.inversion.enabled:
            raise ConfigError("evaluation.headline=inversion needs inversion.enabled=true")
        if self.latents.t_start >= self.schedule.num_timesteps:
            raise ConfigError(
                f"latents.t_start={self.latents.t_start} must be below schedule.num_timesteps="
                f"{self.schedule.num_timesteps}"
            )
        if self.inversion.enabled and self.inversion.steps > self.latents.t_start:
            raise ConfigError(
                f"inversion.steps={self.inversion.steps} do not fit between t = 0 and latents.t_start="
                f"{self.latents.t_start}: use at most {self.latents.t_start} steps"
            )


# -------------------------------------------------------------------------------------------------------- data
def resolve_data_path(path: str) -> Path:
    """``path`` as given when absolute or found from the working directory; else looked up from the checkout
    (``shared/data/...`` beside it or in one of its parent folders). Missing: the path as given (the loader then
    names it in its error)."""
    given = Path(path).expanduser()
    if given.is_absolute() or given.exists():
        return given
    checkout = Path(__file__).resolve().parents[3]
    candidates = [checkout / given]
    parts = given.parts
    if "shared" in parts:  # ../shared/data/X: look for shared/data/X in the checkout's parent folders
        tail = Path(*parts[parts.index("shared") :])
        candidates += [folder / tail for folder in [Path.cwd(), *Path.cwd().parents, checkout, *checkout.parents]]
    return next((c for c in candidates if c.exists()), given)


def load_data(config: PairedDataConfig, echo: Any = print) -> PairedData:
    return load_paired_folders(
        resolve_data_path(config.input),
        resolve_data_path(config.target),
        config.size,
        config.test_fraction,
        config.split_seed,
        config.strict,
        config.max_pairs,
        echo,
        config.intensity,
    )


def as_three_channels(targets: torch.Tensor) -> torch.Tensor:
    """IR images (N, 1, H, W) -> (N, 3, H, W) by repeating the channel (the VAE's input)."""
    return targets.expand(-1, 3, -1, -1).contiguous()


# -------------------------------------------------------------------------------------------------- autoencoder
def train_paired_autoencoder(
    run: RunFolder,
    logger: RunLogger,
    data: PairedData,
    config: RGB2IRVAEConfig,
    seed: int,
    device: torch.device,
    show_progress: bool,
    echo: Any = print,
) -> tuple[Any, Any]:
    """Train (or resume) the KL-VAE on the training split's RGB and 3-channel IR images (random crops), set its
    scaling factor from the whole training images and export ``checkpoints/autoencoder.safetensors``."""
    images = torch.cat([data.train.inputs, as_three_channels(data.train.targets)])
    run.discard_if_inputs_changed("autoencoder", images, echo=echo)
    check = torch.cat([data.test.inputs, as_three_channels(data.test.targets)])
    return train_autoencoder(
        run, logger, images, check, config.training, seed, device, show_progress, echo, key="vae.training.model"
    )


def given_vae(config: RGB2IRConfig, device: torch.device) -> Any:
    """The autoencoder of ``vae.kind=run|diffusers`` for the 3-channel images both sides are encoded as
    (:func:`~difflab.experiments.autoencoder.given_autoencoder`), on ``device``; None for ``vae.kind=train``."""
    vae = given_autoencoder(config.vae, (3, config.data.size, config.data.size), device)
    return None if vae is None else vae.to(device)


def prepare_autoencoder(
    config: RGB2IRConfig,
    run: RunFolder,
    logger: RunLogger,
    data: PairedData,
    device: torch.device,
    echo: Any,
    given: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """The autoencoder of ``config.vae`` in eval mode, and what the report says about it. ``given``: the
    autoencoder of ``vae.kind=run|diffusers`` when the caller has loaded it (:func:`given_vae`)."""
    vae_config = config.vae
    info: dict[str, Any] = {"kind": vae_config.kind, "path": vae_config.path}
    shape = (3, config.data.size, config.data.size)
    if vae_config.kind == "train":
        vae, result = train_paired_autoencoder(
            run, logger, data, vae_config, config.seed, device, config.progress, echo
        )
        info.update(steps=result.step, train_seconds=round(result.seconds, 1), crop=vae_config.training.crop)
    else:
        vae = given if given is not None else given_vae(config, device)
    if vae_config.scaling_factor > 0:
        vae.scaling_factor = vae_config.scaling_factor
    vae.eval().requires_grad_(False)
    latent = vae.latent_shape(shape)
    info.update(
        description=vae.description,
        scaling_factor=vae.scaling_factor,
        latent_shape=list(latent),
        image_shape=list(shape),
    )
    return vae, info


@torch.inference_mode()
def encode_images(vae: Any, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Scaled latents (N, c, h, w) float32 on the CPU of images (N, 3, H, W)."""
    return torch.cat(
        [vae.encode(images[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(images), batch_size)]
    )


@torch.inference_mode()
def decode_ir(vae: Any, latents: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Scaled latents (N, c, h, w) -> IR images (N, 1, H, W) in [-1, 1] on the CPU: the decoder's 3 channels
    averaged, clipped."""
    return torch.cat(
        [
            vae.decode(latents[s : s + batch_size].to(device)).float().mean(1, keepdim=True).clamp(-1, 1).cpu()
            for s in range(0, len(latents), batch_size)
        ]
    )


# ------------------------------------------------------------------------------------------------------ latents
def fixed_noise(names: tuple[str, ...], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One standard normal tensor of ``shape`` per name, drawn from a seed derived from the name: (N, *shape)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(name_seed(n, seed))) for n in names])


def _split_tensors(
    vae: Any,
    pairs: PairedSet,
    schedule: NoiseSchedule,
    config: LatentConfig,
    batch_size: int,
    device: torch.device,
    flip: bool,
) -> dict[str, torch.Tensor]:
    """The :class:`LatentPairs` tensors of ``pairs`` (RGB (N, 3, H, W), IR (N, 1, H, W); with ``flip`` their mirror
    images added, 2N rows): ``rgb0``, ``ir0``, ``rgb_t``, ``ir_t`` (noised to ``t_start``), ``noise_ir``,
    ``noise_rgb``, each (N or 2N, c, h, w) float32 on the CPU."""
    names, inputs, targets = pairs.names, pairs.inputs, pairs.targets
    if flip:  # the mirrored pairs are extra training pairs with their own noise
        names = names + tuple(f"{n}|hflip" for n in names)
        inputs = torch.cat([inputs, inputs.flip(-1)])
        targets = torch.cat([targets, targets.flip(-1)])
    rgb0 = encode_images(vae, inputs, batch_size, device)
    ir0 = encode_images(vae, as_three_channels(targets), batch_size, device)
    latent_shape = tuple(rgb0.shape[1:])
    noise_ir = fixed_noise(names, latent_shape, config.noise_seed)
    noise_rgb = (
        noise_ir
        if config.noise == "shared"
        else fixed_noise(tuple(f"{n}|rgb" for n in names), latent_shape, config.noise_seed)
    )
    t = torch.full((len(names),), config.t_start, dtype=torch.long)
    return {
        "rgb0": rgb0,
        "ir0": ir0,
        "rgb_t": schedule.q_sample(rgb0, t, noise_rgb),
        "ir_t": schedule.q_sample(ir0, t, noise_ir),
        "noise_ir": noise_ir.contiguous(),
        "noise_rgb": noise_rgb.clone(),
    }


@dataclass
class LatentPairs:
    """The cached latents of one split: ``rgb0``, ``ir0``, ``rgb_t``, ``ir_t``, ``noise_ir``, ``noise_rgb``, each
    (N, c, h, w), and the ``names`` of the rows (``NAME|hflip`` for mirrored training pairs)."""

    names: tuple[str, ...]
    tensors: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        """The latents ``key`` of every row: (N, c, h, w)."""
        return self.tensors[key]


def cache_key(vae: Any, data: PairedData, config: RGB2IRConfig) -> str:
    """sha256 (16 hex digits) of the autoencoder's weights and scaling factor, the images and names of both splits
    and every setting that changes a latent (schedule, t_start, noise mode and seed, flips)."""
    weights = ckpt.tensor_digest(dict(vae.state_dict()))
    images = ckpt.tensor_digest(
        {
            "train_in": data.train.inputs,
            "train_out": data.train.targets,
            "test_in": data.test.inputs,
            "test_out": data.test.targets,
        }
    )
    settings = {
        "schedule": repr(config.schedule),
        "t_start": config.latents.t_start,
        "noise": config.latents.noise,
        "noise_seed": config.latents.noise_seed,
        "hflip": config.latents.hflip,
        "train": list(data.train.names),
        "test": list(data.test.names),
        "scaling_factor": repr(float(vae.scaling_factor)),
        "vae": vae.description,
    }
    text = f"{weights}|{images}|{json.dumps(settings, sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_cache(folder: Path, key: str) -> dict[str, LatentPairs] | None:
    """The splits of a cache folder, or None when its manifest, key or any shard's checksum does not match."""
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != key:
            return None
        splits = {}
        for split, entry in manifest["splits"].items():
            parts: dict[str, list[torch.Tensor]] = {}
            for shard in entry["shards"]:
                tensors, _ = ckpt.verified_tensors(folder / shard)
                for name, tensor in tensors.items():
                    parts.setdefault(name, []).append(tensor)
            tensors = {name: torch.cat(chunks) for name, chunks in parts.items()}
            if len(entry["names"]) != len(tensors["rgb0"]):
                return None
            splits[split] = LatentPairs(tuple(entry["names"]), tensors)
        return splits
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError, CheckpointError):
        return None


def cached_latent_pairs(
    vae: Any,
    data: PairedData,
    schedule: NoiseSchedule,
    config: RGB2IRConfig,
    root: Path,
    device: torch.device,
    echo: Any = print,
    read_only: bool = False,
) -> tuple[dict[str, LatentPairs], dict[str, Any]]:
    """``({"train": ..., "test": ...}, info)``: read from ``root/pairs-<key>/`` when the key matches and every
    shard's checksum is right, else encoded, diffused and written as shards of ``latents.shard_rows`` rows.
    Cache folders of other keys (other data, weights or settings) are stale: they are removed and reported.
    ``read_only``: the cache rank 0 has just written is read, never removed or written (the other ranks of a
    torchrun job)."""
    key = cache_key(vae, data, config)
    folder = root / f"pairs-{key}"
    info: dict[str, Any] = {"key": key, "path": str(folder), "stale_removed": []}
    if read_only:
        splits = _read_cache(folder, key) if folder.is_dir() else None
        if splits is None:
            raise CheckpointError(
                f"cannot read the latent cache {folder} that rank 0 wrote: the run folder (and latents.cache_dir) "
                "must be on a file system every rank sees"
            )
        info.update(cached=True, rows={k: len(v.names) for k, v in splits.items()})
        return splits, info
    for other in sorted(root.glob("pairs-*")) if root.is_dir() else []:
        if other.is_dir() and other.name != folder.name:
            echo(f"[rgb2ir] latent cache {other.name} is stale (other data, autoencoder or settings): removed")
            shutil.rmtree(other)
            info["stale_removed"].append(other.name)
    if folder.is_dir():
        splits = _read_cache(folder, key)
        if splits is not None:
            info.update(cached=True, rows={k: len(v.names) for k, v in splits.items()})
            return splits, info
        echo(f"[rgb2ir] latent cache {folder.name} is incomplete or damaged: rebuilt")
        info["rebuilt_damaged"] = True
        shutil.rmtree(folder)
    start = time.perf_counter()
    splits, manifest = {}, {"key": key, "splits": {}}
    folder.mkdir(parents=True, exist_ok=True)
    for split, pairs in (("train", data.train), ("test", data.test)):
        flip = config.latents.hflip and split == "train"
        tensors = _split_tensors(vae, pairs, schedule, config.latents, config.vae.batch_size, device, flip)
        names = pairs.names + (tuple(f"{n}|hflip" for n in pairs.names) if flip else ())
        shards = []
        rows = config.latents.shard_rows
        for index, begin in enumerate(range(0, len(names), rows)):
            shard = {k: v[begin : begin + rows].contiguous() for k, v in tensors.items()}
            name = f"{split}-{index:03d}.safetensors"
            ckpt.atomic_save_tensors(shard, folder / name, {"sha256": ckpt.tensor_digest(shard), "key": key})
            shards.append(name)
        manifest["splits"][split] = {"names": list(names), "shards": shards}
        splits[split] = LatentPairs(names, tensors)
    ckpt.atomic_write_bytes(folder / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    info.update(
        cached=False,
        encode_seconds=round(time.perf_counter() - start, 1),
        rows={k: len(v.names) for k, v in splits.items()},
    )
    echo(f"[rgb2ir] encoded {sum(info['rows'].values())} latent pairs -> {folder}")
    return splits, info


# ---------------------------------------------------------------------------------------------------- regressors
class LatentRegressor(torch.nn.Module):
    """``z_IR = f(z_RGB)`` by a U-Net without time input; ``residual``: ``f(z) = z + unet(z)``. z: (B, c, h, w)."""

    def __init__(self, config: UNetConfig, residual: bool) -> None:
        super().__init__()
        self.unet = UNet(config)
        self.residual = residual

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, c, h, w) -> (B, out_channels, h, w), the U-Net at t = 0 (plus z when ``residual``)."""
        out = self.unet(z, torch.zeros(z.shape[0], device=z.device))
        return z + out if self.residual else out


def train_regressor(
    run: RunFolder,
    logger: RunLogger,
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    config: RegressorConfig,
    seed: int,
    device: torch.device,
    show_progress: bool,
    echo: Any = print,
) -> tuple[LatentRegressor, Any]:
    """Train (or resume) ``name``: MSE between ``f(x)`` and ``y`` (latents (N, c, h, w)); the test MSE is logged
    as ``<name>/val_mse`` (it selects nothing)."""
    unet = replace(config.unet, in_channels=x.shape[1], out_channels=y.shape[1])
    run.discard_if_inputs_changed(name, x, y, echo=echo)
    torch.manual_seed(mix_seed(seed, 1, 81))
    model = to_fast_layout(LatentRegressor(unet, config.residual).to(device), device, config.train.precision)
    batches = ShuffledBatches((x.to(device), y.to(device)), config.train.batch_size, seed=mix_seed(seed, 1, 82))
    x_check, y_check = x_test.to(device), y_test.to(device)

    def loss_fn(net: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """batch: (x (B, c, h, w), y (B, c', h, w)) -> MSE of ``f(x)`` against y, a scalar."""
        return torch.nn.functional.mse_loss(net(batch[0]), batch[1])

    def validate(net: torch.nn.Module) -> dict[str, float]:
        return {"mse": float(torch.nn.functional.mse_loss(net(x_check), y_check))}

    signature = {"model": "LatentRegressor", "config": repr(unet), "residual": config.residual}
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
        seed=mix_seed(seed, 1, 83),
        device=device,
        show_progress=show_progress,
        echo=echo,
    )
    result = trainer.fit()
    return trainer.eval_model.eval(), result


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """``model`` applied to x (N, ...) in batches of ``batch_size`` on ``device``: (N, ...) float32 on the CPU."""
    return torch.cat([model(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)])


@torch.inference_mode()
def _batched(fn: Any, x: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """``fn`` applied to x (N, ...) in batches of ``batch_size`` on ``device``: (N, ...) float32 on the CPU."""
    return torch.cat([fn(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x), batch_size)])


def inversion_translation(
    run: RunFolder,
    logger: RunLogger,
    config: RGB2IRConfig,
    train: LatentPairs,
    test: LatentPairs,
    schedule: NoiseSchedule,
    device: torch.device,
    echo: Any = print,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Inversion-based translation (see :class:`InversionConfig`): returns the translated test IR latents
    (N, c, h, w) at t = 0 and what to report (the eps models, the DDIM round trip of the test IR latents under the
    IR model, the regressor on inverted latents)."""
    from difflab.experiments.images import train_image_denoiser
    from difflab.sampling.inversion import invert, reconstruct, round_trip_timesteps

    settings, t_start = config.inversion, config.latents.t_start
    timesteps = round_trip_timesteps(schedule, settings.steps, t_start, settings.spacing)
    bs = config.evaluation.batch_size
    unet = replace(settings.unet, in_channels=train["rgb0"].shape[1], out_channels=train["rgb0"].shape[1])
    models: dict[str, Any] = {}
    info = {
        "steps": settings.steps,
        "spacing": settings.spacing,
        "order": settings.order,
        "t_end": timesteps[-1],
        "models": {},
    }
    for side in ("rgb", "ir"):
        name = f"eps_{side}"
        no_labels = torch.zeros(len(train.names), dtype=torch.long)
        latents = ImageSet(train[f"{side}0"], no_labels, ("all",))
        held = ImageSet(test[f"{side}0"], torch.zeros(len(test.names), dtype=torch.long), ("all",))
        echo(f"[rgb2ir] training {name} (eps-prediction on the {side.upper()} latents): {describe(unet, latents.size)}")
        run.discard_if_inputs_changed(name, latents.images, echo=echo)
        with run.stage(f"train {name}"):
            trainer, result = train_image_denoiser(
                run,
                logger,
                latents,
                held,
                schedule,
                unet,
                settings.train,
                config.seed,
                device,
                config.progress,
                name=name,
                decoder="gaussian",
            )
        models[side] = trainer.eval_model.eval()
        # The trainer's validation (timesteps, noise) of eps = sqrt(1 - alpha_bar_t) x_t, the exact eps of N(0, I)
        # data: what knowing only that the latents are scaled to unit variance scores.
        with torch.inference_mode():
            agnostic = trainer.validate(
                lambda x_t, t: (1 - schedule.gather(schedule.alpha_bar, t, x_t.ndim)).sqrt() * x_t
            )
        info["models"][name] = {
            "steps": result.step,
            "train_seconds": round(result.seconds, 1),
            "final_validation": result.final_validation,
            "agnostic_validation": agnostic,
            "description": describe(unet, held.size),
        }
    with run.stage("inversion"):

        def inverted_latents(side: str, z: torch.Tensor) -> torch.Tensor:
            """Latents z (N, c, h, w) inverted under ``side``'s model to ``timesteps[-1]``: (N, c, h, w) on the CPU."""
            return _batched(lambda x: invert(models[side], schedule, x, timesteps, settings.order), z, bs, device)

        def generate(z: torch.Tensor) -> torch.Tensor:
            """Latents z (N, c, h, w) at ``timesteps[-1]`` taken to t = 0 by the IR model: (N, c, h, w) on the CPU."""
            return _batched(lambda x: reconstruct(models["ir"], schedule, x, timesteps, settings.order), z, bs, device)

        inverted = {
            ("rgb", "train"): inverted_latents("rgb", train["rgb0"]),
            ("ir", "train"): inverted_latents("ir", train["ir0"]),
            ("rgb", "test"): inverted_latents("rgb", test["rgb0"]),
            ("ir", "test"): inverted_latents("ir", test["ir0"]),
        }
        round_trip = generate(inverted[("ir", "test")])
        info["round_trip_latent_mse"] = float(((round_trip - test["ir0"]) ** 2).mean())
        info["round_trip_latents"] = round_trip
    echo("[rgb2ir] training regressor_inverted: inverted RGB latent -> inverted IR latent")
    with run.stage("train regressor_inverted"):
        model, result = train_regressor(
            run,
            logger,
            "regressor_inverted",
            inverted[("rgb", "train")],
            inverted[("ir", "train")],
            inverted[("rgb", "test")],
            inverted[("ir", "test")],
            config.regressor,
            config.seed,
            device,
            config.progress,
            echo,
        )
    with run.stage("inversion"):
        predicted = predict(model, inverted[("rgb", "test")], bs, device)
        translated = generate(predicted)
    target, source = inverted[("ir", "test")], inverted[("rgb", "test")]
    info["regressor"] = {
        "input": "inverted rgb0",
        "target": "inverted ir0",
        "steps": result.step,
        "train_seconds": round(result.seconds, 1),
        "parameters": count_parameters(model),
        "description": describe(config.regressor.unet, source.shape[-1]),
        "final_train_loss": result.final_train_loss,
        "test_mse": float(((predicted - target) ** 2).mean()),
        "identity_mse": float(((source - target) ** 2).mean()),
        "mean_mse": float(((inverted[("ir", "train")].mean(0, keepdim=True) - target) ** 2).mean()),
    }
    return translated, info


# ------------------------------------------------------------------------------------------------------ scoring
def score_images(
    prediction: torch.Tensor, target: torch.Tensor, names: tuple[str, ...], per_image: bool = True
) -> dict[str, Any]:
    """PSNR (dB) and SSIM of each predicted image (N, 1, H, W) against its target, both in [-1, 1] (scored on [0, 1]
    pixels); the means are over images."""
    psnrs, ssims = psnr_per_image(prediction, target).tolist(), ssim_per_image(prediction, target).tolist()
    rows = [{"name": n, "psnr": p, "ssim": s} for n, p, s in zip(names, psnrs, ssims, strict=True)]
    scores: dict[str, Any] = {
        "n": len(rows),
        "psnr": sum(r["psnr"] for r in rows) / len(rows),
        "ssim": sum(r["ssim"] for r in rows) / len(rows),
        "mse": float(((prediction - target) ** 2).mean()),
    }
    if per_image:
        scores["per_image"] = rows
    return scores


# ------------------------------------------------------------------------------------------------------ the run
def run_rgb2ir(
    config: RGB2IRConfig, fresh: bool = False, echo: Callable[[str], object] = print, train_only: bool = False
) -> RunFolder:
    """Translate RGB to IR in latent space into ``config.run_dir`` (see the module docstring); ``train_only``:
    ``difflab train``, the autoencoder, the latent cache and every network (with the inversion they need) alone."""
    wall = time.perf_counter()
    device, echo = setup_ranks(config, echo)
    # The data and a given autoencoder are read before the run folder exists: a bad path leaves no folder behind.
    started = time.perf_counter()
    data = load_data(config.data, echo)
    data_seconds = time.perf_counter() - started
    given = given_vae(config, device)
    if given is None:  # an autoencoder to train must take the images: checked before the folder exists too
        size = config.data.size
        check_autoencoder_input(config.vae.training.model, (3, size, size), "vae.training.model")
    # Enabling the inversion or changing what is scored reuses the folder: the autoencoder, the latent cache and the
    # regressors are resumed as they are (their checkpoints check their own settings).
    run = RunFolder.open(
        config.run_dir, "rgb2ir", config, fresh=fresh, ignore_keys=("run_dir", "inversion", "evaluation")
    )
    run.timings["data"] = data_seconds
    with run.guard():
        seed_everything(config.seed)
        logger = RunLogger(run.path)
        echo(
            f"[rgb2ir] run folder {run.path} | {len(data.train)} training and {len(data.test)} test pairs at "
            f"{config.data.size} x {config.data.size} | device {device}"
        )
        with run.stage("autoencoder"):
            vae, vae_info = prepare_autoencoder(config, run, logger, data, device, echo, given)
        schedule = NoiseSchedule.from_config(config.schedule)
        t_start = config.latents.t_start
        alpha_bar = float(schedule.alpha_bar[t_start])
        with run.stage("latents"):
            root = Path(config.latents.cache_dir) if config.latents.cache_dir else run.sub("latents")
            # Rank 0 builds (or checks) the cache while the others wait, then they read what it wrote.
            built = distributed.on_main(lambda: cached_latent_pairs(vae, data, schedule, config, root, device, echo))
            splits, cache_info = built or cached_latent_pairs(
                vae, data, schedule, config, root, device, echo, read_only=True
            )
        train, test = splits["train"], splits["test"]
        bs = config.evaluation.batch_size
        regressors: dict[str, Any] = {}
        predictions: dict[str, torch.Tensor] = {}
        for key, source, target in ((f"t{t_start}", "rgb_t", "ir_t"), ("t0", "rgb0", "ir0")):
            name = f"regressor_{key}"
            echo(
                f"[rgb2ir] training {name}: {source} -> {target}, "
                f"{describe(config.regressor.unet, train[source].shape[-1])}"
            )
            with run.stage(f"train {name}"):
                model, result = train_regressor(
                    run,
                    logger,
                    name,
                    train[source],
                    train[target],
                    test[source],
                    test[target],
                    config.regressor,
                    config.seed,
                    device,
                    config.progress,
                    echo,
                )
            with run.stage("evaluate"):
                predictions[key] = predict(model, test[source], bs, device)
            mean_latent = train[target].mean(0, keepdim=True)
            regressors[name] = {
                "input": source,
                "target": target,
                "steps": result.step,
                "train_seconds": round(result.seconds, 1),
                "parameters": count_parameters(model),
                "description": describe(config.regressor.unet, train[source].shape[-1]),
                "final_train_loss": result.final_train_loss,
                "test_mse": float(((predictions[key] - test[target]) ** 2).mean()),
                "identity_mse": float(((test[source] - test[target]) ** 2).mean()),
                "mean_mse": float(((mean_latent - test[target]) ** 2).mean()),
            }
        with run.stage("evaluate"):
            truth = data.test.targets
            names = data.test.names
            t_vec = torch.full((len(names),), t_start, dtype=torch.long)
            noisy = predictions[f"t{t_start}"]
            latents = {
                "t_start": noisy,
                "denoised": schedule.predict_x0(noisy, t_vec, test["noise_ir"]),
                "t0": predictions["t0"],
            }
        inversion: dict[str, Any] = {}
        if config.inversion.enabled:
            latents["inversion"], inversion = inversion_translation(
                run, logger, config, train, test, schedule, device, echo
            )
            regressors["regressor_inverted"] = inversion.pop("regressor")
        if train_only or not run.main:  # `difflab train`; or a rank other than 0 (rank 0 alone scores and reports)
            logger.close()
            return trained_only(run, "rgb2ir", wall, echo) if train_only else run
        scorings = tuple(latents)
        with run.stage("evaluate"):
            decoded = {k: decode_ir(vae, z, bs, device) for k, z in latents.items()}
            scores = {k: score_images(decoded[k], truth, names) for k in scorings}
            if config.inversion.enabled:
                reconstructed = decode_ir(vae, inversion.pop("round_trip_latents"), bs, device)
                inversion["round_trip_decoded"] = score_images(
                    reconstructed, decode_ir(vae, test["ir0"], bs, device), names, per_image=False
                )
            baseline_images = {
                "autoencoder": decode_ir(vae, test["ir0"], bs, device),
                "true_noisy_latent": decode_ir(vae, test["ir_t"], bs, device),
                "mean_training_image": data.train.targets.mean(0, keepdim=True).expand_as(truth),
                "grayscale_input": data.test.inputs.mean(1, keepdim=True),
                # Ceilings fitted on the answer (no model can use them): how much of the true IR the targets ask for.
                "oracle_low_resolution": at_low_resolution(truth, ORACLE_GRID),
                "oracle_local_affine": guided_filter(
                    data.test.inputs, truth, oracle_radius(config.data.size), ORACLE_EPS
                ).clamp(-1, 1),
            }
            baselines = {k: score_images(v, truth, names, per_image=False) for k, v in baseline_images.items()}
        with run.stage("figures"):
            shown = config.evaluation.figure_images
            gray = lambda x: x[:shown].expand(-1, 3, -1, -1)  # noqa: E731
            rows = [
                ("RGB input", data.test.inputs[:shown]),
                (f"predicted IR ({config.evaluation.headline})", gray(decoded[config.evaluation.headline])),
                ("true IR", gray(truth)),
            ]
            rows += [(f"predicted IR ({k})", gray(decoded[k])) for k in scorings if k != config.evaluation.headline]
            rows += [("autoencoder(true IR)", gray(baseline_images["autoencoder"]))]
            image_rows_figure(
                rows,
                run.sub("figures", "translation.png"),
                "Test pairs: RGB | predicted IR | true IR (and the other scorings)",
            )
            series = {}
            for tag, label in (
                ("autoencoder/train_loss", "autoencoder train L1"),
                ("autoencoder/val_l1", "autoencoder test L1"),
                (f"regressor_t{t_start}/train_loss", f"regressor t={t_start} train MSE"),
                (f"regressor_t{t_start}/val_mse", f"regressor t={t_start} test MSE"),
                ("regressor_t0/train_loss", "regressor t=0 train MSE"),
                ("regressor_t0/val_mse", "regressor t=0 test MSE"),
            ):
                steps, values = read_series(logger.path, tag)
                if steps:
                    series[label] = (steps, values)
            if series:
                plots2d.curves(series, run.sub("figures", "loss.png"), "training and test losses")
        logger.close()
        headline = scores[config.evaluation.headline]
        metrics: dict[str, Any] = {
            "data": {
                "input": str(resolve_data_path(config.data.input)),
                "target": str(resolve_data_path(config.data.target)),
                "size": config.data.size,
                "train_pairs": len(data.train),
                "test_pairs": len(data.test),
                "unmatched": data.unmatched,
                "unmatched_inputs": list(data.unmatched_inputs[:20]),
                "unmatched_targets": list(data.unmatched_targets[:20]),
                "test_fraction": config.data.test_fraction,
                "split_seed": config.data.split_seed,
                "intensity": config.data.intensity,
                # the band of the targets' 0..1 range that data.intensity=stretch mapped to 0..1
                "target_intensity_range": None if data.target_intensity is None else list(data.target_intensity),
            },
            "autoencoder": vae_info,
            "diffusion": {
                "t_start": t_start,
                "alpha_bar": alpha_bar,
                "signal_scale": alpha_bar**0.5,
                "noise_scale": (1 - alpha_bar) ** 0.5,
                "noise": config.latents.noise,
                "schedule": config.schedule.kind,
            },
            "latents": {**cache_info, "shape": list(train["rgb0"].shape[1:])},
            "regressors": regressors,
            "scores": scores,
            "inversion": inversion,
            "baselines": baselines,
            "headline": {"method": config.evaluation.headline, "psnr": headline["psnr"], "ssim": headline["ssim"]},
            "device": str(device),
        }
        metrics["timings_seconds"] = {k: round(v, 1) for k, v in run.timings.items()}
        metrics["timings_seconds"]["total"] = round(time.perf_counter() - wall, 1)
        metrics["targets"] = rgb2ir_targets(metrics)
        run.write_metrics(metrics)
        run.write_report(build_report)
        run.complete()
    echo(
        f"[rgb2ir] done in {metrics['timings_seconds']['total']:.0f} s: {config.evaluation.headline} PSNR "
        f"{headline['psnr']:.2f} dB, SSIM {headline['ssim']:.4f} | report {run.sub('report.md')}"
    )
    return run


def whole_run_seconds(metrics: dict[str, Any]) -> float:
    """The wall time of the whole run, when this session reused networks trained by earlier ones: this session's
    total plus the training seconds of every network (over all its sessions, from its checkpoints) beyond what this
    session's training stages took. A run made in one session is its own total."""
    timings = metrics["timings_seconds"]
    trained = [metrics.get("autoencoder", {}).get("train_seconds") or 0.0]
    trained += [model.get("train_seconds") or 0.0 for model in metrics.get("regressors", {}).values()]
    inversion = metrics.get("inversion") or {}
    trained += [model.get("train_seconds") or 0.0 for model in inversion.get("models", {}).values()]
    trained.append((inversion.get("regressor") or {}).get("train_seconds") or 0.0)
    this_session = sum(v for k, v in timings.items() if k == "autoencoder" or k.startswith("train "))
    return float(timings["total"] + max(0.0, sum(trained) - this_session))


def rgb2ir_targets(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    head = metrics["headline"]
    minutes = whole_run_seconds(metrics) / 60
    return [
        {
            "target": f"{head['method']} PSNR >= {PSNR_TARGET:g} dB",
            "value": head["psnr"],
            "met": head["psnr"] >= PSNR_TARGET,
        },
        {
            "target": f"{head['method']} SSIM >= {SSIM_TARGET:g}",
            "value": head["ssim"],
            "met": head["ssim"] >= SSIM_TARGET,
        },
        {
            "target": f"whole run under {SECONDS_TARGET / 60:g} minutes (minutes; networks trained in earlier "
            "sessions counted at their training time)",
            "value": minutes,
            "met": minutes * 60 < SECONDS_TARGET,
        },
    ]


# ------------------------------------------------------------------------------------------------------- report
SCORING_LABELS = {
    "t_start": "noisy prediction z_IR,t decoded as it is (the reference's)",
    "denoised": "noisy prediction taken back to t = 0 with the known noise",
    "t0": "clean-latent regressor (no diffusion)",
    "inversion": "DDIM-inverted RGB latent -> regressor -> DDIM sampling under the IR model",
}
BASELINE_LABELS = {
    "autoencoder": "autoencoder reconstruction of the true IR (decoding the exact IR latent)",
    "true_noisy_latent": "the true z_IR,t decoded as it is (a perfect noisy prediction)",
    "mean_training_image": "the mean training IR image, for every test pair",
    "grayscale_input": "the RGB input's gray level as the IR image",
    "oracle_low_resolution": "oracle: the true IR averaged to an 8 x 8 grid and upsampled",
    "oracle_local_affine": "oracle: the best affine map of the RGB input to the true IR in every window of about "
    "1/4 of the image (guided filter fitted on the answer)",
}
# The ceiling rows: the true IR on an ORACLE_GRID x ORACLE_GRID raster, and the guided filter of the true IR with the
# RGB input as guide in windows of 2 r + 1 pixels, r = size / ORACLE_GRID (17 x 17 at 64 x 64).
ORACLE_GRID = 8
ORACLE_EPS = 1e-3


def oracle_radius(size: int) -> int:
    """The guided-filter radius of the local-affine oracle: ``size / 8`` (at least 1)."""
    return max(1, size // ORACLE_GRID)


def build_report(contents: Any) -> Report:
    """``rgb2ir``'s report (``report.md`` / ``report.html``), from the run folder alone."""
    m = contents.metrics
    config = contents.typed_config(RGB2IRConfig())
    t_start = lookup(m, "diffusion.t_start")
    head = lookup(m, "headline.method") or config.evaluation.headline
    report = Report("RGB to infrared translation in latent space")
    report.add(
        Paragraph(
            f"Run folder `{contents.path}`. Every number below is in `metrics.json`. Test pairs are scored by PSNR "
            "(mean over images of 10 log10(1 / MSE) on [0, 1] pixels) and SSIM (torchmetrics, 11 x 11 Gaussian "
            "window), each decoded IR image against the true IR image at the run's size."
        ),
        prose(
            "Headline (",
            f"`{head}`",
            "): PSNR ",
            metric(m, "headline.psnr", 2),
            " dB, SSIM ",
            metric(m, "headline.ssim", 3),
            " on the test split; the reference reported PSNR ",
            Value(reference_value("rgb2ir", "psnr", REFERENCE_LABEL), "reference:rgb2ir.psnr", 1),
            " dB and SSIM ",
            Value(reference_value("rgb2ir", "ssim", REFERENCE_LABEL), "reference:rgb2ir.ssim", 2),
            " on M3FD at 256 x 256 (another data set and size: a yardstick, not a like-for-like comparison).",
            *(
                (
                    " The mean training IR image, the same picture for every test pair, scores PSNR ",
                    metric(m, "baselines.mean_training_image.psnr", 2),
                    " dB and SSIM ",
                    metric(m, "baselines.mean_training_image.ssim", 3),
                    ": a translation is worth only what it adds to that.",
                )
                if lookup(m, "baselines.mean_training_image.psnr") is not None
                else ()
            ),
        ),
    )
    report.section(
        "Headline against the reference",
        MetricTable(
            (
                MetricRow(
                    "PSNR (dB)",
                    metric(m, f"scores.{head}.psnr", 2),
                    metric(m, "baselines.autoencoder.psnr", 2),
                    reference_text("rgb2ir", "psnr"),
                    "higher is better",
                ),
                MetricRow(
                    "SSIM",
                    metric(m, f"scores.{head}.ssim", 3),
                    metric(m, "baselines.autoencoder.ssim", 3),
                    reference_text("rgb2ir", "ssim"),
                    "higher is better",
                ),
            ),
            value_header=f"this run ({head})",
            floor_header="autoencoder ceiling",
        ),
    )
    rows = [
        (
            f"`{k}`",
            SCORING_LABELS[k],
            metric(m, f"scores.{k}.psnr", 2),
            metric(m, f"scores.{k}.ssim", 3),
            metric(m, f"scores.{k}.mse", 4),
        )
        for k in SCORING_LABELS
        if k in m.get("scores", {})
    ]
    rows += [
        (
            f"baseline `{k}`",
            BASELINE_LABELS[k],
            metric(m, f"baselines.{k}.psnr", 2),
            metric(m, f"baselines.{k}.ssim", 3),
            metric(m, f"baselines.{k}.mse", 4),
        )
        for k in BASELINE_LABELS
        if k in m.get("baselines", {})
    ]
    scored = [k for k in SCORING_LABELS if k in m.get("scores", {})]
    count = {2: "Two", 3: "Three", 4: "Four"}.get(len(scored), str(len(scored)))
    report.section(
        f"{count} scorings",
        prose(
            f"Both sides are diffused to t = {t_start} (",
            metric(m, "diffusion.schedule"),
            " schedule, alpha_bar = ",
            metric(m, "diffusion.alpha_bar", 4),
            ": z_t keeps ",
            metric(m, "diffusion.signal_scale", 3),
            " of z_0 and adds ",
            metric(m, "diffusion.noise_scale", 3),
            " of noise) with a fixed noise per image drawn from a seed derived from its file name (",
            metric(m, "diffusion.noise"),
            " between the two "
            "sides). `t_start` decodes the regressor's noisy prediction as it is, as the reference did; `denoised` "
            "first takes it back to t = 0 by the forward relation z_0 = (z_t - sqrt(1 - alpha_bar) eps) / "
            "sqrt(alpha_bar). That is honest here because the noise is not a random draw hidden from the model: "
            "it is the fixed function of the file name that also made the test inputs, so at test time it is "
            "known and removing it is exact (with independent noise per side, the IR noise would still be known "
            "from the name, but the regressor could not predict it from its input). `t0` is a second regressor of "
            "the same size trained on the clean latents (no diffusion at all).",
        ),
        Table(("scoring", "what", "PSNR (dB)", "SSIM", "MSE ([-1, 1] pixels)"), tuple(rows)),
        prose(
            "The two oracle rows are fitted on the true IR images, so no model can use them: they say how much of "
            "the answer a score asks for. The true IR on an 8 x 8 grid scores ",
            metric(m, "baselines.oracle_low_resolution.psnr", 2),
            " dB, SSIM ",
            metric(m, "baselines.oracle_low_resolution.ssim", 3),
            "; the RGB input's own edges with the true IR's local gain and offset in every window (a guided filter "
            "of the answer) score ",
            metric(m, "baselines.oracle_local_affine.psnr", 2),
            " dB, SSIM ",
            metric(m, "baselines.oracle_local_affine.ssim", 3),
            ". A model has to get the IR's layout right at about that scale, from the RGB image alone, to reach them.",
        )
        if "oracle_local_affine" in m.get("baselines", {})
        else None,
        Figure(
            "figures/translation.png",
            "Test pairs: RGB input, predicted IR, true IR, the other scorings and the "
            "autoencoder's reconstruction of the true IR",
        )
        if contents.has("figures/translation.png")
        else None,
    )
    regressor_rows = tuple(
        (
            name,
            lookup(r, "input"),
            lookup(r, "target"),
            metric(m, f"regressors.{name}.test_mse", 4),
            metric(m, f"regressors.{name}.identity_mse", 4),
            metric(m, f"regressors.{name}.mean_mse", 4),
            metric(m, f"regressors.{name}.steps", 0),
            metric(m, f"regressors.{name}.train_seconds", 1),
        )
        for name, r in m.get("regressors", {}).items()
    )
    report.section(
        "Latent regressors",
        Paragraph(
            "U-Net regressors with skip connections and no time input "
            f"({lookup(m, 'regressors.regressor_t0.description')}"
            f"{', residual: f(z) = z + unet(z)' if config.regressor.residual else ''}), MSE loss, AdamW lr "
            f"{config.regressor.train.lr:g}, batch {config.regressor.train.batch_size}. Test latent MSE beside two "
            "baselines: the identity (the RGB latent as the IR latent) and the mean training IR latent."
        ),
        Table(
            ("regressor", "input", "target", "test MSE", "identity MSE", "mean-latent MSE", "steps", "training s"),
            regressor_rows,
        ),
    )
    if lookup(m, "inversion.steps"):
        second_order = lookup(m, "inversion.order") == 2
        integrator = (
            " steps of the second-order Adams-Bashforth flow (the probability-flow ODE DDIM follows, eta = 0)"
            if second_order
            else " deterministic DDIM steps (eta = 0)"
        )
        method = "the same flow" if second_order else "DDIM"

        def eps_losses(key: str) -> tuple[Any, str, Any]:
            """The RGB and the IR eps model's held-out loss under ``key``, as "a and b"."""
            rgb, ir = (metric(m, f"inversion.models.eps_{side}.{key}.loss", 4) for side in ("rgb", "ir"))
            return rgb, " and ", ir

        # runs made before the data-agnostic comparison was recorded lack it: say nothing rather than "-"
        against_agnostic: tuple[Any, ...] = (
            (", against ", *eps_losses("agnostic_validation"), " for the data-agnostic eps sqrt(1 - alpha_bar) x_t")
            if lookup(m, "inversion.models.eps_rgb.agnostic_validation") is not None
            else ()
        )
        report.section(
            "Inversion-based translation",
            prose(
                "Two eps-prediction U-Nets, one on the RGB latents and one on the IR latents (",
                str(lookup(m, "inversion.models.eps_ir.description")),
                "; held-out eps-MSE ",
                *eps_losses("final_validation"),
                *against_agnostic,
                "), invert both sides with ",
                metric(m, "inversion.steps", 0),
                f"{integrator} from t = 0 to t = {t_start}; a regressor of the same size as "
                f"the others maps the inverted RGB latent to the inverted IR latent, and {method} with the IR model "
                "takes its prediction back to t = 0 (the `inversion` scoring above). The round trip of the true test "
                "IR latents under the IR model (invert, then sample) has latent MSE ",
                metric(m, "inversion.round_trip_latent_mse", 5),
                "; decoded, it scores PSNR ",
                metric(m, "inversion.round_trip_decoded.psnr", 2),
                " dB and SSIM ",
                metric(m, "inversion.round_trip_decoded.ssim", 3),
                " against the decoded true IR latent (the inversion's own loss).",
            ),
        )
    cached = lookup(m, "latents.cached")
    report.section(
        "Autoencoder and latent cache",
        prose(
            f"{lookup(m, 'autoencoder.description')} (`vae.kind={lookup(m, 'autoencoder.kind')}`"
            + (
                ", trained on random crops of the training split's RGB and IR images"
                if config.vae.kind == "train"
                else ""
            )
            + "); latents ",
            str(tuple(lookup(m, "latents.shape") or ())),
            f" per {config.data.size} x {config.data.size} image. Decoding the exact IR latent scores PSNR ",
            metric(m, "baselines.autoencoder.psnr", 2),
            " dB, SSIM ",
            metric(m, "baselines.autoencoder.ssim", 3),
            ": what a perfect latent prediction would give.",
        ),
        Paragraph(
            f"Latent pairs cached as safetensors shards in `{lookup(m, 'latents.path')}` (key "
            f"{lookup(m, 'latents.key')}: a hash of the autoencoder's weights, the images and the settings); this "
            f"run {'reused it' if cached else 'encoded them'}"
            + (
                f"; stale caches removed: {', '.join(lookup(m, 'latents.stale_removed'))}"
                if lookup(m, "latents.stale_removed")
                else ""
            )
            + "."
        ),
    )
    data_rows = tuple(
        (
            key.replace("_", " "),
            metric(m, f"data.{key}", 2 if key == "test_fraction" else 0)
            if isinstance(lookup(m, f"data.{key}"), (int, float))
            else str(lookup(m, f"data.{key}")),
        )
        for key in (
            "input",
            "target",
            "size",
            "train_pairs",
            "test_pairs",
            "unmatched",
            "test_fraction",
            "split_seed",
            "intensity",
        )
        if lookup(m, f"data.{key}") is not None
    )
    report.section(
        "Data",
        Paragraph(
            "Pairs matched by file name; centre crop to a square, resize; the split is a seeded hash of each "
            "name (adding files never moves a pair between splits)."
        ),
        Table(("item", "value"), data_rows),
    )
    target_rows = tuple(
        (t["target"], Value(t["value"], f"targets.{i}.value", 2), t["met"]) for i, t in enumerate(m.get("targets", []))
    )
    report.section(
        "Targets",
        Table(("target", "measured", "met"), target_rows) if target_rows else None,
        Paragraph(
            "Times are those of the session that wrote this report: a rerun in the same folder (e.g. with "
            "`inversion.enabled=true`) reuses the trained stages and times only what it did."
        ),
    )
    from difflab.report import sections

    report.section(
        "Training",
        sections.curves_table(contents),
        Figure("figures/loss.png", "Autoencoder and regressor losses (test curves select nothing)")
        if contents.has("figures/loss.png")
        else None,
    )
    for title, blocks in sections.closing_sections(contents):
        report.section(title, *blocks)
    return report


# ------------------------------------------------------------------------------------------- difflab invert RUN
def train_rgb2ir(config: RGB2IRConfig, fresh: bool = False, echo: Callable[[str], object] = print) -> RunFolder:
    """``difflab train rgb2ir``: the autoencoder, the latent cache and the regressors (and, with
    ``inversion.enabled``, the eps models and the regressor on inverted latents), trained and exported."""
    return run_rgb2ir(config, fresh, echo, train_only=True)


def load_run_autoencoder(config: RGB2IRConfig, run_dir: Path, device: torch.device) -> Any:
    """The autoencoder a finished ``rgb2ir`` run used (its exported weights for ``vae.kind=train``)."""
    if config.vae.kind == "train":
        path = run_dir / "checkpoints" / "autoencoder.safetensors"
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist: the rgb2ir run has not trained its autoencoder")
        vae = KLAutoencoder(config.vae.training.model)
        ckpt.load_weights(vae, path)
    else:
        vae = given_vae(config, device)
    if config.vae.scaling_factor > 0:
        vae.scaling_factor = config.vae.scaling_factor
    return vae.to(device).eval().requires_grad_(False)


def invert_latent_run(
    run_dir: str | Path,
    steps: tuple[int, ...] = (10, 20, 50, 100),
    n: int = 64,
    t_end: int | None = None,
    device: str = "auto",
    echo: Any = print,
    fixed_point: int = 0,
    spacings: tuple[str, ...] = ("uniform",),
    orders: tuple[int, ...] = (1,),
) -> dict[str, Any]:
    """``difflab invert`` on an ``rgb2ir`` run made with ``inversion.enabled=true``: DDIM round trips (invert to
    ``t_end``, default the last t with alpha_bar >= 1e-3, then DDIM back with the same steps) of the first ``n``
    cached test latents of each side under that side's eps model. Per side and step count: latent MSE, and PSNR /
    SSIM of the decoded round trip against the decoded original latent (the inversion's own error, without the
    autoencoder's); with ``fixed_point`` K > 0 also the round trips refined by K fixed-point iterations per
    inversion step; one set of rows per timestep spacing in ``spacings`` and integrator order in ``orders``.
    Writes ``RUN/inversion.json`` and ``RUN/figures/inversion.png``."""
    from difflab.experiments.inversion import resolved_t_end, round_trip_cases, round_trip_rows, write_inversion

    run_dir = Path(run_dir)
    resolved = resolve_device(device)
    config = read_run_config(run_dir, RGB2IRConfig())
    cases = round_trip_cases(steps, n, fixed_point, spacings, orders)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    cache = lookup(metrics, "latents.path")
    splits = _read_cache(Path(cache), str(lookup(metrics, "latents.key"))) if cache else None
    if splits is None:
        raise ConfigError(f"{run_dir} has no complete rgb2ir latent cache to invert (finish the run first)")
    vae = load_run_autoencoder(config, run_dir, resolved)
    schedule = NoiseSchedule.from_config(config.schedule).to(resolved)
    t_end = resolved_t_end(schedule, t_end, steps)
    test = splits["test"]
    rows: list[dict[str, Any]] = []
    figure_rows: list[tuple[str, torch.Tensor]] = []

    def decode(latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, c, h, w) -> images (N, 3, H, W) clipped to [-1, 1], float32 on the CPU."""
        with torch.no_grad():
            return vae.decode(latents).float().clamp(-1, 1).cpu()

    for side in ("rgb", "ir"):
        path = run_dir / "checkpoints" / f"eps_{side}.safetensors"
        if not path.is_file():
            raise ConfigError(f"{run_dir} has no latent eps models: run rgb2ir with inversion.enabled=true")
        x0 = test[f"{side}0"][:n].to(resolved)
        model = UNet(replace(config.inversion.unet, in_channels=x0.shape[1], out_channels=x0.shape[1]))
        ckpt.load_weights(model, path)
        model = model.to(resolved).eval()
        side_rows, side_figure = round_trip_rows(
            model, schedule, x0, cases, t_end, decode, echo, f"{side.upper()} latents, ", {"side": side}
        )
        rows += side_rows
        if side == "ir":  # the IR images decoded as gray
            figure_rows += [
                (label, images.mean(1, keepdim=True).expand(-1, 3, -1, -1)) for label, images in side_figure
            ]
            original = decode(x0[:8])
            figure_rows.insert(0, ("decoded IR latent", original.mean(1, keepdim=True).expand(-1, 3, -1, -1)))
    return write_inversion(
        run_dir,
        schedule,
        t_end,
        rows,
        figure_rows,
        f"DDIM inversion of IR latents to t = {t_end} and back (decoded)",
        images="cached test latents of the rgb2ir run; PSNR/SSIM of the decoded round trip against the decoded "
        "original latent, [-1, 1] mapped to [0, 1]",
    )
