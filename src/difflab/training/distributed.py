"""Data-parallel runs over several processes: joining torchrun's process group, sharding a global batch,
running a piece of work on rank 0 only, and sampling sharded across ranks.

``torchrun --nproc_per_node=N -m difflab train CONFIG`` starts N copies of the command with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` in the environment; :func:`init_from_env` joins
the group with NCCL when the device is a GPU (rank r of a node uses ``cuda:LOCAL_RANK``) and gloo on CPU.

Sharding. A step's global batch is a pure function of ``(seed, step)`` (``data/batches.py``): every rank
computes the same global batch and keeps rows ``[r B / W, (r + 1) B / W)``. Over an epoch that is what a
``DistributedSampler`` with per-epoch shuffling gives (each rank sees a disjoint ``1/W`` of every batch of
the epoch's permutation), with one more property: the union of the shards is exactly the single-process
batch, so the number of processes never changes which examples a step trains on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from difflab import errors
from difflab.errors import ConfigError, DifflabError, first_line
from difflab.seeding import mix_seed

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a data-parallel run (``world_size`` 1 when it runs alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, figures and reports."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def current() -> DistContext:
    """The context of this process: from the initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(device: torch.device) -> tuple[torch.device, DistContext]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns this rank's device.

    NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``, whatever index ``device`` names), gloo otherwise.
    A single process (no ``WORLD_SIZE``, or 1) returns ``device`` unchanged.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return device, current()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run a single process")
    local_rank = _env_int("LOCAL_RANK", 0)
    backend = "gloo"
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs: "
                "use --nproc_per_node <= the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the torchrun process group ({backend}): {first_line(exc)}") from None
    return device, current()


def shutdown(succeeded: bool = True) -> None:
    """Leave the process group (if this process joined one).

    After a run that succeeded on this rank the ranks first meet at a barrier: a rank that tears its gloo
    group down while rank 0 is still writing the report aborted the process at exit now and then
    ("terminate called without an active exception"). After a failure there is no barrier (the other
    ranks may never arrive).
    """
    if dist.is_available() and dist.is_initialized():
        if succeeded and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier(context: DistContext | None = None) -> None:
    if (context or current()).enabled:
        dist.barrier()


def collective_device() -> torch.device:
    """The device collectives run on: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor, context: DistContext | None = None) -> torch.Tensor:
    """The sum of ``value`` over ranks (``value`` itself on one process): any shape -> the same shape, float64
    when summed over several processes."""
    if not (context or current()).enabled:
        return value
    reduced = value.detach().to(collective_device(), torch.float64).clone()
    dist.all_reduce(reduced)
    return reduced.to(value.device)


def agree(value: int, context: DistContext | None = None) -> bool:
    """Whether every rank holds the same integer ``value`` (always true on one process)."""
    if not (context or current()).enabled:
        return True
    extremes = torch.tensor([value, -value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    return int(extremes[0]) == -int(extremes[1])


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world_size`` takes (sizes differ by at most one)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def shard_seed(seed: int, shard: int) -> int:
    """The seed of shard ``shard`` of some sampling: shard 0 keeps ``seed`` (a single process is unchanged)."""
    return seed if shard == 0 else mix_seed(seed, shard, 97)


def on_main(work: Callable[[], T], context: DistContext | None = None) -> T | None:
    """Run ``work`` on rank 0 alone (others get ``None``) and keep the ranks together.

    A :class:`DifflabError` raised on rank 0 is raised on every rank (same type and message), so a full
    disk or a refused run folder stops the whole job cleanly instead of leaving ranks waiting.
    """
    context = context or current()
    if not context.enabled:
        return work()
    outcome: list[Any] = [None]
    result: T | None = None
    failure: BaseException | None = None
    if context.is_main:
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - reported to the other ranks, then re-raised
            failure = exc
            name = type(exc).__name__ if isinstance(exc, DifflabError) else "DifflabError"
            message = str(exc) if isinstance(exc, DifflabError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
            outcome = [(name, message.splitlines()[0] if message else name)]
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        name, message = outcome[0]
        error_class = getattr(errors, name, DifflabError)
        raise error_class(message)
    return result


def gather_objects(value: T, context: DistContext | None = None) -> list[T]:
    """Every rank's ``value`` (picklable; tensors on the CPU), in rank order, on every rank; ``[value]`` alone."""
    context = context or current()
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def from_main(value: T, context: DistContext | None = None) -> T:
    """Rank 0's ``value`` on every rank (a decision only rank 0 could make, e.g. from scores it alone computed)."""
    context = context or current()
    if not context.enabled:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sample_sharded(
    draw: Callable[[int, int], torch.Tensor], n: int, context: DistContext | None = None
) -> torch.Tensor:
    """``n`` samples drawn in shards over the ranks and gathered on every rank.

    ``draw(shard, count)`` returns ``(count, ...)`` samples of shard ``shard`` (seed it with
    :func:`shard_seed` so shard 0 of a single process is the unsharded draw); rank r draws shard r of
    :func:`shard_range`, and the result is ``(n, ...)`` in shard order on the device ``draw`` returned.
    """
    context = context or current()
    if not context.enabled:
        return draw(0, n)
    world = context.world_size
    if n < world:
        raise ConfigError(f"cannot shard {n} samples over {world} processes: ask for at least {world}")
    start, stop = shard_range(n, context.rank, world)
    local = draw(context.rank, stop - start)
    if local.shape[0] != stop - start:
        raise ValueError(f"draw returned {local.shape[0]} samples for a shard of {stop - start}")
    largest = -(-n // world)
    device = collective_device()
    padded = torch.zeros((largest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.detach().to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    sizes = [shard_range(n, r, world) for r in range(world)]
    gathered = torch.cat([piece[: hi - lo] for piece, (lo, hi) in zip(pieces, sizes, strict=True)])
    return gathered.to(local.device)
