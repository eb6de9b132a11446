"""Exponential moving average of model weights (Polyak averaging, as in Ho et al. 2020)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step.

    ``warmup`` (Tan & Le's bias fix as used in many diffusion codebases) lowers the decay early on:
    the effective decay is ``min(decay, (1 + step) / (10 + step))`` so the average does not sit at the
    random initialisation for the first thousands of steps. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        shadow_params = [p for p in self.shadow.parameters()]
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(shadow_params, params, 1.0 - decay)
        for shadow_buffer, buffer in zip(self.shadow.buffers(), model.buffers(), strict=True):
            shadow_buffer.copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        self.shadow.load_state_dict(state)
        self.num_updates = num_updates
