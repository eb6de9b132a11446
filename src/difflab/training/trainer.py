"""A small, resumable training loop (AdamW, warmup + cosine LR, gradient clipping, EMA).

Determinism: the batch for step ``s`` and the random numbers its loss draws come from generators
seeded by ``(seed, s)``, so the data order and noise never depend on how often a run was stopped
and resumed. A resumed run therefore ends with the same weights as an uninterrupted one (on CPU).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from difflab.errors import CheckpointError, ConfigError, TrainingDiverged
from difflab.progress import progress_bar
from difflab.seeding import mix_seed
from difflab.training import checkpoint as ckpt
from difflab.training.ema import EMA
from difflab.training.logging import RunLogger

LR_SCHEDULES = ("constant", "cosine")
NAN_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one network."""

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
    """Gives the batch of a step as a pure function of the step (so resuming never changes the order)."""

    def batch(self, step: int) -> Any: ...


LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]
ValidateFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    """What a call to :meth:`Trainer.fit` did."""

    name: str
    step: int
    resumed_from: int
    seconds: float
    final_train_loss: float | None
    final_validation: dict[str, float] = field(default_factory=dict)
    skipped_steps: int = 0


class Trainer:
    """Trains ``model`` on ``loss_fn(model, batches.batch(step), generator)`` for ``config.steps`` steps.

    ``hooks`` are called as ``hook(trainer)`` after every completed step (after its checkpoint, if any), e.g.
    to draw a progress figure every epoch from ``trainer.eval_model``.

    Writes ``<name>/train_loss``, ``<name>/lr`` and ``<name>/val_*`` scalars through ``logger``, training
    state checkpoints under ``run_dir/checkpoints/<name>/`` and, at the end, the weights to use
    (EMA when enabled) as ``run_dir/checkpoints/<name>.safetensors`` + ``.json``. An existing training
    state in the run folder is resumed automatically (the signature of the model must match).
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
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.adam_betas)
        )
        self.ema = EMA(model, config.ema_decay) if config.ema_decay > 0 else None
        self.state_dir = self.run_dir / "checkpoints" / name
        self.weights_path = self.run_dir / "checkpoints" / f"{name}.safetensors"
        self.step = 0
        self.last_checkpoint: tuple[int, Path] | None = None

    # -- state -----------------------------------------------------------------------------------
    @property
    def eval_model(self) -> nn.Module:
        """The weights used for validation and sampling: the EMA copy when EMA is on."""
        return self.ema.shadow if self.ema is not None else self.model

    def _state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = ckpt.prefixed("model.", self.model.state_dict())
        if self.ema is not None:
            tensors.update(ckpt.prefixed("ema.", self.ema.state_dict()))
        optim_tensors, optim_rest = ckpt.flatten_optimizer(self.optimizer)
        tensors.update(optim_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        metadata = {
            "name": self.name,
            "signature": json.dumps(self.signature, sort_keys=True),
            "train_config": json.dumps(asdict(self.config)),
            "optimizer": json.dumps(optim_rest),
            "ema_updates": str(self.ema.num_updates if self.ema is not None else 0),
        }
        return tensors, metadata

    def save_checkpoint(self) -> Path:
        tensors, metadata = self._state_tensors()
        path = ckpt.save_training_state(self.state_dir, self.step, tensors, metadata, self.config.keep_last)
        self.last_checkpoint = (self.step, path)
        return path

    def _restore(self) -> int:
        found = ckpt.latest_training_state(self.state_dir, warn=self.echo)
        if found is None:
            return 0
        tensors, metadata = found
        saved = json.loads(metadata.get("signature", "{}"))
        if saved != self.signature:
            keys = sorted(k for k in set(saved) | set(self.signature) if saved.get(k) != self.signature.get(k))
            raise CheckpointError(
                f"the checkpoint of '{self.name}' in {self.state_dir} was made by a different model "
                f"(differs in: {', '.join(keys)}); use a new run_dir or --fresh"
            )
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
        torch.set_rng_state(tensors["rng.torch"])
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
        if self.validate is None:
            return {}
        was_training = self.model.training
        self.eval_model.eval()
        with torch.no_grad():
            values = self.validate(self.eval_model)
        self.model.train(was_training)
        for key, value in values.items():
            self.logger.log(f"{self.name}/val_{key}", self.step, value)
        return values

    def _diverged(self, loss: float) -> TrainingDiverged:
        if self.last_checkpoint is None:
            kept = "no checkpoint had been written yet"
        else:
            kept = f"the last good checkpoint (step {self.last_checkpoint[0]}) is kept at {self.last_checkpoint[1]}"
        return TrainingDiverged(
            f"'{self.name}' training stopped: the loss became {loss} at step {self.step + 1}; {kept}"
        )

    def fit(self) -> TrainResult:
        config = self.config
        start = time.perf_counter()
        resumed = self._restore()
        self.step = resumed
        if resumed:
            self.logger.truncate(f"{self.name}/", resumed)
            done = " (training already complete)" if resumed >= config.steps else ""
            self.echo(f"[{self.name}] resumed from step {resumed} of {config.steps}{done}")
        self.model.train()
        running, count, skipped, consecutive_skips = 0.0, 0, 0, 0
        last_logged: float | None = None
        validation: dict[str, float] = {}
        bar = progress_bar(total=config.steps, initial=self.step, desc=self.name, disable=not self.show_progress)
        try:
            while self.step < config.steps:
                lr = config.lr_at(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                generator = torch.Generator(self.device).manual_seed(mix_seed(self.seed, self.step, 1))
                batch = self.batches.batch(self.step)
                loss = self.loss_fn(self.model, batch, generator)
                self.optimizer.zero_grad(set_to_none=True)
                loss_value = float(loss.detach())
                finite = math.isfinite(loss_value)
                if finite:
                    loss.backward()
                    if config.grad_clip > 0:
                        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                        finite = bool(torch.isfinite(norm))
                if not finite:
                    if config.nan_policy == "stop":
                        raise self._diverged(loss_value)
                    skipped += 1
                    consecutive_skips += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    if consecutive_skips > config.max_skipped_steps:
                        raise self._diverged(loss_value)
                    self.step += 1
                    bar.update(1)
                    continue
                consecutive_skips = 0
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                self.step += 1
                bar.update(1)
                running += loss_value
                count += 1
                if self.step % config.log_every == 0 or self.step == config.steps:
                    last_logged = running / count
                    self.logger.log(f"{self.name}/train_loss", self.step, last_logged)
                    self.logger.log(f"{self.name}/lr", self.step, lr)
                    bar.set_postfix(loss=f"{last_logged:.4f}")
                    running, count = 0.0, 0
                if self.step % config.eval_every == 0 or self.step == config.steps:
                    validation = self._run_validation()
                if self.step % config.checkpoint_every == 0 or self.step == config.steps:
                    self.save_checkpoint()
                for hook in self.hooks:
                    hook(self)
        finally:
            bar.close()
            self.logger.flush()
        if resumed >= config.steps and self.validate is not None:
            validation = self._last_validation()
        self.export()
        return TrainResult(
            name=self.name,
            step=self.step,
            resumed_from=resumed,
            seconds=time.perf_counter() - start,
            final_train_loss=last_logged,
            final_validation=validation,
            skipped_steps=skipped,
        )

    def _last_validation(self) -> dict[str, float]:
        """The validation scalars logged at the final step (used when nothing was left to train)."""
        values: dict[str, float] = {}
        prefix = f"{self.name}/val_"
        if self.logger.path.is_file():
            for line in self.logger.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if str(record.get("tag", "")).startswith(prefix) and record.get("step") == self.step:
                    values[record["tag"][len(prefix) :]] = float(record["value"])
        return values
