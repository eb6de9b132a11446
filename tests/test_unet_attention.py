"""The U-Net's attention: self-attention at any level and cross-attention to a context (the label tokens), each
against the attention formula written out, the plain U-Net unchanged, and labels through cross-attention learned."""

from __future__ import annotations

import pytest
import torch

from difflab.data.images import load_digits_8x8
from difflab.diffusion.objectives import epsilon_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.models.unet import CrossAttention, SelfAttention, UNet, UNetConfig, describe


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Break the zero initialisation of the output projections so every path shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) tensors."""
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def test_self_attention_is_the_attention_formula() -> None:
    block = SelfAttention(16, groups=4, head_channels=8)  # 2 heads
    _randomise(block)
    x = torch.randn(2, 16, 5, 3)
    qkv = block.qkv(block.norm(x)).reshape(2, 3, 2, 8, 15)
    q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
    expected = x + block.out(_attention(q, k, v).transpose(-1, -2).reshape(2, 16, 5, 3))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_is_the_attention_formula_over_the_context() -> None:
    block = CrossAttention(16, context_dim=12, groups=4, head_channels=8)
    _randomise(block)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 12)
    q = block.query(block.norm(x)).reshape(2, 2, 8, 16).transpose(-1, -2)
    k, v = block.key_value(block.context_norm(context)).reshape(2, 3, 2, 2, 8).permute(2, 0, 3, 1, 4)
    expected = x + block.out(_attention(q, k, v).transpose(-1, -2).reshape(2, 16, 4, 4))
    torch.testing.assert_close(block(x, context), expected, rtol=1e-5, atol=1e-5)
    # Permuting the context tokens changes nothing (attention is a set operation over the context).
    torch.testing.assert_close(block(x, context.flip(1)), block(x, context), rtol=1e-5, atol=1e-5)


def test_plain_unet_is_unchanged_by_the_new_options() -> None:
    """No cross-attention option set: no new parameters, and the state dict keys are those of the plain U-Net."""
    config = UNetConfig(base_channels=16, num_classes=10, attention_levels=(2,))
    keys = set(UNet(config).state_dict())
    assert not any("cross" in key or "class_context" in key for key in keys)
    assert "class_embedding.weight" in keys


@pytest.mark.parametrize("size", [28, 7, 8])
def test_attention_at_every_level_and_cross_attention_any_size(size: int) -> None:
    config = UNetConfig(
        in_channels=4,
        out_channels=8,
        base_channels=16,
        channel_mults=(1, 2),
        attention_levels=(0, 1),
        cross_attention_levels=(0, 1),
        mid_cross_attention=True,
        num_classes=10,
        context_tokens=3,
        class_conditioning="cross",
    )
    model = UNet(config)
    _randomise(model)
    x, t = torch.randn(3, 4, size, size), torch.tensor([0, 10, 999])
    out = model(x, t, torch.tensor([1, 2, 10]))
    assert out.shape == (3, 8, size, size)
    assert "self-attention at" in describe(config, size) and "cross-attention at" in describe(config, size)


def test_labels_enter_through_the_context_and_an_explicit_context_works() -> None:
    torch.manual_seed(0)
    config = UNetConfig(
        base_channels=16,
        channel_mults=(1, 2),
        cross_attention_levels=(1,),
        num_classes=10,
        context_tokens=2,
        class_conditioning="cross",
    )
    model = UNet(config)
    _randomise(model)
    assert model.class_embedding is None  # "cross": the label is not added to the time embedding
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 30)
    null = model(x, t, torch.full((4,), 10))
    torch.testing.assert_close(model(x, t), null)  # no label = the null label's tokens
    assert not torch.allclose(model(x, t, torch.tensor([1, 2, 3, 4])), null)
    context = model.label_context(torch.tensor([1, 2, 3, 4]), 4, x.device)
    assert context.shape == (4, 2, 64)
    torch.testing.assert_close(model(x, t, context=context), model(x, t, torch.tensor([1, 2, 3, 4])))
    free = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), mid_cross_attention=True, context_dim=5))
    with pytest.raises(ValueError, match="pass context"):
        free(x, t)
    assert free(x, t, context=torch.randn(4, 7, 5)).shape == x.shape


def test_bad_cross_attention_configs() -> None:
    with pytest.raises(ConfigError, match="needs cross-attention"):
        UNetConfig(num_classes=10, class_conditioning="cross")
    with pytest.raises(ConfigError, match="num_classes"):
        UNetConfig(cross_attention_levels=(0,), class_conditioning="both")
    with pytest.raises(ConfigError, match="cross_attention_levels"):
        UNetConfig(cross_attention_levels=(3,))
    with pytest.raises(ConfigError, match="class_conditioning"):
        UNetConfig(class_conditioning="concat")


def test_a_cross_attention_only_unet_learns_to_use_the_label() -> None:
    """Trained with label dropout, the eps error with the true labels ends below the error with the null label:
    the class information reached the network through cross-attention alone."""
    torch.manual_seed(0)
    digits = load_digits_8x8()
    schedule = NoiseSchedule.cosine(100)
    model = UNet(
        UNetConfig(
            base_channels=8,
            channel_mults=(1, 2),
            mid_attention=False,
            num_classes=10,
            cross_attention_levels=(0, 1),
            context_tokens=2,
            class_conditioning="cross",
            attention_head_channels=8,
        )
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(120):
        index = torch.randint(0, len(digits), (64,), generator=generator)
        loss = epsilon_loss(model, schedule, digits.images[index], generator, digits.labels[index], 0.2, 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x0, labels = digits.images[:512], digits.labels[:512]
    t = torch.full((512,), 60)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = schedule.q_sample(x0, t, noise)
    with torch.no_grad():
        conditional = torch.nn.functional.mse_loss(model(x_t, t, labels), noise)
        unconditional = torch.nn.functional.mse_loss(model(x_t, t), noise)
    assert conditional < 0.95 * unconditional  # measured 0.88
