"""STATES and the toy data sets, and the safe loader of a user's point file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.data.points import load_point_file, split_points
from difflab.data.states import STATE_BOXES, STATE_NAMES, build_states, load_states, shipped_states_path
from difflab.data.toy import make_toy
from difflab.errors import DataError
from difflab.metrics.points import KDE


def test_shipped_states_equal_a_fresh_build_from_the_census_outlines() -> None:
    for split, seed in (("train", 0), ("heldout", 1)):
        shipped = load_file(str(shipped_states_path(split)))
        fresh = build_states(seed)
        assert torch.equal(shipped["data"], fresh.data)
        assert torch.equal(shipped["labels"], fresh.labels)


def test_states_layout() -> None:
    train, heldout = load_states("train"), load_states("heldout")
    assert train.data.shape == (5000, 2) and train.data.dtype == torch.float32
    assert torch.bincount(train.labels).tolist() == [1000] * 5
    assert train.names == STATE_NAMES == ("Michigan", "Idaho", "Ohio", "Oklahoma", "Wisconsin")
    assert not torch.equal(train.data, heldout.data)
    # Standardised with fixed constants: the training set has mean 0 and std 1.
    torch.testing.assert_close(train.data.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.data.std(0), torch.ones(2), atol=1e-3, rtol=0)
    # Placed clockwise from the top: Ohio, Wisconsin, Oklahoma, Idaho, Michigan.
    centres = {name: train.data[train.labels == k].mean(0) for k, name in enumerate(STATE_NAMES)}
    assert centres["Ohio"][1] == max(c[1] for c in centres.values())
    assert centres["Michigan"][0] == min(c[0] for c in centres.values())
    assert centres["Wisconsin"][0] == max(c[0] for c in centres.values())


def test_raw_outlines_fill_their_boxes() -> None:
    raw = build_states(0, standardise=False)
    for k, name in enumerate(STATE_NAMES):
        points = raw.data[raw.labels == k]
        xmin, xmax, ymin, ymax = STATE_BOXES[name]
        # Arc-length samples plus jitter of std 0.015 reach the box edges within a few jitter widths.
        assert points[:, 0].min().item() == pytest.approx(xmin, abs=0.06)
        assert points[:, 0].max().item() == pytest.approx(xmax, abs=0.06)
        assert points[:, 1].min().item() == pytest.approx(ymin, abs=0.06)
        assert points[:, 1].max().item() == pytest.approx(ymax, abs=0.06)


def test_real_heldout_scores_match_the_reference_grading() -> None:
    """The reference's real data scores ~2.15 overall, Oklahoma ~2.45, the others ~2.0-2.15."""
    train, heldout = load_states("train"), load_states("heldout")
    kde = KDE(train.data)
    assert 2.10 < kde.nll(heldout.data) < 2.22
    scores = [kde.nll(heldout.data[heldout.labels == k]) for k in range(5)]
    assert 2.40 < scores[3] < 2.50
    assert all(2.0 < s < 2.16 for k, s in enumerate(scores) if k != 3)


def test_user_point_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "states.pt"
    torch.save({"data": torch.randn(50, 2), "labels": torch.arange(50) % 3}, path)
    cloud = load_point_file(path)
    assert cloud.data.shape == (50, 2) and cloud.num_classes == 3
    rest, part = split_points(cloud, 0.2, seed=0)
    assert len(part) == 10 and len(rest) == 40


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"data": torch.randn(5, 3), "labels": torch.zeros(5, dtype=torch.long)}, r"shape \(N, 2\)"),
        ({"data": torch.randn(5, 2)}, "must hold a dict"),
        ({"data": torch.randn(5, 2), "labels": torch.zeros(4, dtype=torch.long)}, "'labels' must be an int tensor"),
        ({"data": torch.randn(5, 2), "labels": torch.zeros(5)}, "must be integers"),
        ({"data": torch.full((5, 2), float("nan")), "labels": torch.zeros(5, dtype=torch.long)}, "NaN"),
        ([1, 2, 3], "must hold a dict"),
        (
            {"data": torch.randn(4, 2), "labels": torch.tensor([1_000_000, 1_000_001, 1_000_000, 1_000_001])},
            r"found 2 distinct labels \(1000000, 1000001\) up to 1000001: renumber them 0 to 1",
        ),
        ({"data": torch.randn(3, 2), "labels": torch.tensor([0, 2, 2])}, "must number the classes 0 to K-1"),
    ],
)
def test_bad_point_files(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(DataError, match=message):
        load_point_file(path)


def test_unreadable_and_unsafe_point_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_point_file(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(DataError, match="cannot read .*, or is damaged$"):
        load_point_file(garbage)

    class Sneaky:
        def __reduce__(self):
            return (print, ("this must never run",))

    pickled = tmp_path / "pickled.pt"
    torch.save({"data": Sneaky(), "labels": torch.zeros(2)}, pickled)
    # weights_only=True refuses arbitrary objects; the message does not pass on torch's advice to load it unsafely
    with pytest.raises(DataError, match="it holds something other than tensors, or is damaged$"):
        load_point_file(pickled)


@pytest.mark.parametrize("name", ["swissroll", "spiral", "moons"])
def test_toy_sets_are_standardised_and_seeded(name: str) -> None:
    a, b = make_toy(name, 2000, 0.05, seed=0), make_toy(name, 2000, 0.05, seed=0)
    assert torch.equal(a.data, b.data)
    torch.testing.assert_close(a.data.mean(0), torch.zeros(2), atol=1e-4, rtol=0)
    heldout = make_toy(name, 2000, 0.05, seed=1)
    assert not torch.equal(a.data, heldout.data)
    assert heldout.data.mean(0).abs().max() < 0.1


def test_likelihood_bin_widths_are_the_spacing_of_each_sources_levels() -> None:
    """Dequantisation adds uniform noise of one bin's width: it must be the step between the data's levels (MNIST's
    and image folders' 2 / 255, the 8 x 8 digits' 2 / 16), so the boxes tile [-1, 1] and the Jacobian is exact."""
    from difflab.data.images import load_digits_8x8
    from difflab.data.mnist import load_mnist
    from difflab.experiments.mnist import BIN_WIDTHS

    for source, images in (("mnist", load_mnist("val").images), ("digits", load_digits_8x8().images)):
        levels = torch.unique(images.double())
        steps = levels[1:] - levels[:-1]
        assert float(levels[0]) == -1.0 and float(levels[-1]) == 1.0
        # float32 images: the steps agree to rounding
        assert float(steps.min()) == pytest.approx(BIN_WIDTHS[source], rel=1e-4)
        assert float(steps.max()) == pytest.approx(BIN_WIDTHS[source], rel=1e-4)
