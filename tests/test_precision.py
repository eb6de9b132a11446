"""Execution settings shared by training and sampling: precision checks, bf16 autocast, weight layouts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.experiments.images import sample_images
from difflab.experiments.mnist import EvaluationConfig
from difflab.experiments.runs import option_tags
from difflab.models.unet import UNet, UNetConfig
from difflab.sampling.common import check_eta
from difflab.training.precision import (
    AutocastModel,
    check_config_precisions,
    check_precision,
    memory_format_for,
    resolve_precision,
    to_fast_layout,
)


def informative_unet() -> UNet:
    """A small U-Net whose zero-initialised output convolution is broken, so its eps is not identically 0."""
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), mid_attention=True))
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    return model.eval()


def test_the_layout_follows_device_and_precision() -> None:
    # oneDNN: fp32 convolutions are fastest NHWC, bf16 ones NCHW (benchmarks/cpu_precision.py); CUDA stays NCHW.
    assert memory_format_for("cpu", "fp32") == torch.channels_last
    assert memory_format_for(torch.device("cpu"), "bf16") == torch.contiguous_format
    assert memory_format_for("cuda", "fp32") == torch.contiguous_format
    model = to_fast_layout(informative_unet(), "cpu", "fp32")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    to_fast_layout(model, "cpu", "bf16")
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_precision_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch) -> None:
    """Emulated bf16 trained the CPU U-Net 11x slower than fp32 on a CPU without avx512_bf16 (0.63 s against 6.9 s
    per step, benchmarks/cpu_precision.py), native bf16 1.5-1.9x faster: ``auto`` picks by the CPU's flags."""
    from difflab.training import precision as precision_module

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    for native, expected, layout in ((True, "bf16", torch.contiguous_format), (False, "fp32", torch.channels_last)):
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_precision("auto", torch.device("cpu")) == expected
        assert memory_format_for("cpu", "auto") == layout
        with precision_module.autocast(torch.device("cpu"), "auto"):
            dtype = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        assert dtype == (torch.bfloat16 if native else torch.float32)
    check_precision("auto", torch.device("cpu"))


def test_precisions_a_device_cannot_run_are_refused() -> None:
    check_precision("bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA GPU"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, got 'fp16'"):
        check_precision("fp16", torch.device("cpu"), ("fp32", "bf16"))
    with pytest.raises(ConfigError, match="metrics.precision must be one of fp32, bf16, got 'int8'"):
        EvaluationConfig(precision="int8")


def test_every_precision_of_a_config_is_checked_by_its_key() -> None:
    from difflab.experiments.ldm import MnistLDMConfig

    config = MnistLDMConfig()
    check_config_precisions(config, torch.device("cpu"))
    nested = dataclasses.replace(
        config,
        vae=dataclasses.replace(
            config.vae,
            training=dataclasses.replace(
                config.vae.training, train=dataclasses.replace(config.vae.training.train, precision="fp16")
            ),
        ),
    )
    with pytest.raises(ConfigError, match=r"^vae\.training\.train\.precision=fp16 needs a CUDA GPU"):
        check_config_precisions(nested, torch.device("cpu"))


@pytest.mark.parametrize(
    ("recipe", "key"),
    [("mnist-ddpm", "train.precision"), ("states", "denoiser_train.precision"), ("mnist-ldm", "train.precision")],
)
def test_a_recipe_refuses_fp16_on_a_cpu_before_it_makes_a_run_folder(
    tmp_path: Path, capsys, recipe: str, key: str
) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", recipe, f"run_dir={run_dir}", "device=cpu", f"{key}=fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{key}=fp16 needs a CUDA GPU" in err and len(err.splitlines()) == 1, err
    assert not run_dir.exists()


def test_autocast_model_runs_bf16_and_answers_in_fp32() -> None:
    model = informative_unet()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 30, 60, 99])
    with torch.inference_mode():
        expected = model(x, t)
        out = AutocastModel(model, "cpu", "bf16")(x, t)
    assert out.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (relative rounding 2^-8 per op): close to fp32, but not the fp32 numbers.
    relative = (out - expected).norm() / expected.norm()
    assert 0 < relative < 0.05


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("dpmpp-2m", 8), ("ddpm", 0)])
def test_bf16_sampling_draws_the_fp32_images_up_to_rounding(sampler: str, steps: int) -> None:
    model, schedule = informative_unet(), NoiseSchedule.cosine(100)
    common = dict(sampler=sampler, steps=steps, eta=0.0, batch_size=6, seed=3, device=torch.device("cpu"))
    fp32 = sample_images(model, schedule, 6, (1, 8, 8), **common)
    bf16 = sample_images(model, schedule, 6, (1, 8, 8), precision="bf16", **common)
    assert bf16.images.dtype == torch.float32 and bf16.network_evaluations == fp32.network_evaluations
    difference = (bf16.images - fp32.images).abs().mean()
    spread = (fp32.images - fp32.images.roll(1, 0)).abs().mean()  # between different samples of the same run
    assert 0 < difference < 0.1 * spread
    with pytest.raises(ConfigError, match="fp16"):
        sample_images(model, schedule, 2, (1, 8, 8), precision="fp16", **common)


def test_option_tags_and_the_shared_eta_check() -> None:
    assert option_tags({"eta": 1.0, "spacing": "karras", "sde": True}) == "-eta1-spacingkarras-sdeTrue"
    assert option_tags({"eta": 0.5}, "_") == "_eta0.5" and option_tags(None) == ""
    check_eta(0.0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--eta must be finite and >= 0"):
            check_eta(bad, "--eta")
