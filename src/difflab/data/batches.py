"""Batches of in-memory tensors, as a pure function of the training step (see ``training/trainer``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.errors import ConfigError
from difflab.seeding import mix_seed


class ShuffledBatches:
    """Epochs of seeded random permutations over tensors sharing their first dimension.

    ``batch(step)`` returns the tuple of tensors indexed by batch ``step``: epoch ``e`` uses the
    permutation drawn from ``(seed, e)``, and the last incomplete batch of an epoch is dropped. When
    ``batch_size`` exceeds the data size, indices are drawn with replacement instead.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, seed: int = 0) -> None:
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ConfigError("ShuffledBatches needs tensors with the same first dimension")
        self.tensors = tensors
        self.size = tensors[0].shape[0]
        if self.size == 0:
            raise ConfigError("cannot train on an empty data set")
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = max(self.size // batch_size, 1)
        self._epoch = -1
        self._permutation: torch.Tensor | None = None

    def indices(self, step: int) -> torch.Tensor:
        """The rows of batch ``step``: (batch_size,) int64 indices into the tensors' first dimension, on the CPU."""
        if self.batch_size > self.size:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, step, 7))
            return torch.randint(0, self.size, (self.batch_size,), generator=generator)
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 3))
            self._permutation = torch.randperm(self.size, generator=generator)
            self._epoch = epoch
        assert self._permutation is not None
        return self._permutation[position * self.batch_size : (position + 1) * self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """Batch ``step`` of every tensor (N, ...): a tuple of (batch_size, ...) tensors, on their device."""
        index = self.indices(step).to(self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)

    def sketch(self) -> DataSketch:
        """:func:`data_sketch` of the tensors batched (what a resumed training run must be given again)."""
        return data_sketch(self.tensors)


SKETCH_BLOCKS = 1024
SKETCH_DIRECTIONS = 4
SKETCH_TOLERANCE = 1e-5


@dataclass(frozen=True)
class DataSketch:
    """A small summary of a training set that tells "the same data" from "other data" up to rounding.

    ``rows``: N; ``values``: (min(N, blocks), directions x number of tensors), float64 (see :func:`data_sketch`).
    """

    rows: int
    values: torch.Tensor

    def difference(self, current: DataSketch, tolerance: float = SKETCH_TOLERANCE) -> str:
        """How ``current`` differs from this sketch ("" when it describes the same data): another number of
        rows, or an entry off by more than ``tolerance`` x the rms of its column."""
        if self.rows != current.rows:
            return f"{self.rows:,} rows then, {current.rows:,} now"
        if self.values.shape != current.values.shape:
            return f"a sketch of shape {tuple(self.values.shape)} then, {tuple(current.values.shape)} now"
        scale = self.values.pow(2).mean(dim=0).sqrt().clamp_min(1e-12)
        off = ((self.values - current.values).abs() > tolerance * scale).any(dim=1)
        if bool(off.any()):
            return f"the same {self.rows:,} rows, but {int(off.sum())} of {len(off)} blocks of them changed"
        return ""


def data_sketch(
    tensors: tuple[torch.Tensor, ...], blocks: int = SKETCH_BLOCKS, directions: int = SKETCH_DIRECTIONS
) -> DataSketch:
    """The :class:`DataSketch` of tensors (each (N, ...), sharing N).

    Row i of tensor j, flattened to D_j values, is projected on ``directions`` seeded Gaussian directions
    scaled by 1/sqrt(D_j) (a random projection, so it moves by about the rms of a change), and the
    projections are summed over ``min(N, blocks)`` contiguous blocks of rows. A changed, added or removed row
    moves entries far beyond the ~1e-7 relative noise of computing the same data with another thread count;
    swapping rows inside one block is not seen.
    """
    size = tensors[0].shape[0]
    count = max(1, min(size, blocks))
    block_of_row = torch.arange(size) * count // max(size, 1)
    columns = []
    for position, tensor in enumerate(tensors):
        flat = tensor.reshape(size, -1)
        width = flat.shape[1]
        generator = torch.Generator().manual_seed(mix_seed(0, position, 57))
        projection = torch.randn(width, directions, generator=generator, dtype=torch.float64) / max(width, 1) ** 0.5
        sums = torch.zeros(count, directions, dtype=torch.float64)
        for start in range(0, size, 4096):  # chunks keep the float64 copy small
            rows = flat[start : start + 4096].detach().to("cpu", torch.float64)
            sums.index_add_(0, block_of_row[start : start + 4096], rows @ projection)
        columns.append(sums)
    return DataSketch(size, torch.cat(columns, dim=1))
