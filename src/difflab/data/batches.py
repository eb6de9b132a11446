"""Batches of in-memory tensors, as a pure function of the training step (see ``training/trainer``)."""

from __future__ import annotations

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
        index = self.indices(step).to(self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)
