"""Denoising trajectories: ``x_t`` and the predicted ``x_0`` of a few samples at a few timesteps.

A sampler's ``callback(step_index, t, x_t, x0_pred)`` (see :mod:`difflab.sampling.common`) feeds a
:class:`TrajectoryRecorder`, which keeps the first ``max_items`` samples at the chosen timesteps. The file
(``samples/trajectory.safetensors`` in a run folder) holds

    x_t        (K, B, ...) float32   the sampler's input at each kept step (points: (K, B, D); images: (K, B, C, H, W))
    x0_pred    (K, B, ...) float32   the model's estimate of x_0 at that step
    timesteps  (K,) int64            the 0-based timestep index t of each frame, decreasing (the last is 0)

with string metadata ``format = difflab-trajectory``, ``version``, ``kind`` (``points`` or ``images``) and
any extras the caller gives (``sampler``, ...). The format does not depend on what is sampled, so a
viewer draws points as scatters and images as grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from difflab.errors import DataError

FORMAT = "difflab-trajectory"
VERSION = "1"


def choose_frames(visited: Sequence[int], frames: int) -> list[int]:
    """``frames`` of the timesteps a sampler visits, evenly spread, always the first and the last.

    visited: the decreasing timestep indices of the sampler (e.g. ``T-1 .. 0`` for DDPM).
    """
    visited = list(visited)
    if frames <= 0 or not visited:
        return []
    if frames >= len(visited):
        return visited
    if frames == 1:
        return [visited[-1]]
    positions = torch.linspace(0, len(visited) - 1, frames, dtype=torch.float64).round().long().tolist()
    return [visited[p] for p in sorted(set(positions))]


@dataclass
class Trajectory:
    """Frames of one sampling run: timesteps (K,), x_t and x0_pred (K, B, ...)."""

    timesteps: torch.Tensor
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.timesteps.dim() != 1 or self.x_t.shape != self.x0_pred.shape or self.x_t.dim() < 3:
            raise DataError(
                "a trajectory needs timesteps (K,) and x_t, x0_pred of one shape (K, B, ...), got "
                f"{tuple(self.timesteps.shape)}, {tuple(self.x_t.shape)}, {tuple(self.x0_pred.shape)}"
            )
        if self.x_t.shape[0] != self.timesteps.shape[0]:
            raise DataError(f"a trajectory has {len(self.timesteps)} timesteps but {self.x_t.shape[0]} frames")

    @property
    def num_frames(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def kind(self) -> str:
        """``points`` for (K, B, D), ``images`` for (K, B, C, H, W)."""
        return self.metadata.get("kind") or ("images" if self.x_t.dim() == 5 else "points")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {**self.metadata, "format": FORMAT, "version": VERSION, "kind": self.kind}
        tensors = {
            "timesteps": self.timesteps.to(torch.int64).contiguous(),
            "x_t": self.x_t.to(torch.float32).contiguous(),
            "x0_pred": self.x0_pred.to(torch.float32).contiguous(),
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory file, with one-line errors for a missing or malformed one."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"trajectory file {path} does not exist")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"trajectory file {path} is not a readable safetensors file ({exc})") from None
        if metadata.get("format") != FORMAT or not {"timesteps", "x_t", "x0_pred"} <= set(tensors):
            raise DataError(f"{path} is not a difflab trajectory file")
        return cls(tensors["timesteps"], tensors["x_t"], tensors["x0_pred"], metadata)


class TrajectoryRecorder:
    """A sampler callback keeping the first ``max_items`` samples at the timesteps in ``keep``.

    Pass it as ``callback=`` to :func:`~difflab.sampling.ddpm.ddpm_sample` or
    :func:`~difflab.sampling.ddim.ddim_sample`; then :meth:`trajectory` returns the frames in the order
    the sampler visited them (decreasing t).
    """

    def __init__(self, keep: Sequence[int], max_items: int, metadata: dict[str, str] | None = None) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.keep = set(int(t) for t in keep)
        self.max_items = max_items
        self.metadata = dict(metadata or {})
        self._frames: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def __call__(self, step_index: int, t: int, x_t: torch.Tensor, x0_pred: torch.Tensor) -> None:
        if int(t) in self.keep:
            items = slice(0, self.max_items)
            self._frames.append(
                (int(t), x_t[items].detach().float().cpu().clone(), x0_pred[items].detach().float().cpu().clone())
            )

    def __len__(self) -> int:
        return len(self._frames)

    def trajectory(self) -> Trajectory:
        if not self._frames:
            raise ValueError("the recorder saw none of its timesteps; was it passed to the sampler?")
        return Trajectory(
            torch.tensor([t for t, _, _ in self._frames], dtype=torch.int64),
            torch.stack([x for _, x, _ in self._frames]),
            torch.stack([x0 for _, _, x0 in self._frames]),
            self.metadata,
        )
