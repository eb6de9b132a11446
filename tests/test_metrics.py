"""The point-cloud metrics against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from difflab.data.states import load_states
from difflab.errors import DataError
from difflab.metrics.points import (
    KDE,
    label_histogram,
    nearest_distances,
    nearest_label_fraction,
    nll_course,
    nll_reverse,
    reach,
)


def test_nll_course_is_the_reference_grading() -> None:
    train = load_states("train")
    samples = torch.randn(300, 2)
    expected = -gaussian_kde(train.data.double().numpy().T).logpdf(samples.double().numpy().T).mean()
    assert nll_course(samples, train.data) == pytest.approx(expected, rel=1e-12)


def test_kde_of_a_gaussian_approaches_its_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    reference, points = torch.randn(20_000, 2, generator=generator), torch.randn(5000, 2, generator=generator)
    entropy = np.log(2 * np.pi * np.e)  # of N(0, I_2), in nats
    assert KDE(reference).nll(points) == pytest.approx(entropy, abs=0.05)


def test_reverse_nll_punishes_dropped_modes() -> None:
    train, heldout = load_states("train"), load_states("heldout")
    all_states = train.data
    four_states = train.data[train.labels != 3]
    # The one-sided score barely notices a missing state; the reverse score does.
    assert nll_course(four_states, train.data) < nll_course(all_states, train.data) + 0.05
    assert nll_reverse(four_states, heldout.data) > nll_reverse(all_states, heldout.data) + 1.0


def test_nearest_labels() -> None:
    train = load_states("train")
    heldout = load_states("heldout")
    for k in range(5):
        assert nearest_label_fraction(heldout.data[heldout.labels == k], k, train.data, train.labels) > 0.999
    shares = label_histogram(heldout.data, train.data, train.labels, 5)
    assert shares == pytest.approx([0.2] * 5, abs=0.002)


def test_samples_thrown_off_the_data_are_not_on_the_intended_outline() -> None:
    # A huge guidance scale throws samples far out along the gradient, where the nearest training point can still
    # be of the intended class: they must not count as on its outline.
    train, heldout = load_states("train"), load_states("heldout")
    ohio = heldout.data[heldout.labels == 2]
    centre = train.data.mean(0)
    thrown = centre + (ohio - centre) * 1e6
    assert nearest_label_fraction(thrown, 2, train.data, train.labels) > 0.5  # by the nearest point alone
    limit = reach(train.data)
    extent = train.data.amax(0) - train.data.amin(0)
    assert limit == pytest.approx(0.1 * float(torch.sqrt((extent**2).sum())))
    assert nearest_label_fraction(thrown, 2, train.data, train.labels, max_distance=limit) == 0.0
    # Real held-out points all lie within reach (they are at most 0.05 from a training point; reach is 0.51).
    assert float(nearest_distances(heldout.data, train.data).max()) < limit / 5
    assert nearest_label_fraction(ohio, 2, train.data, train.labels, max_distance=limit) > 0.999
    # Distances are the brute-force ones, chunk boundaries included.
    points = torch.randn(10, 2)
    exact = (points[:, None, :] - train.data[None, :, :]).norm(dim=-1).amin(1)
    assert torch.allclose(nearest_distances(points, train.data, chunk=3), exact, atol=1e-5)


def test_nan_samples_are_reported() -> None:
    with pytest.raises(DataError, match="NaN or infinite"):
        nll_course(torch.tensor([[0.0, float("nan")]] * 10), load_states("train").data)


def test_psnr_of_the_pooled_mse_and_per_image() -> None:
    """Two images whose [0, 1] errors are 0.1 and 0.01 everywhere: MSEs 1e-2 and 1e-4, so 20 and 40 dB each (mean
    30 dB), and 10 log10(1 / 5.05e-3) = 22.97 dB of the pooled MSE."""
    from difflab.metrics.image_quality import psnr, psnr_per_image

    target = torch.zeros(2, 1, 8, 8)  # 0.5 in [0, 1]
    prediction = target + torch.tensor([0.2, 0.02]).reshape(2, 1, 1, 1)  # errors 0.1 and 0.01 in [0, 1] units
    assert psnr_per_image(prediction, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert psnr(prediction, target) == pytest.approx(10 * np.log10(1 / 5.05e-3), abs=1e-4)


def test_ssim_per_image_is_each_images_ssim() -> None:
    """Per-image SSIM in one batched call: each entry is the SSIM of that image alone, their mean the batch's; an
    exact copy scores 1 and a constant shift of a textured image, which keeps its structure, scores higher than the
    same image under noise."""
    from difflab.metrics.image_quality import ssim, ssim_per_image

    generator = torch.Generator().manual_seed(0)
    target = torch.rand(3, 1, 32, 32, generator=generator) * 1.6 - 0.8
    prediction = torch.stack(
        [target[0], target[1] + 0.1, target[2] + 0.5 * torch.randn(1, 32, 32, generator=generator)]
    )
    values = ssim_per_image(prediction, target)
    assert values.shape == (3,) and float(values[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(values[1]) > float(values[2])
    for i in range(3):
        assert float(values[i]) == pytest.approx(ssim(prediction[i : i + 1], target[i : i + 1]), abs=1e-6)
    assert float(values.mean()) == pytest.approx(ssim(prediction, target), abs=1e-6)
