"""Autoencoders for latent diffusion: the KL-VAE, its loss and scaling factor, PSNR/SSIM, a pretrained diffusers
AutoencoderKL (a tiny random one saved to a temporary folder), and the ``autoencoder`` recipe on 8 x 8 digits."""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.data.images import load_digits_8x8
from difflab.errors import ConfigError
from difflab.experiments.autoencoder import AutoencoderTrainingConfig, load_autoencoder_run
from difflab.metrics.reconstruction import reconstruction_metrics
from difflab.models.autoencoder import (
    Autoencoder,
    AutoencoderConfig,
    KLAutoencoder,
    load_diffusers_autoencoder,
)
from difflab.training import checkpoint as ckpt
from difflab.training.autoencoder import autoencoder_loss, latent_scaling_factor, random_crops
from reportcheck import assert_rebuilds


def test_vae_shapes_scaling_and_the_protocol(tmp_path: Path) -> None:
    vae = KLAutoencoder(AutoencoderConfig(base_channels=8, channel_mults=(1, 2, 2)))
    assert isinstance(vae, Autoencoder)
    assert vae.latent_shape((1, 28, 28)) == (4, 7, 7)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    mean, log_variance = vae.encode_moments(x)
    assert mean.shape == log_variance.shape == (3, 4, 7, 7)
    vae.scaling_factor = 2.5
    torch.testing.assert_close(vae.encode(x), 2.5 * mean)
    torch.testing.assert_close(vae.decode(vae.encode(x)), vae.decode_raw(mean))
    assert vae.decode(vae.encode(x)).shape == x.shape
    # The scaling factor is a buffer: it is saved with the weights and comes back with them.
    ckpt.export_weights(tmp_path / "vae.safetensors", vae.state_dict(), {})
    other = KLAutoencoder(AutoencoderConfig(base_channels=8, channel_mults=(1, 2, 2)))
    ckpt.load_weights(other, tmp_path / "vae.safetensors")
    assert other.scaling_factor == 2.5
    with pytest.raises(ConfigError, match="multiples of 4"):
        vae.latent_shape((1, 30, 30))


def test_kl_term_is_the_closed_form() -> None:
    """KL(N(mu, sigma^2) || N(0, 1)) = 0.5 (mu^2 + sigma^2 - 1 - log sigma^2), summed over the latent."""

    class Fixed(torch.nn.Module):
        def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.full((images.shape[0], 2, 2, 2), 0.5), torch.full((images.shape[0], 2, 2, 2), math.log(0.25))

        def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
            return torch.zeros(z.shape[0], 1, 4, 4)

        def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
            return (2, 2, 2)

        def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, ...]:
            mean, log_variance = self.encode_moments(images)
            return self.decode_raw(mean + torch.exp(0.5 * log_variance) * noise), mean, log_variance

    images = torch.full((5, 1, 4, 4), 0.2)
    loss, parts = autoencoder_loss(Fixed(), images, torch.Generator().manual_seed(0), kl_weight=2.0)
    kl = 8 * 0.5 * (0.25 + 0.25 - 1 - math.log(0.25))
    torch.testing.assert_close(parts["kl"], torch.tensor(kl))
    torch.testing.assert_close(loss, torch.tensor(0.2 + 2.0 * kl / 16))
    _, l2 = autoencoder_loss(Fixed(), images, torch.Generator().manual_seed(0), reconstruction="l2")
    torch.testing.assert_close(l2["reconstruction"], torch.tensor(0.04))


def test_psnr_and_ssim_against_closed_forms() -> None:
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    perfect = reconstruction_metrics(lambda x: x, images)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["mse"] == 0
    # A uniform shift of 0.05 in [0, 1] units (0.1 in [-1, 1]) where it does not clip: PSNR = 10 log10(1 / 0.05^2).
    inner = images.clamp(-0.8, 0.8)
    shifted = reconstruction_metrics(lambda x: x + 0.1, inner)
    assert shifted["psnr"] == pytest.approx(10 * math.log10(1 / 0.0025), rel=1e-4)
    assert shifted["ssim"] < 1


def test_the_vae_learns_and_its_latents_are_scaled_to_unit_std() -> None:
    torch.manual_seed(0)
    digits = load_digits_8x8()
    vae = KLAutoencoder(AutoencoderConfig(base_channels=8, channel_mults=(1, 2)))
    before = reconstruction_metrics(lambda x: vae.decode(vae.encode(x)), digits.images[:256])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        batch = digits.images[torch.randint(0, len(digits), (64,), generator=generator)]
        loss, _ = autoencoder_loss(vae, batch, generator, kl_weight=1e-6)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vae.eval()
    vae.scaling_factor = latent_scaling_factor(vae, digits.images)
    with torch.no_grad():
        after = reconstruction_metrics(lambda x: vae.decode(vae.encode(x)), digits.images[:256])
        latents = vae.encode(digits.images)
    assert after["psnr"] > before["psnr"] + 6 and after["ssim"] > before["ssim"] + 0.3
    # and beats the plain 2 x 2 average-pool "codec" of the same downsampling, which ignores the data (measured
    # 2026-12-06: the VAE 20.6 dB / SSIM 0.95, the pool 13.7 dB / 0.76, untrained 6.5 dB / -0.02)
    pooled = reconstruction_metrics(
        lambda x: torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x, 2), scale_factor=2),
        digits.images[:256],
    )
    assert after["psnr"] > pooled["psnr"] + 4 and after["ssim"] > pooled["ssim"] + 0.1
    assert float(latents.std()) == pytest.approx(1.0, rel=1e-4)


def test_random_crops_are_windows_of_each_image_and_the_config_checks_their_size() -> None:
    images = torch.arange(6 * 2 * 10 * 12, dtype=torch.float32).reshape(6, 2, 10, 12)
    crops = random_crops(images, 4, torch.Generator().manual_seed(3))
    assert crops.shape == (6, 2, 4, 4)
    corners = set()
    for image, crop in zip(images, crops):
        # arange gives every pixel a distinct value, so the first pixel locates the window
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 12)
        assert top <= 6 and left <= 8 and torch.equal(crop, image[:, top : top + 4, left : left + 4])
        corners.add((top, left))
    assert len(corners) > 1  # the windows differ from image to image
    again = random_crops(images, 4, torch.Generator().manual_seed(3))
    assert torch.equal(crops, again)
    with pytest.raises(ConfigError, match="crop must be 0 or a multiple of 4"):
        AutoencoderTrainingConfig(model=AutoencoderConfig(channel_mults=(1, 2, 4)), crop=6)


def _tiny_diffusers_vae(folder: Path, scaling_factor: float = 0.18215) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
    )
    vae.save_pretrained(folder)
    return folder


def test_a_pretrained_diffusers_vae_from_a_local_folder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    folder = _tiny_diffusers_vae(tmp_path / "sd-vae")
    wrapped = load_diffusers_autoencoder(folder, (1, 28, 28))
    assert isinstance(wrapped, Autoencoder) and wrapped.scaling_factor == pytest.approx(0.18215)
    assert wrapped.latent_shape((1, 28, 28)) == (4, 4, 4)  # 28 padded to 32, downsampled x8
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    reference = AutoencoderKL.from_pretrained(folder).eval()
    with torch.no_grad():
        latents = wrapped.encode(x)
        padded = torch.nn.functional.pad(x.repeat(1, 3, 1, 1), (0, 4, 0, 4), mode="replicate")
        expected = reference.encode(padded).latent_dist.mean * 0.18215
        torch.testing.assert_close(latents, expected)
        decoded = wrapped.decode(latents)
        expected_images = reference.decode(expected / 0.18215).sample[..., :28, :28].mean(dim=1, keepdim=True)
    assert decoded.shape == x.shape
    torch.testing.assert_close(decoded, expected_images)
    assert load_diffusers_autoencoder(folder, (1, 28, 28), scaling_factor=0.5).scaling_factor == 0.5


def test_diffusers_vae_errors(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="local folder"):
        load_diffusers_autoencoder(tmp_path / "missing", (1, 28, 28))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(Exception, match="cannot load a diffusers AutoencoderKL"):
        load_diffusers_autoencoder(tmp_path / "broken", (1, 28, 28))
    real_import = builtins.__import__

    def no_diffusers(name: str, *args, **kwargs):  # noqa: ANN002, ANN003
        if name == "diffusers" or name.startswith("diffusers."):
            raise ImportError("No module named 'diffusers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    with pytest.raises(ConfigError, match="needs the diffusers package"):
        load_diffusers_autoencoder(tmp_path / "broken", (1, 28, 28))


def test_autoencoder_recipe_on_digits(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "ae"
    assert (
        main(
            [
                "run",
                "autoencoder",
                f"run_dir={run_dir}",
                "data.source=digits",
                "progress=false",
                "autoencoder.model.base_channels=8",
                "autoencoder.model.channel_mults=[1,2]",
                "autoencoder.train.steps=120",
                "autoencoder.train.eval_every=40",
                "autoencoder.train.lr=3e-3",
                "autoencoder.train.warmup_steps=10",
                "autoencoder.crop=8",  # as large as the 8 x 8 digits: whole images, and said so
            ]
        )
        == 0
    )
    assert "crop 8 is not smaller than the 8 x 8 images: training on whole images" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["compression"]["latent_shape"] == [4, 4, 4] and metrics["compression"]["spatial_factor"] == 2
    assert metrics["reconstruction"]["psnr"] > 15 and metrics["latents"]["std"] == pytest.approx(1.0, rel=1e-3)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    l1 = [r["value"] for r in records if r["tag"] == "autoencoder/val_l1"]
    assert l1[-1] < 0.8 * l1[0]  # measured 0.66 (the first check is after 40 steps)
    for name in ["report.md", "figures/reconstructions.png", "figures/loss.png", "checkpoints/autoencoder.json"]:
        assert (run_dir / name).is_file(), name
    info = json.loads((run_dir / "checkpoints" / "autoencoder.json").read_text())
    vae = load_autoencoder_run(run_dir)
    assert vae.scaling_factor == pytest.approx(info["scaling_factor"]) == pytest.approx(metrics["scaling_factor"])
    assert "perceptual" in (run_dir / "report.md").read_text()
    assert_rebuilds(run_dir)
