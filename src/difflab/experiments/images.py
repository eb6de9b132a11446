"""Shared stages of the image recipes: data, the eps U-Net and its training, batched sampling, grids,
the denoising panel and the built-in evaluation."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difflab.data.batches import ShuffledBatches
from difflab.data.images import ImageSet, check_intensity, load_digits_8x8, load_image_folder
from difflab.diffusion.objectives import ObjectiveConfig, epsilon_loss, hybrid_loss
from difflab.diffusion.prediction import wrap_prediction
from difflab.diffusion.respacing import respaced
from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import split_output
from difflab.errors import ConfigError, DataError
from difflab.experiments.runs import CLASSES_FILE, RunFolder
from difflab.metrics.frechet import fid_ratio_std
from difflab.models.unet import UNet, UNetConfig
from difflab.sampling.common import EpsModel, batched, check_output_fits
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.ddpm import ddpm_sample
from difflab.sampling.guidance import ClassifierFreeGuidance
from difflab.sampling.wrappers import DiffusionModel
from difflab.seeding import mix_seed, seeded_generator
from difflab.training import distributed
from difflab.training.checkpoint import atomic_write_bytes
from difflab.training.logging import RunLogger
from difflab.training.precision import SAMPLING_PRECISIONS, AutocastModel, check_precision, to_fast_layout
from difflab.training.trainer import TrainConfig, Trainer, TrainResult

DATA_SOURCES = ("mnist", "imagefolder", "digits")
# The gray levels of each source's images in [-1, 1], on the grid 2 k / (levels - 1) - 1: MNIST's 8-bit k (data.mnist
# decodes the file's k / 256 to k) and image folders' 8-bit pixels, sklearn's digits v in 0..16. They set the
# discretised decoder's bins (vlb) and the dequantisation width 2 / (levels - 1) of the likelihood.
QUANTISATION_LEVELS = {"mnist": 256, "imagefolder": 256, "digits": 17}


@dataclass(frozen=True)
class ImageDataConfig:
    """Training images.

    ``source``: ``mnist`` (50k training digits; the evaluator compares against the 10k test digits),
    ``imagefolder`` (``path`` with one subfolder per class, centre-cropped and resized to ``size``, RGB
    or grayscale by ``channels``, 0 = infer; ``heldout_fraction`` of it held out) or ``digits``
    (scikit-learn's 8 x 8 digits, for quick tests). ``max_train`` > 0 keeps only that many. ``intensity``
    (image folders): ``full`` reads 16-bit images on 0..65535 and float ones on [0, 1]; ``stretch`` maps them from
    the folder's 0.5th..99.5th percentile to the full range (raw sensor data in a narrow band).
    """

    source: str = "mnist"
    path: str = ""
    size: int = 0
    channels: int = 0
    heldout_fraction: float = 0.1
    max_train: int = 0
    intensity: str = "full"

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        check_intensity(self.intensity, "data.intensity", ConfigError)
        if self.intensity != "full" and self.source != "imagefolder":
            raise ConfigError(
                f"data.intensity={self.intensity} applies to image folders only (data.source=imagefolder)"
            )
        if self.source == "imagefolder" and not self.path:
            raise ConfigError("data.source=imagefolder needs data.path=DIR (one subfolder per class)")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError("data.heldout_fraction must be in (0, 1)")
        if self.channels not in (0, 1, 3) or self.size < 0 or self.max_train < 0:
            raise ConfigError(
                "data.channels must be 0 (infer), 1 or 3 and data.size and data.max_train >= 0 (0 = as stored, all), "
                f"got {self.channels}, {self.size} and {self.max_train}"
            )


def split_images(images: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Seeded ``(rest, held_out)`` split."""
    order = torch.randperm(len(images), generator=seeded_generator(mix_seed(seed, 0, 81)))
    size = max(1, int(round(len(images) * fraction)))
    held, kept = order[:size], order[size:]

    return images.subset(kept), images.subset(held)


def load_image_data(config: ImageDataConfig, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(train, held_out)`` image sets, images (N, C, H, W) in [-1, 1]."""
    if config.source == "mnist":
        from difflab.data.mnist import load_mnist

        train, heldout = load_mnist("train"), load_mnist("test")
    elif config.source == "digits":
        train, heldout = split_images(load_digits_8x8(), config.heldout_fraction, seed)
    else:
        if config.size < 8:
            raise ConfigError("data.source=imagefolder needs data.size >= 8 (the square side after resizing)")
        images = load_image_folder(config.path, config.size, config.channels, intensity=config.intensity)
        train, heldout = split_images(images, config.heldout_fraction, seed)
        if len(train) == 0:
            raise DataError(
                f"{config.path} holds {len(images)} image(s), all held out (data.heldout_fraction="
                f"{config.heldout_fraction:g} keeps at least one): a folder needs at least 2 images"
            )
    if config.max_train:
        train = train.subset(slice(0, config.max_train))
    return train, heldout


def record_classes(run: RunFolder, data: ImageSet) -> None:
    """Write ``data``'s class names, in label order, to the run's ``classes.json`` (``{"class_names": [...]}``;
    rank 0 alone): ``difflab sample --class NAME`` resolves names against them, not against a folder whose listing
    may have changed since."""
    if run.main:
        atomic_write_bytes(run.sub(CLASSES_FILE), (json.dumps({"class_names": list(data.class_names)}) + "\n").encode())


def recorded_classes(run_dir: str | Path) -> tuple[str, ...] | None:
    """The class names a run recorded (:func:`record_classes`), or None for a run made before they were."""
    path = Path(run_dir) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())["class_names"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is damaged ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise DataError(f"{path} is damaged: class_names must be a list of names")
    return tuple(names)


def fit_unet_to_data(config: UNetConfig, data: ImageSet) -> tuple[UNetConfig, list[str]]:
    """``config`` with the in/out channels of ``data`` (images (N, C, H, W)) and, for a class-conditional U-Net
    (``num_classes`` > 0), its number of classes: the only values that can work, so a folder of RGB images or of
    5 classes runs without further keys. Returns the config and the overrides it applied (``key=value``)."""
    changes = {"in_channels": data.channels, "out_channels": data.channels}
    if config.num_classes:
        changes["num_classes"] = data.num_classes
    changes = {key: value for key, value in changes.items() if getattr(config, key) != value}
    return dataclasses.replace(config, **changes), [f"unet.{key}={value}" for key, value in changes.items()]


def build_unet(config: UNetConfig, data: ImageSet, learned_variance: bool = False) -> UNet:
    """A U-Net whose channels and classes fit ``data`` (the config's in/out channels are checked; a learned-variance
    model outputs ``[eps, v]``, twice the data's channels)."""
    out_channels = data.channels * (2 if learned_variance else 1)
    if config.in_channels != data.channels or config.out_channels != out_channels:
        raise ConfigError(
            f"unet.in_channels/out_channels are {config.in_channels}/{config.out_channels} but the images have "
            f"{data.channels} channels; set unet.in_channels={data.channels} unet.out_channels={out_channels}"
        )
    if config.num_classes and config.num_classes != data.num_classes:
        raise ConfigError(f"unet.num_classes={config.num_classes} but the data has {data.num_classes} classes")
    check_label_context(config)
    return UNet(config)


def check_label_context(config: Any, key: str = "") -> None:
    """Every U-Net in a recipe's ``config`` (searched through its nested sections; ``key`` the path so far) that
    has cross-attention must take the label as its context: :meth:`UNet.forward` accepts any context, but no
    recipe passes one, so ``class_conditioning=add`` with cross-attention would fail at the first step."""
    if isinstance(config, UNetConfig):
        key = key or "unet"
        if config.has_cross_attention and config.class_conditioning == "add":
            raise ConfigError(
                f"{key}.cross_attention_levels / {key}.mid_cross_attention attend to the label: set "
                f"{key}.class_conditioning=cross or both (a class-conditional model), or remove the cross-attention"
            )
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        for item in dataclasses.fields(config):
            check_label_context(getattr(config, item.name), f"{key}.{item.name}" if key else item.name)


def image_validation(
    schedule: NoiseSchedule,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    device: torch.device,
    seed: int,
    count: int = 256,
) -> Callable[[torch.nn.Module], dict]:
    """eps-MSE of ``count`` held-out images at 10 evenly spaced timesteps with fixed noise."""
    images, labels = images[:count], None if labels is None else labels[:count]
    steps = torch.linspace(0, schedule.num_timesteps - 1, 10).round().long()
    x0 = images.repeat(len(steps), 1, 1, 1).to(device)
    t = steps.repeat_interleave(len(images)).to(device)
    y = None if labels is None else labels.repeat(len(steps)).to(device)
    noise = torch.randn(x0.shape, generator=seeded_generator(mix_seed(seed, 0, 91))).to(device)
    x_t = schedule.q_sample(x0, t, noise)

    def validate(model: torch.nn.Module) -> dict[str, float]:
        total = 0.0
        for start in range(0, len(x0), 512):
            chunk = slice(start, start + 512)
            prediction = model(x_t[chunk], t[chunk]) if y is None else model(x_t[chunk], t[chunk], y[chunk])
            prediction, _ = split_output(prediction, x_t[chunk])  # the eps part of a learned-variance output
            total += float(torch.nn.functional.mse_loss(prediction, noise[chunk], reduction="sum"))
        return {"loss": total / noise.numel()}

    return validate


def train_image_denoiser(
    run: RunFolder,
    logger: RunLogger,
    train: ImageSet,
    heldout: ImageSet,
    schedule: NoiseSchedule,
    unet_config: UNetConfig,
    train_config: TrainConfig,
    seed: int,
    device: torch.device,
    show_progress: bool,
    label_dropout: float = 0.0,
    hooks: list[Callable[[Trainer], None]] | None = None,
    name: str = "denoiser",
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
    decoder: str = "discretized",
    objective: ObjectiveConfig | None = None,
    decoder_levels: int = 256,
) -> tuple[Trainer, TrainResult]:
    """Train (or resume) the eps U-Net; conditional when ``unet_config.num_classes`` > 0.

    ``learned_variance``: the U-Net outputs ``[eps, v]`` and is trained with the hybrid loss
    ``L_simple + vlb_weight L_vlb`` (``decoder``: ``discretized`` for quantised images, with ``decoder_levels`` gray
    levels (:data:`QUANTISATION_LEVELS`), ``gaussian`` for latents).
    ``name`` names the checkpoints (several models can share a run folder). The weights take the layout
    :func:`~difflab.training.precision.memory_format_for` picks for the device and ``train_config.precision``
    (channels-last for fp32 on CPU, NCHW for bf16). ``objective``: Min-SNR
    weighting / input perturbation of the eps loss, or v-prediction
    (:class:`~difflab.diffusion.objectives.ObjectiveConfig`; not with ``learned_variance``);
    a v-network is returned wrapped in :class:`~difflab.diffusion.prediction.VPrediction`, an eps model.
    """
    objective = objective or ObjectiveConfig()
    if learned_variance and objective != ObjectiveConfig():
        raise ConfigError(
            "objective.weighting / input_perturbation / prediction apply to the eps loss, not the hybrid loss"
        )
    torch.manual_seed(mix_seed(seed, 0, 92))
    model = wrap_prediction(build_unet(unet_config, train, learned_variance), objective.prediction, schedule)
    model = model.to(device)
    model = to_fast_layout(model, device, train_config.precision)
    conditional = unet_config.num_classes > 0
    tensors = (train.images.to(device), train.labels.to(device))
    batches = ShuffledBatches(tensors, train_config.batch_size, seed=mix_seed(seed, 0, 93))
    null_label = unet_config.num_classes

    def loss_fn(net: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """batch: (images (B, C, H, W), labels (B,)) -> the hybrid or eps loss, a scalar."""
        images, labels = batch
        if learned_variance:
            return hybrid_loss(
                net,
                schedule,
                images,
                generator,
                labels if conditional else None,
                label_dropout,
                null_label if conditional else None,
                vlb_weight,
                decoder,
                decoder_levels,
            )
        if not conditional:
            return epsilon_loss(net, schedule, images, generator, objective=objective)
        return epsilon_loss(net, schedule, images, generator, labels, label_dropout, null_label, objective)

    signature = {"model": "UNet", "config": repr(unet_config), "num_timesteps": schedule.num_timesteps}
    if learned_variance:
        signature.update(objective="hybrid", vlb_weight=vlb_weight, decoder=decoder)
        if decoder == "discretized" and decoder_levels != 256:
            signature.update(decoder_levels=decoder_levels)
    elif objective != ObjectiveConfig():
        signature.update(objective=repr(objective))
    trainer = Trainer(
        name,
        model,
        loss_fn,
        batches,
        train_config,
        run.path,
        logger,
        validate=image_validation(schedule, heldout.images, heldout.labels if conditional else None, device, seed),
        signature=signature,
        seed=mix_seed(seed, 0, 94),
        device=device,
        show_progress=show_progress,
        hooks=hooks,
    )
    result = trainer.fit()
    trainer.eval_model.eval()
    return trainer, result


class EpsPart:
    """The eps half of a model that may output ``[eps, v]`` (learned variance, (B, 2C, ...)): (B, C, ...)."""

    def __init__(self, model: EpsModel) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, C, ...), t: (B,) -> eps (B, C, ...)."""
        return split_output(self.model(x, t), x)[0]


def guided_model(model: torch.nn.Module, labels: torch.Tensor | None, w: float, num_classes: int) -> EpsModel:
    """The eps model to sample with: unconditional, or classifier-free guided towards ``labels``."""
    if labels is None or not num_classes:
        return model
    return ClassifierFreeGuidance(model, labels, null_label=num_classes, w=w)


@dataclass
class SampleResult:
    images: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None
    seconds: float
    network_evaluations: int


def checked_sampler(sampler: str, options: dict[str, Any] | None) -> Any:
    """The registry entry of ``sampler`` for :func:`sample_images`, with ``options`` checked: the image recipes run
    ``ddpm`` and ``ddim`` themselves, so those take no options here (``eta`` is an argument of DDIM's own)."""
    from difflab.sampling.solvers import get_sampler

    spec = get_sampler(sampler)  # an unknown name fails here
    if options and sampler in ("ddpm", "ddim"):
        raise ConfigError(
            f"sampler options are for the registry samplers: {sampler} is the recipe's own sampler here (--eta sets "
            "DDIM's eta); pick another --sampler to pass options"
        )
    spec.check_options(options or {})
    return spec


def sample_images(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    n: int,
    shape: tuple[int, int, int],
    *,
    sampler: str,
    steps: int,
    eta: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    labels: torch.Tensor | None = None,
    guidance: float = 1.0,
    num_classes: int = 0,
    show_progress: bool = False,
    callback: Callable[..., None] | None = None,
    clip_x0: float | None = 1.0,
    variance: str = "beta",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    options: dict[str, Any] | None = None,
    precision: str = "fp32",
) -> SampleResult:
    """``n`` images in batches from fixed seeds; labels (n,) make the samples class-conditional (CFG scale
    ``guidance``). The same ``seed`` gives the same initial noise, whatever the sampler.

    ``sampler`` is any name of ``sampling.solvers.SAMPLERS``; ``ddpm`` runs all T steps when ``steps`` is 0 or T,
    else ``steps`` respaced steps (Nichol & Dhariwal sec. 4), with ``variance`` its reverse variance (``learned``
    for a model that outputs ``[eps, v]``). ``clip_x0 = c`` clips every x_0 prediction to [-c, c] (Ho et al.'s
    ``clip_denoised``): 1 for pixel images in [-1, 1], the largest absolute value of the training latents for
    latent diffusion, None for no clipping. ``decode`` maps
    each sampled batch to images (latent diffusion: the autoencoder's decoder), inside the timed region.
    Images are clipped to [-1, 1]. ``options`` go to a registry sampler's function (not to ``ddpm`` and ``ddim``,
    which run here as the recipes run them). ``precision="bf16"`` evaluates the network under bf16 autocast (the
    sampler's arithmetic stays fp32; on CPU the weights should then be NCHW, see
    :func:`~difflab.training.precision.to_fast_layout`)."""
    from difflab.sampling.solvers import sample

    spec = checked_sampler(sampler, options)  # before any work
    if steps != 0:  # 0: all T steps
        spec.check_steps(steps, schedule.num_timesteps)
    check_precision(precision, torch.device(device), SAMPLING_PRECISIONS)
    check_output_fits(n, shape, "images")
    if precision != "fp32":
        model = AutocastModel(model, device, precision)
    respacing = respaced(schedule, steps) if sampler == "ddpm" and 0 < steps < schedule.num_timesteps else None
    context = distributed.current()
    start, calls = time.perf_counter(), 0

    class Counting:
        def __init__(self, inner: EpsModel) -> None:
            self.inner = inner

        def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            """x: (B, ...), t: (B,) -> the inner model's output (B, ...); counts its network calls."""
            nonlocal calls
            doubled = isinstance(self.inner, ClassifierFreeGuidance) and self.inner.w not in (0, 1)
            calls += x.shape[0] * (2 if doubled else 1)
            return self.inner(x, t)

    def draw(shard: int, count: int) -> torch.Tensor:
        """The ``count`` samples of shard ``shard``, (count, ...) of ``shape`` (or the images ``decode`` makes of
        them), clipped to [-1, 1]."""
        first_row = distributed.shard_range(n, shard, context.world_size)[0] if context.enabled else 0
        generator = seeded_generator(mix_seed(distributed.shard_seed(seed, shard), 0, 95), device)
        outputs, offset = [], 0
        for size in batched(count, batch_size):
            rows = slice(first_row + offset, first_row + offset + size)
            batch_labels = None if labels is None else labels[rows].to(device)
            eps_model = Counting(guided_model(model, batch_labels, guidance, num_classes))
            # The data lie in [-clip_x0, clip_x0]: clip the x_0 predictions. DDPM clips inside its step, which also
            # keeps a learned variance's v; the other samplers see a wrapper that re-derives eps from the clipped x_0.
            if clip_x0 is not None and sampler != "ddpm":
                eps_model = DiffusionModel(EpsPart(eps_model), schedule, "eps", clip_x0=clip_x0)
            full_shape = (size, *shape)
            first = callback if shard == 0 and offset == 0 else None
            if sampler == "ddpm":  # ancestral sampling over all T steps, or respaced ones
                model_fn, chain = (
                    (eps_model, schedule) if respacing is None else (respacing.wrap(eps_model), respacing.schedule)
                )
                x = ddpm_sample(
                    model_fn,
                    chain,
                    full_shape,
                    generator=generator,
                    device=device,
                    variance=variance,
                    clip_x0=clip_x0,
                    callback=first,
                    show_progress=show_progress,
                )
            elif sampler == "ddim":
                x = ddim_sample(
                    eps_model,
                    schedule,
                    full_shape,
                    steps=steps,
                    eta=eta,
                    generator=generator,
                    device=device,
                    callback=first,
                    show_progress=show_progress,
                )
            else:  # any other sampler of the registry (DPM-Solver++, Heun, Euler, respaced DDPM, ...)
                x = sample(
                    sampler,
                    eps_model,
                    schedule,
                    full_shape,
                    steps=steps,
                    generator=generator,
                    device=device,
                    callback=first,
                    show_progress=show_progress,
                    **(options or {}),
                )
            if decode is not None:
                with torch.inference_mode():
                    x = decode(x)
            outputs.append(x.clamp(-1, 1))
            offset += size
        return torch.cat(outputs)

    # Under torchrun every rank draws its shard of the n samples and all receive the whole set; a set smaller
    # than the number of processes (a progress grid) is drawn whole by every rank.
    images = distributed.sample_sharded(draw, n, context) if n >= context.world_size else draw(0, n)
    calls = calls * (context.world_size if context.enabled and n >= context.world_size else 1)
    return SampleResult(images.cpu(), labels, time.perf_counter() - start, calls)


def balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """``0, 1, ..., K-1, 0, 1, ...`` of length n: every class equally often."""
    return torch.arange(n) % num_classes


def denoising_trajectory(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    steps: int,
    frames: int,
    seed: int,
    device: torch.device,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Run DDIM and keep ``frames`` snapshots of ``x_t`` and the predicted ``x_0``.

    Returns ``(timesteps, x_t (frames, B, C, H, W), x0_pred (frames, B, C, H, W))``.
    """
    keep = set(torch.linspace(0, steps - 1, frames).round().long().tolist())
    timesteps, xs, x0s = [], [], []

    def record(k: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if k in keep:
            timesteps.append(t)
            xs.append(x.detach().cpu().clamp(-3, 3))
            x0s.append(x0.detach().cpu().clamp(-1, 1))

    ddim_sample(
        model, schedule, shape, steps=steps, generator=seeded_generator(seed, device), device=device, callback=record
    )
    return timesteps, torch.stack(xs), torch.stack(x0s)


def evaluator_for(
    data: ImageDataConfig,
    device: torch.device,
    echo: Callable[[str], None] = print,
    inception_weights: str = "",
    sets: tuple[ImageSet, ImageSet] | Callable[[], tuple[ImageSet, ImageSet]] | None = None,
) -> Any:
    """The built-in evaluator of the run's data, or None where there is none.

    MNIST: the reference digit CNN against the test digits (plus InceptionV3 FID/IS with ``inception_weights``).
    An image folder with ``inception_weights``: InceptionV3 FID/IS against the folder's held-out split, ``sets`` =
    the run's ``(train, held_out)`` (or a loader of them). Anything else (sklearn's digits, a folder without
    Inception weights): None, as no feature extractor here can judge it.
    """
    from difflab.metrics.image_eval import ImageEvaluator

    if data.source == "mnist":
        return ImageEvaluator.for_mnist(device=device, echo=echo, inception_weights=inception_weights or None)
    if data.source != "imagefolder" or not inception_weights or sets is None:
        return None
    train, heldout = sets() if callable(sets) else sets
    return ImageEvaluator.for_image_folder(
        train, heldout, f"{data.path} (held-out split)", inception_weights, device=device, echo=echo
    )


def no_evaluator_reason(data: ImageDataConfig) -> str:
    """Why :func:`evaluator_for` gives no evaluator for ``data`` (one clause, for messages and reports)."""
    if data.source == "imagefolder":
        return (
            "an image folder is scored only with InceptionV3 weights: set metrics.inception_weights=PATH "
            "(difflab evaluate: --inception-weights PATH)"
        )
    return f"no feature extractor here judges {data.source!r} images (the evaluator scores MNIST and image folders)"


def fid_scoring(
    evaluator: Any, to_images: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[dict[str, Callable[[torch.Tensor], float]], Callable[[int], dict[str, float]] | None]:
    """The sampling commands' quality metric: ``({"fid": samples -> FID}, n -> {"fid": real held-out FID at n})``
    by ``evaluator`` (``({}, None)`` without one). ``to_images`` maps samples to images first (latents: decode)."""
    if evaluator is None:
        return {}, None
    reference_rows: dict[int, dict[str, float]] = {}

    def fid(samples: torch.Tensor) -> float:
        return float(evaluator.evaluate(samples if to_images is None else to_images(samples))["fid"])

    def references_at(n: int) -> dict[str, float]:
        if n not in reference_rows:
            real = evaluator.calibration(evaluator.calibration_count(n))[0]
            reference_rows[n] = {"fid": float(real["fid"])}
        return reference_rows[n]

    return {"fid": fid}, references_at


def with_ratio_noise(
    target: dict[str, Any], base: dict[str, Any], other: dict[str, Any], limit: float
) -> dict[str, Any]:
    """A target on the FID ratio ``other["fid"] / base["fid"] <= 1 + limit`` with the ratio's sampling noise added
    (``noise``, 1 sd from the two results' bootstrap ``fid_std``, independent sample sets) and, in its text, whether
    this n can tell (``|ratio - (1 + limit)| > 2 sd``; ``resolved``). Unchanged when either result has no
    ``fid_std``. The target's ``met`` stays the verdict of the measured ratio."""
    if "fid_std" not in base or "fid_std" not in other:
        return target
    noise = fid_ratio_std(base["fid"], base["fid_std"], other["fid"], other["fid_std"])
    resolved = abs(other["fid"] / base["fid"] - 1 - limit) > 2 * noise
    verdict = "so the verdict holds beyond 2 sd" if resolved else "so this n cannot tell the ratio from the limit"
    return {
        **target,
        "noise": noise,
        "resolved": resolved,
        "target": f"{target['target']}; sampling noise of the ratio at n = {base['n']:,}: {noise:.3f} (1 sd, "
        f"bootstrap), {verdict}",
    }


def save_samples(path: Path, result: SampleResult) -> None:
    """Samples as a ``.pt`` dict of tensors (``images``, ``labels``), loadable with ``weights_only=True``."""
    payload = {"images": result.images.contiguous()}
    if result.labels is not None:
        payload["labels"] = result.labels.contiguous()
    torch.save(payload, path)


# ---------------------------------------------------------------- measurements for the DDPM vs DDIM report


def diagnostic_timesteps(num_timesteps: int) -> list[int]:
    """Seven timesteps spread over the chain: 0, 10%, 25%, 50%, 75%, 90% of T, and T - 1."""
    fractions = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    return sorted({min(round(f * num_timesteps), num_timesteps - 1) for f in fractions})


def forward_statistics(schedule: NoiseSchedule, images: torch.Tensor, seed: int, count: int = 512) -> dict[str, Any]:
    """The forward process measured on ``count`` images (N, C, H, W) at :func:`diagnostic_timesteps`.

    Each row has ``alpha_bar`` and ``log10_snr`` (``SNR = alpha_bar / (1 - alpha_bar)``), the measured pixel
    mean and std of ``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``, the closed-form std
    ``sqrt(alpha_bar Var(x_0) + 1 - alpha_bar)`` and the correlation of ``x_t`` with ``x_0``.
    """
    x0 = images[:count].float().cpu()
    variance = float(x0.var())
    generator = seeded_generator(mix_seed(seed, 0, 96))
    rows = []
    for t in diagnostic_timesteps(schedule.num_timesteps):
        alpha_bar = float(schedule.alpha_bar[t])
        noise = torch.randn(x0.shape, generator=generator)
        x_t = math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * noise  # q(x_t | x_0) in closed form
        correlation = torch.corrcoef(torch.stack([x_t.flatten(), x0.flatten()]))[0, 1]
        rows.append(
            {
                "t": t,
                "alpha_bar": alpha_bar,
                "log10_snr": math.log10(alpha_bar / (1 - alpha_bar)),
                "x_t_mean": float(x_t.mean()),
                "x_t_std": float(x_t.std()),
                "closed_form_std": math.sqrt(alpha_bar * variance + 1 - alpha_bar),
                "correlation_with_x0": float(correlation),
            }
        )
    stds = [r["x_t_std"] for r in rows]
    return {
        "n": len(x0),
        "num_timesteps": schedule.num_timesteps,
        "x0_mean": float(x0.mean()),
        "x0_std": math.sqrt(variance),
        "x_t_std_min": min(stds),
        "x_t_std_max": max(stds),
        "rows": rows,
    }


@torch.no_grad()
def loss_by_timestep(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    images: torch.Tensor,
    seed: int,
    device: torch.device,
    count: int = 256,
) -> dict[str, Any]:
    """The trained eps-model's losses on ``count`` held-out images (N, C, H, W) at :func:`diagnostic_timesteps`.

    Per row: ``beta``, ``log10_snr``, Ho et al.'s ELBO weight of the eps-MSE,
    ``beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))`` with ``sigma_t^2 = beta_t``, the eps-MSE, the MSE
    of the implied ``x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)``, and
    ``eps_mse / SNR``, which equals the x_0 MSE since ``x_0 - x0_hat = (eps_hat - eps) / sqrt(SNR)``.
    """
    model.eval()
    x0 = images[:count].float().to(device)
    generator = seeded_generator(mix_seed(seed, 0, 98))
    rows = []
    for t in diagnostic_timesteps(schedule.num_timesteps):
        noise = torch.randn(x0.shape, generator=generator).to(device)
        index = torch.full((len(x0),), t, device=device, dtype=torch.long)
        x_t = schedule.q_sample(x0, index, noise)
        eps_hat = torch.cat([model(x_t[s : s + 256], index[s : s + 256]) for s in range(0, len(x0), 256)])
        x0_hat = schedule.predict_x0(x_t, index, eps_hat)
        beta, alpha, alpha_bar = (float(v[t]) for v in (schedule.betas, schedule.alphas, schedule.alpha_bar))
        snr = alpha_bar / (1 - alpha_bar)
        eps_mse = float(torch.mean((eps_hat - noise) ** 2))
        rows.append(
            {
                "t": t,
                "beta": beta,
                "log10_snr": math.log10(snr),
                "elbo_weight": beta**2 / (2 * beta * alpha * (1 - alpha_bar)),  # Ho et al. eq. 12, sigma_t^2 = beta_t
                "eps_mse": eps_mse,
                "x0_mse": float(torch.mean((x0_hat - x0) ** 2)),
                "eps_mse_over_snr": eps_mse / snr,
            }
        )
    weights = [r["elbo_weight"] for r in rows]
    return {"n": len(x0), "elbo_weight_max_over_min": max(weights) / min(weights), "rows": rows}


@torch.no_grad()
def sampler_determinism(
    model: EpsModel,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    n: int,
    ddim_steps: int,
    seed: int,
    device: torch.device,
    clip_x0: float | None = 1.0,
) -> dict[str, Any]:
    """Is the sampler a deterministic map of x_T? ``n`` starting points x_T (n, *shape), each sampled twice
    with different generators for every draw after x_T: DDIM (eta = 0, ``ddim_steps``) in two separate calls,
    DDPM (all T steps) in one call of the 2n duplicated x_T. Differences are of the final images in [-1, 1];
    ``different_x_T`` is the scale of unrelated images (DDIM images of neighbouring x_T). ``clip_x0`` clips the
    x_0 predictions as :func:`sample_images` does."""
    x_T = torch.randn((n, *shape), generator=seeded_generator(mix_seed(seed, 0, 97))).to(device)
    if clip_x0 is not None:
        model = DiffusionModel(model, schedule, "eps", clip_x0=clip_x0)

    def generator(k: int) -> torch.Generator:
        return seeded_generator(mix_seed(seed, k, 99), device)

    def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
        difference = (a - b).abs()
        return {
            "identical": bool(torch.equal(a, b)),
            "max_abs_diff": float(difference.max()),
            "mean_abs_diff": float(difference.mean()),
        }

    ddim = [
        ddim_sample(
            model, schedule, x_T.shape, steps=ddim_steps, eta=0.0, generator=generator(k), device=device, x_T=x_T
        ).clamp(-1, 1)
        for k in (1, 2)
    ]
    pair = ddpm_sample(
        model, schedule, (2 * n, *shape), generator=generator(3), device=device, x_T=torch.cat([x_T, x_T])
    ).clamp(-1, 1)
    return {
        "n": n,
        "ddim_steps": ddim_steps,
        "ddpm_steps": schedule.num_timesteps,
        "ddim": compare(ddim[0], ddim[1]),
        "ddpm": compare(pair[:n], pair[n:]),
        "different_x_T": {"mean_abs_diff": float((ddim[0] - ddim[0].roll(1, dims=0)).abs().mean())},
    }
