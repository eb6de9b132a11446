"""The U-Net: shapes (28 x 28 included), conditioning, memory formats, and that it learns."""

from __future__ import annotations

import pytest
import torch

from baselines import gaussian_eps
from difflab.data.images import load_digits_8x8
from difflab.diffusion.objectives import epsilon_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.models.unet import UNet, UNetConfig, count_parameters, describe


@pytest.mark.parametrize("size", [28, 32, 8, 13])
@pytest.mark.parametrize("conditioning", ["add", "film"])
def test_any_size_and_both_time_conditionings(size: int, conditioning: str) -> None:
    model = UNet(
        UNetConfig(base_channels=16, channel_mults=(1, 2, 2), time_conditioning=conditioning, attention_levels=(2,))
    )
    x = torch.randn(3, 1, size, size)
    out = model(x, torch.tensor([0, 500, 999]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # the output convolution starts at zero


def test_class_conditioning_and_null_label() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, num_classes=10))
    for module in model.modules():  # break the zero initialisation so the output is informative
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    x, t = torch.randn(4, 1, 28, 28), torch.full((4,), 10)
    null = model(x, t, torch.full((4,), 10))
    torch.testing.assert_close(model(x, t), null)  # no label = the null label
    assert not torch.allclose(model(x, t, torch.tensor([1, 2, 3, 4])), null)


def test_channels_last_gives_the_same_output() -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, num_res_blocks=2, attention_levels=(1,)))
    for module in model.modules():  # break the zero initialisation so the output is informative
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    expected = model(x, t)
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x, t), expected, rtol=1e-4, atol=1e-4)


def test_the_unet_learns_to_denoise_digits() -> None:
    torch.manual_seed(0)
    digits = load_digits_8x8()
    schedule = NoiseSchedule.cosine(100)
    model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), mid_attention=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(240):
        batch = digits.images[torch.randint(0, len(digits), (64,), generator=generator)]
        loss = epsilon_loss(model, schedule, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.6 * sum(losses[:5]) / 5

    # On the same images, timesteps and noise, it beats the best linear denoiser (the exact eps of a Gaussian with
    # the digits' mean and covariance, 0.219; eps = sqrt(1 - a) x_t, which ignores the data, 0.458; the U-Net
    # 0.201 after 120 steps, 0.175 after 240, measured 2026-12-06): it learned more than the data's two moments.
    def held_loss(eps_model) -> float:
        images = digits.images[:512].repeat(4, 1, 1, 1)
        with torch.no_grad():
            return float(epsilon_loss(eps_model, schedule, images, torch.Generator().manual_seed(123)))

    model.eval()
    assert held_loss(model) < 0.9 * held_loss(gaussian_eps(digits.images, schedule))


def test_bad_configs_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="norm_groups"):
        UNetConfig(base_channels=12, norm_groups=8)
    with pytest.raises(ConfigError, match="attention_levels"):
        UNetConfig(attention_levels=(5,))
    with pytest.raises(ConfigError, match="time_conditioning"):
        UNetConfig(time_conditioning="concat")
    # heads of 5 channels do not tile 32 (a reshape error deep in the forward pass before); 12 -> 2 heads of 16 do
    with pytest.raises(ConfigError, match="splits the 32 channels of attention level 1 into 6 heads unevenly"):
        UNetConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,), attention_head_channels=5)
    with pytest.raises(ConfigError, match="of attention level 2"):  # the middle block attends at the last level
        UNetConfig(base_channels=16, channel_mults=(1, 2, 3), mid_attention=True, attention_head_channels=9)
    model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), attention_levels=(1,), attention_head_channels=12))
    assert model(torch.randn(2, 1, 8, 8), torch.zeros(2)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="expects"):
        UNet(UNetConfig())(torch.randn(2, 3, 28, 28), torch.zeros(2))


def test_describe_and_count() -> None:
    config = UNetConfig(base_channels=32, channel_mults=(1, 2, 2))
    assert count_parameters(UNet(config)) > 500_000
    assert "28x28:32, 14x14:64, 7x7:64" in describe(config, 28)


def test_the_unet_config_is_fitted_to_the_data() -> None:
    from difflab.data.images import ImageSet
    from difflab.experiments.images import build_unet, fit_unet_to_data

    rgb = ImageSet(torch.zeros(8, 3, 16, 16), torch.arange(8) % 4, [f"c{k}" for k in range(4)])
    conditional, applied = fit_unet_to_data(UNetConfig(in_channels=1, out_channels=1, num_classes=10), rgb)
    assert (conditional.in_channels, conditional.out_channels, conditional.num_classes) == (3, 3, 4)
    assert applied == ["unet.in_channels=3", "unet.out_channels=3", "unet.num_classes=4"]
    assert build_unet(conditional, rgb)(rgb.images, torch.zeros(8, dtype=torch.long), rgb.labels).shape == (
        8,
        3,
        16,
        16,
    )
    unconditional, applied = fit_unet_to_data(UNetConfig(in_channels=3, out_channels=3, num_classes=0), rgb)
    assert unconditional.num_classes == 0 and applied == []  # an unconditional U-Net stays unconditional
    with pytest.raises(ConfigError, match="set unet.in_channels=3"):  # an unfitted config is still refused
        build_unet(UNetConfig(), rgb)
