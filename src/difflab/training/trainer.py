"""A small, resumable training loop (AdamW, warmup + cosine LR, gradient clipping, EMA).

Determinism: the batch for step ``s`` and the random numbers its loss draws come from generators
seeded by ``(seed, s)``, so the data order and noise never depend on how often a run was stopped
and resumed. A resumed run therefore ends with the same weights as an uninterrupted one (on CPU).

Scaling out: under ``torchrun`` (an initialised process group) the model is wrapped in
``DistributedDataParallel``; every rank computes the step's global batch of ``batch_size`` rows and
trains on its ``1/world_size`` slice (``training/distributed.py``), ``grad_accum`` splits that slice into
micro-batches whose losses are scaled by ``1/grad_accum``, and per-example randomness is drawn for the
whole batch and sliced (``seeding.RowGenerator``), so a step computes the same gradient, up to float
rounding, for any number of processes and micro-batches. ``precision`` picks fp32, bf16 autocast or fp16
autocast with a gradient scaler (CUDA only); ``compile`` wraps the network in ``torch.compile``.
Rank 0 alone logs, validates, runs hooks and writes checkpoints and exported weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from difflab.data.batches import DataSketch
from difflab.errors import CheckpointError, ConfigError, TrainingDiverged, first_line
from difflab.progress import progress_bar
from difflab.seeding import RowGenerator, mix_seed
from difflab.training import checkpoint as ckpt
from difflab.training import distributed
from difflab.training.ema import EMA
from difflab.training.logging import RunLogger, read_all_series, read_series
from difflab.training.precision import PRECISIONS, autocast, check_precision, cpu_has_native_bf16, resolve_precision

LR_SCHEDULES = ("constant", "cosine")
NAN_POLICIES = ("stop", "skip")
# Settings a resumed run may change: bookkeeping, and how a step is executed (not what it computes).
RESUMABLE_CHANGES = (
    "steps",
    "eval_every",
    "log_every",
    "checkpoint_every",
    "keep_last",
    "nan_policy",
    "max_skipped_steps",
    "ema_decay",
    "precision",
    "grad_accum",
    "compile",
    "deterministic",
)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one network.

    ``batch_size`` is the global batch of a step: with N processes each trains on ``batch_size / N`` rows,
    in ``grad_accum`` micro-batches. ``precision``: ``fp32``, ``bf16`` (autocast, CPU or GPU), ``fp16``
    (autocast + gradient scaler, GPU only) or ``auto`` (bf16 where the CPU or GPU runs it natively, else fp32).
    ``compile``: ``torch.compile`` the network. ``deterministic``: ``torch.use_deterministic_algorithms(True)``
    while training (bit-exact resume on GPUs too).
    Checkpoints every ``checkpoint_every`` steps, the newest ``keep_last`` kept.
    """

    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    lr_schedule: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    eval_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 1000
    keep_last: int = 2
    nan_policy: str = "stop"
    max_skipped_steps: int = 10
    precision: str = "fp32"
    grad_accum: int = 1
    compile: bool = False
    deterministic: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (
                len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}",
            ),
            (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (self.grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)"),
            (0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1) (0 disables EMA), got {self.ema_decay}"),
            (
                self.eval_every >= 1 and self.log_every >= 1 and self.checkpoint_every >= 1,
                "eval_every, log_every and checkpoint_every must be >= 1",
            ),
            (self.keep_last >= 1, "keep_last must be >= 1"),
            (self.nan_policy in NAN_POLICIES, f"nan_policy must be one of {', '.join(NAN_POLICIES)}"),
            (self.max_skipped_steps >= 0, "max_skipped_steps must be >= 0"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (
                self.grad_accum < 1 or self.batch_size % self.grad_accum == 0,
                f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr`` over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio * lr``."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.lr_schedule == "constant":
            return self.lr * warm
        progress = min(step, self.steps) / self.steps
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.lr * warm * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


class BatchSource(Protocol):
    """Gives the batch of a step as a pure function of the step (so resuming never changes the order).

    A source may also have ``sketch() -> DataSketch`` (:class:`~difflab.data.batches.ShuffledBatches` has):
    its checkpoints then record the data, and resuming on other data is refused.
    """

    def batch(self, step: int) -> Any: ...


LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]
ValidateFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.fit` did.

    ``seconds``: the training time of all ``step`` steps, summed over every process that trained them (each
    checkpoint records it, so a resumed run adds its time to that of the steps it kept; the time of steps lost to
    a kill is not counted); ``session_seconds``: the wall time of this call.
    """

    name: str
    step: int
    resumed_from: int
    seconds: float
    final_train_loss: float | None
    final_validation: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0
    world_size: int = 1
    session_seconds: float = 0.0

    def images_per_second(self, batch_size: int) -> float | None:
        """Training throughput over all ``step`` steps of ``batch_size`` images, or None before any step."""
        return round(self.step * batch_size / self.seconds, 1) if self.step and self.seconds > 0 else None


@dataclass
class _LogWindow:
    """The training-loss record since the last logged step, and the skipped steps: saved in every
    checkpoint so that a resumed run logs the same numbers as one that was never stopped."""

    loss_sum: float = 0.0
    loss_count: int = 0
    skipped: int = 0
    consecutive_skips: int = 0


def _compile(module: nn.Module) -> nn.Module:
    """``torch.compile`` (inductor: C++ on CPU, Triton on GPU); a seam for tests."""
    return torch.compile(module)  # type: ignore[return-value]


def _is_compile_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from torch.compile's machinery (dynamo tracing or an inductor backend)."""
    return any(cls.__module__.startswith(("torch._dynamo", "torch._inductor")) for cls in type(exc).__mro__)


def _batch_rows(batch: Any) -> int | None:
    """The number of rows (first dimension) of a batch: a tensor, or a tuple/list/dict holding tensors."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        rows = _batch_rows(value)
        if rows is not None:
            return rows
    return None


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of every tensor in ``batch`` (other values are kept as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() else batch
    if isinstance(batch, dict):
        return {k: _slice_batch(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice_batch(v, start, stop) for v in batch)
    return batch


class Trainer:
    """Trains ``model`` on ``loss_fn(model, batches.batch(step), generator)`` for ``config.steps`` steps.

    ``hooks`` are called as ``hook(trainer)`` after every completed step (after its checkpoint, if any), e.g.
    to draw a progress figure every epoch from ``trainer.eval_model``; on rank 0 only in a data-parallel run.

    Writes ``<name>/train_loss``, ``<name>/lr`` and ``<name>/val_*`` scalars through ``logger``, training
    state checkpoints under ``run_dir/checkpoints/<name>/`` and, at the end, the weights to use
    (EMA when enabled) as ``run_dir/checkpoints/<name>.safetensors`` + ``.json``. An existing training
    state in the run folder is resumed automatically (the signature of the model must match).

    ``loss_fn`` must return the mean loss of the rows it is given (the trainer averages micro-batches and
    ranks); it should draw per-example randomness with ``seeding.batch_randn`` / ``batch_randint`` so that a
    step is the same for any number of processes and micro-batches (the objectives in
    ``diffusion/objectives.py`` do). ``distributed`` defaults to the process group this process is in.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        loss_fn: LossFn,
        batches: BatchSource,
        config: TrainConfig,
        run_dir: Path,
        logger: RunLogger,
        *,
        validate: ValidateFn | None = None,
        signature: dict[str, Any] | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        show_progress: bool = True,
        echo: Callable[[str], None] = print,
        hooks: list[Callable[[Trainer], None]] | None = None,
        distributed_context: distributed.DistContext | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        self.config = config
        self.run_dir = Path(run_dir)
        self.logger = logger
        self.validate = validate
        self.signature = signature or {"model": type(model).__name__}
        self.seed = seed
        self.device = torch.device(device)
        self.show_progress = show_progress
        self.echo = echo
        self.hooks = list(hooks or [])
        self.dist = distributed_context or distributed.current()
        self._check_execution_settings()
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas)
        )
        self.ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.state_dir = self.run_dir / "checkpoints" / name
        self.weights_path = self.run_dir / "checkpoints" / f"{name}.safetensors"
        self.step = 0
        self.last_checkpoint: tuple[int, Path] | None = None
        self._ddp: nn.Module | None = None
        self._sketch: DataSketch | None = None
        self._window = _LogWindow()
        # the training seconds of the steps before this call (from the checkpoint resumed) and the start of this
        # call's training loop: together the time a checkpoint records
        self._seconds_before = 0.0
        self._loop_start: float | None = None
        self._checkpointed_seconds: tuple[int, float] | None = None  # (step, training seconds) of the last state

    def _check_execution_settings(self) -> None:
        config, world = self.config, self.dist.world_size
        check_precision(config.precision, self.device)
        if config.precision == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16() and self.dist.is_main:
            self.echo(
                "warning: precision=bf16 on a CPU without avx512_bf16 / amx_bf16 is emulated and may train slower "
                "than precision=fp32"
            )
        if config.precision == "auto" and self.dist.is_main:
            resolved = resolve_precision("auto", self.device)
            why = "it runs bf16 natively" if resolved == "bf16" else "it has no native bf16"
            self.echo(f"[{self.name}] precision=auto trains in {resolved} on this {self.device.type} ({why})")
        parts = world * config.grad_accum
        if config.batch_size % parts:
            raise ConfigError(
                f"batch_size ({config.batch_size}) is the global batch and must be divisible by "
                f"processes x grad_accum = {world} x {config.grad_accum}"
            )

    # -- state -----------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation and sampling: the EMA copy when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.model

    def data_sketch(self) -> DataSketch | None:
        """The sketch of the training data (None when the batch source has none), computed once."""
        if self._sketch is None and hasattr(self.batches, "sketch"):
            self._sketch = self.batches.sketch()
        return self._sketch

    def _say(self, message: str) -> None:
        if self.dist.is_main:
            self.echo(message)

    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        seconds = self.training_seconds()
        self._checkpointed_seconds = (self.step, seconds)  # what a resume from this state reads back
        tensors = ckpt.prefixed("model.", self.model.state_dict())
        if self.ema is not None:
            tensors.update(ckpt.prefixed("ema.", self.ema.state_dict()))
        optim_tensors, optim_rest = ckpt.flatten_optimizer(self.optimizer)
        tensors.update(optim_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        sketch = self.data_sketch()
        if sketch is not None:
            tensors["data.sketch"] = sketch.values
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        metadata = {
            "name": self.name,
            "signature": json.dumps(self.signature, sort_keys=True),
            "train_config": json.dumps(asdict(self.config)),
            "optimizer": json.dumps(optim_rest),
            "ema_updates": str(self.ema.num_updates if self.ema is not None else 0),
            "world_size": str(self.dist.world_size),
            "log_window": json.dumps(asdict(self._window)),
            "train_seconds": repr(seconds),
        }
        if sketch is not None:
            metadata["data_rows"] = str(sketch.rows)
        if self.scaler is not None:
            metadata["grad_scaler"] = json.dumps(self.scaler.state_dict())
        return tensors, metadata

    def save_checkpoint(self) -> Path:
        """Write the training state of the current step (atomically; the newest ``keep_last`` are kept)."""
        tensors, metadata = self._state_tensors()
        path = ckpt.save_training_state(self.state_dir, self.step, tensors, metadata, self.config.keep_last)
        self.last_checkpoint = (self.step, path)
        return path

    def _checkpoint(self) -> None:
        """:meth:`save_checkpoint` on rank 0; a failed write (a full disk) stops every rank with one line."""
        try:
            distributed.on_main(self.save_checkpoint, self.dist)
        except CheckpointError as exc:
            raise CheckpointError(f"'{self.name}' stopped at step {self.step}: {exc}; {self._kept()}") from None
        self.last_checkpoint = (self.step, self.state_dir / f"step-{self.step:08d}.safetensors")

    def _check_resumable(self, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
        saved = json.loads(metadata.get("signature", "{}"))
        if saved != self.signature:
            keys = sorted(k for k in set(saved) | set(self.signature) if saved.get(k) != self.signature.get(k))
            weights = ckpt.state_differences(self.model.state_dict(), ckpt.strip_prefix("model.", tensors))
            detail = f"; its weights: {'; '.join(weights)}" if weights else ""
            raise CheckpointError(
                f"the checkpoint of '{self.name}' in {self.state_dir} was made by a different model "
                f"(differs in: {', '.join(keys)}{detail}); use a new run_dir or --fresh"
            )
        sketch = self.data_sketch()
        if sketch is not None and "data.sketch" in tensors and metadata.get("data_rows", "").isdigit():
            why = DataSketch(int(metadata["data_rows"]), tensors["data.sketch"]).difference(sketch)
            if why:
                raise CheckpointError(
                    f"the checkpoint of '{self.name}' in {self.state_dir} was trained on other data ({why}: "
                    "a changed data folder or an upstream model retrained); use a new run_dir or --fresh"
                )
        try:
            saved_config = json.loads(metadata.get("train_config", "{}"))
        except json.JSONDecodeError:
            saved_config = {}
        current = json.loads(json.dumps(asdict(self.config)))
        changed = sorted(
            k for k in saved_config if k not in RESUMABLE_CHANGES and saved_config.get(k) != current.get(k)
        )
        if changed:
            shown = ", ".join(f"{k} {saved_config.get(k)} -> {current.get(k)}" for k in changed[:6])
            raise CheckpointError(
                f"the checkpoint of '{self.name}' in {self.state_dir} was trained with other settings ({shown}); "
                "use a new run_dir or --fresh"
            )

    def _restore(self) -> int:
        if self.dist.is_main:
            ckpt.remove_stale_temp_files(self.state_dir)
            ckpt.remove_stale_temp_files(self.state_dir.parent, prefix=f".{self.name}.")
        found = ckpt.latest_training_state(self.state_dir, warn=self._say)
        step = 0
        self._window = _LogWindow()
        self._seconds_before, self._loop_start = 0.0, None
        if found is not None:
            step = self._load_state(*found)
        elif damaged := len(ckpt.step_files(self.state_dir)):
            self._say(
                f"none of the {damaged} training state(s) of '{self.name}' in {self.state_dir} verifies: "
                "training starts again from step 0"
            )
        if not distributed.agree(step, self.dist):
            raise CheckpointError(
                f"the ranks found different checkpoints of '{self.name}' in {self.state_dir}: "
                "the run folder must be on a file system every rank sees"
            )
        return step

    def _load_state(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
        self._check_resumable(metadata, tensors)
        model_state = ckpt.strip_prefix("model.", tensors)
        ckpt.check_compatible(self.model, model_state, self.state_dir)
        self.model.load_state_dict(model_state)
        if self.ema is not None:
            ema_state = ckpt.strip_prefix("ema.", tensors)
            if ema_state:
                self.ema.load_state_dict(ema_state, int(metadata.get("ema_updates", "0")))
            else:  # EMA switched on for a run saved without it: start the average from the weights
                self.ema.load_state_dict(model_state, 0)
        try:
            ckpt.unflatten_optimizer(self.optimizer, tensors, json.loads(metadata["optimizer"]))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"the optimizer state in {self.state_dir} does not fit: {exc}") from None
        if self.scaler is not None and metadata.get("grad_scaler"):
            self.scaler.load_state_dict(json.loads(metadata["grad_scaler"]))
        torch.set_rng_state(tensors["rng.torch"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        try:  # checkpoints written before the window was saved start a fresh one
            self._window = _LogWindow(**json.loads(metadata.get("log_window", "{}")))
        except (TypeError, ValueError):
            self._window = _LogWindow()
        try:  # checkpoints written before the time was recorded count from 0
            self._seconds_before = max(0.0, float(metadata.get("train_seconds", "0")))
        except ValueError:
            self._seconds_before = 0.0
        step = int(metadata["step"])
        self.last_checkpoint = (step, self.state_dir / f"step-{step:08d}.safetensors")
        return step

    def export(self) -> Path:
        """Write the weights to use (EMA if on) and their JSON record."""
        info = {
            "name": self.name,
            "step": self.step,
            "ema": self.ema is not None,
            "signature": self.signature,
            "train_config": asdict(self.config),
        }
        ckpt.export_weights(self.weights_path, self.eval_model.state_dict(), info)
        return self.weights_path

    # -- loop ------------------------------------------------------------------------------------
    def _run_validation(self) -> dict[str, float]:
        if self.validate is None or not self.dist.is_main:
            return {}
        was_training = self.model.training
        self.eval_model.eval()
        with torch.no_grad():
            values = self.validate(self.eval_model)
        self.model.train(was_training)
        for key, value in values.items():
            self.logger.log(f"{self.name}/val_{key}", self.step, value)
        return values

    def _kept(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (step {self.last_checkpoint[0]}) is kept at {self.last_checkpoint[1]}"

    def _diverged(self, loss: float) -> TrainingDiverged:
        return TrainingDiverged(
            f"'{self.name}' training stopped: the loss became {loss} at step {self.step + 1}; {self._kept()}"
        )

    def _network(self) -> nn.Module:
        """What the loss is computed through: the model, wrapped in DDP across processes, then compiled."""
        net: nn.Module = self.model
        self._ddp = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=device_ids)
            net = self._ddp
        if self.config.compile:
            net = _compile(net)
        return net

    def _autocast(self) -> Any:
        return autocast(self.device, self.config.precision)

    def _micro_batches(self, batch: Any) -> Iterator[tuple[Any, torch.Generator]]:
        """This rank's ``grad_accum`` micro-batches of the step's global batch, each with its generator.

        With ``P = world_size x grad_accum`` parts, rank r takes parts ``r A .. r A + A - 1`` (a contiguous
        ``1/world_size`` shard). One part (a single process, no accumulation) is the batch itself with the
        step's generator, exactly as before sharding existed.
        """
        seed = mix_seed(self.seed, self.step, 1)
        accum, parts = self.config.grad_accum, self.dist.world_size * self.config.grad_accum
        if parts == 1:
            yield batch, torch.Generator(self.device).manual_seed(seed)
            return
        rows = _batch_rows(batch)
        if rows is None:
            raise ConfigError(
                f"'{self.name}': grad_accum > 1 and data-parallel training need batches of tensors "
                "(or tuples/dicts of them) to split"
            )
        if rows % parts:
            raise ConfigError(
                f"'{self.name}': a batch of {rows} rows cannot be split over processes x grad_accum = "
                f"{self.dist.world_size} x {accum}"
            )
        size = rows // parts
        for k in range(accum):
            start = (self.dist.rank * accum + k) * size
            generator = RowGenerator.for_rows(seed, start, start + size, rows, self.device)
            yield _slice_batch(batch, start, start + size), generator

    def _forward_backward(self, net: nn.Module, batch: Any) -> float:
        """Accumulate the gradient of the step's mean loss; returns that loss (averaged over all ranks).

        Each micro-batch loss is a mean over its rows, so it is scaled by ``1 / grad_accum`` before
        ``backward`` and DDP averages over ranks: the sum is the gradient of the global batch's mean loss.
        """
        accum = self.config.grad_accum
        total: torch.Tensor | None = None
        for k, (micro, generator) in enumerate(self._micro_batches(batch)):
            last = k == accum - 1
            sync = self._ddp.no_sync() if self._ddp is not None and not last else nullcontext()  # type: ignore[operator]
            with sync:
                with self._autocast():
                    loss = self.loss_fn(net, micro, generator)
                scaled = loss / accum if accum > 1 else loss
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            detached = loss.detach().float()
            total = detached if total is None else total + detached
        assert total is not None
        if self.dist.enabled:
            return float(distributed.all_reduce_sum(total, self.dist)) / (accum * self.dist.world_size)
        return float(total) / accum if accum > 1 else float(total)

    @contextmanager
    def _determinism(self) -> Iterator[None]:
        if not self.config.deterministic:
            yield
            return
        before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before[0], warn_only=before[1])

    def fit(self) -> TrainResult:
        with self._determinism():
            return self._fit()

    def _fit(self) -> TrainResult:
        config = self.config
        start = time.perf_counter()
        resumed = self._restore()
        if resumed > config.steps:  # the weights would be those of more steps than the config and report say
            raise ConfigError(
                f"[{self.name}] this run has trained {resumed} steps, more than steps={config.steps}: keep steps >= "
                f"{resumed}, or start over with --fresh"
            )
        self.step = resumed
        if self.dist.is_main:  # records past the resume point belong to a run that is being redone
            self.logger.truncate(f"{self.name}/", resumed)
        if resumed:
            done = " (training already complete)" if resumed >= config.steps else ""
            self._say(f"[{self.name}] resumed from step {resumed} of {config.steps}{done}")
        net = self._network()
        self.model.train()
        last_logged: float | None = None
        validation: dict[str, float] = {}
        main = self.dist.is_main
        bar = progress_bar(
            total=config.steps, initial=self.step, desc=self.name, disable=not (self.show_progress and main)
        )
        if self.step < config.steps:
            self._loop_start = time.perf_counter()
        try:
            while self.step < config.steps:
                lr = config.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batch = self.batches.batch(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                try:
                    loss_value = self._forward_backward(net, batch)
                except Exception as exc:
                    if config.compile and _is_compile_failure(exc):
                        raise ConfigError(
                            f"'{self.name}': compile=true failed ({type(exc).__name__}: {first_line(exc, 200)}); "
                            "run with compile=false"
                        ) from None
                    raise
                finite = math.isfinite(loss_value)
                if finite:
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    if config.grad_clip > 0:
                        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                        # with fp16 an overflowing gradient is the scaler's business: it skips the step
                        finite = bool(torch.isfinite(norm)) or self.scaler is not None
                window = self._window
                if finite:
                    window.consecutive_skips = 0
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update(self.model)
                    window.loss_sum += loss_value
                    window.loss_count += 1
                else:  # a skipped step still counts: logs, validation and checkpoints keep their schedule
                    if config.nan_policy == "stop":
                        raise self._diverged(loss_value)
                    window.skipped += 1
                    window.consecutive_skips += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    if window.consecutive_skips > config.max_skipped_steps:
                        raise self._diverged(loss_value)
                self.step += 1
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    if main:
                        self.logger.log(f"{self.name}/lr", self.step, lr)
                    if window.loss_count:  # a window of skipped steps alone has no loss to log
                        last_logged = window.loss_sum / window.loss_count
                        if main:
                            self.logger.log(f"{self.name}/train_loss", self.step, last_logged)
                        bar.set_postfix(loss=f"{last_logged:.4f}", refresh=False)  # drawn at the bar's own interval
                    window.loss_sum, window.loss_count = 0.0, 0
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    validation = self._run_validation()
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self._checkpoint()
                if main:
                    for hook in self.hooks:
                        hook(self)
        finally:
            bar.close()
            if main:
                self.logger.flush()
        # The loop's time as the final checkpoint records it (not the time after it), so a rerun that resumes the
        # finished training reports the same number.
        step, seconds = self._checkpointed_seconds or (None, 0.0)
        self._seconds_before = seconds if step == self.step else self.training_seconds()
        self._loop_start = None
        if resumed >= config.steps and self.validate is not None and main:
            validation = self._last_validation()
        if last_logged is None and main:  # nothing logged in this call (a finished training resumed): the log's
            last_logged = self._last_logged_train_loss()
        distributed.on_main(self.export, self.dist)
        return TrainResult(
            name=self.name,
            step=self.step,
            resumed_from=resumed,
            seconds=self.training_seconds(),
            final_train_loss=last_logged,
            final_validation=validation,
            skipped_steps=self._window.skipped,
            world_size=self.dist.world_size,
            session_seconds=time.perf_counter() - start,
        )

    def training_seconds(self) -> float:
        """The training time of the steps done so far: that recorded by the checkpoint resumed, plus this call's
        time in its training loop (none when the training was already complete)."""
        if self._loop_start is None:
            return self._seconds_before
        return self._seconds_before + time.perf_counter() - self._loop_start

    def _last_logged_train_loss(self) -> float | None:
        """The newest training loss the log holds at or before the current step, or None."""
        steps, values = read_series(self.logger.path, f"{self.name}/train_loss")
        logged = [value for step, value in zip(steps, values, strict=True) if step <= self.step]
        return logged[-1] if logged else None

    def _last_validation(self) -> dict[str, float]:
        """The validation scalars logged at the final step (used when nothing was left to train)."""
        prefix = f"{self.name}/val_"
        return {
            tag[len(prefix) :]: values[steps.index(self.step)]
            for tag, (steps, values) in read_all_series(self.logger.path).items()
            if tag.startswith(prefix) and self.step in steps
        }
