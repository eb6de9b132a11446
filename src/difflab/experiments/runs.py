"""Run folders: every command writes one, holding its resolved config, status, timings and outputs.

Layout::

    RUN/config.yaml        the resolved config (what ran, defaults included)
    RUN/run.json           recipe, status (running | complete | failed), message, timings, environment
    RUN/classes.json       the class names of the data, in label order (image recipes)
    RUN/metrics.jsonl      scalar logs (also RUN/tensorboard/<network>/)
    RUN/checkpoints/       training states and exported weights
    RUN/samples/           sample tensors (.pt); trajectory.safetensors (x_t and predicted x_0 at ~20 steps)
    RUN/figures/           PNG figures
    RUN/metrics.json       final metrics (written only when the run completes)
    RUN/report.md          the report (written only when the run completes; ``difflab report RUN`` rebuilds it)
    RUN/report.html        the same report as one self-contained HTML file (figures embedded)
    RUN/report-STYLE.md    another report style, written by ``difflab report RUN --style STYLE`` (and .html)

Re-running the same command resumes in the same folder; a folder made with a different config is
refused (use another ``run_dir`` or ``--fresh``), except for the settings a resumed training may change
(:data:`RESUMABLE_RUN_KEYS` at the top level, ``trainer.RESUMABLE_CHANGES`` in any training section) and those
training never reads (a recipe config's ``AFTER_TRAINING_KEYS``: a rerun samples and scores with them). A folder
that holds nothing but its ``config.yaml``, ``run.json`` and ``classes.json`` (a run that stopped before writing
anything, say at a mistyped data path) is started over with the new config instead of refused. A rerun that fails
before it changes any file of the folder it reopened (a refused resume) puts back the files reopening rewrote or
removed, so a completed run stays completed.

In a data-parallel run (torchrun) every rank gets a :class:`RunFolder`, but only rank 0's writes
(``main``): it creates the folder while the others wait, and alone writes ``run.json``, metrics and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from difflab.config import config_from, dump_yaml, read_yaml, to_dict
from difflab.errors import ConfigError, DifflabError
from difflab.report.document import Report
from difflab.report.markdown import environment
from difflab.report.render import write_report
from difflab.report.rundata import RunContents, load_run
from difflab.report.rundata import read_run_record as read_run  # the name the recipes and the CLI use
from difflab.training import distributed
from difflab.training.checkpoint import atomic_write_bytes, tensor_digest
from difflab.training.precision import check_config_precisions
from difflab.training.trainer import RESUMABLE_CHANGES, TrainConfig

C = TypeVar("C")

FINAL_OUTPUTS = (
    "metrics.json",
    "report.md",
    "report.html",
    "report-ddpm-vs-ddim.md",  # `difflab report RUN --style ddpm-vs-ddim`
    "report-ddpm-vs-ddim.html",
)


def option_tags(options: dict[str, Any] | None, separator: str = "-") -> str:
    """Sampler options as a file-name tag, e.g. ``{"eta": 0.5, "spacing": "karras"}`` -> ``-eta0.5-spacingkarras``
    (numbers by ``:g``, so 1.0 and 1 name the same file); empty for no options."""
    return "".join(
        f"{separator}{key}{value:g}"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else f"{separator}{key}{value}"
        for key, value in (options or {}).items()
    )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available on this machine")
    return device


def setup_device(name: str) -> torch.device:
    """:func:`resolve_device`, then join torchrun's process group when this process was launched by torchrun
    (NCCL on GPUs, each rank on ``cuda:LOCAL_RANK``; gloo on CPU). A single process gets ``resolve_device``."""
    device, _ = distributed.init_from_env(resolve_device(name))
    return device


def setup_ranks(config: Any, echo: Callable[[str], object]) -> tuple[torch.device, Callable[[str], object]]:
    """:func:`setup_device` of ``config.device``, and this rank's ``echo``: the given one on rank 0 (or a single
    process), a silent one on the other ranks of a torchrun job (rank 0 alone speaks). Every ``precision`` of the
    config is checked on that device first, so a precision the device cannot run is refused before any run folder
    exists."""
    check_config_precisions(config, resolve_device(config.device))
    device = setup_device(config.device)
    return device, (echo if distributed.current().is_main else _silent)


def _silent(message: str) -> object:
    """The ``echo`` of ranks other than 0."""
    return None


def trained_only(run: RunFolder, recipe: str, started: float, echo: Callable[[str], object]) -> RunFolder:
    """End a ``difflab train`` of ``recipe``: the run is marked complete with its weights exported under
    ``checkpoints/`` and nothing sampled or scored; a later ``difflab run`` with the same config finds the training
    complete and goes on from there. ``started``: the ``time.perf_counter()`` of the command's start."""
    if run.reopened is not None and run.reopened.was_complete() and run.reopened.restore(run.path):
        echo(f"[{recipe}] nothing was left to train: {run.path} keeps its samples, metrics and report")
        return run
    run.complete("trained (difflab train): weights in checkpoints/; `difflab run` samples and scores them")
    echo(f"[{recipe}] trained in {time.perf_counter() - started:.0f} s: weights in {run.sub('checkpoints')}")
    return run


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


# Top-level settings of a recipe that say how it runs, not what it computes (``run_dir`` is in every
# ``ignore_keys``).
RESUMABLE_RUN_KEYS = ("device", "progress")


def resumable_difference(config: Any, key: str) -> bool:
    """Whether a rerun of ``config`` may differ from the folder's config in the dotted ``key``: a key of
    :data:`RESUMABLE_RUN_KEYS`, or one of ``trainer.RESUMABLE_CHANGES`` inside a :class:`TrainConfig` section
    (the trainer checks its own checkpoint against the rest)."""
    *parents, leaf = key.split(".")
    if not parents:
        return leaf in RESUMABLE_RUN_KEYS
    section = config
    for part in parents:
        section = getattr(section, part, None)
    return isinstance(section, TrainConfig) and leaf in RESUMABLE_CHANGES


def matches_key(key: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the dotted ``key`` is one of ``prefixes`` or lies inside one (``metrics`` holds ``metrics.n``)."""
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def config_differences(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts. With ``defaults`` (the nested dict of the
    config class's defaults), a key that one of them lacks is no difference where the other holds its default: that
    config was written before difflab had the key, and ran with the behaviour its default keeps."""
    a, b, base = _flatten(old), _flatten(new), _flatten(defaults or {})

    def differs(key: str) -> bool:
        if key in a and key in b:
            return a[key] != b[key]
        present = a if key in a else b
        return not (key in base and present[key] == base[key])

    return sorted(k for k in set(a) | set(b) if differs(k))


def _defaults(config: Any) -> dict[str, Any] | None:
    """The nested dict of ``config``'s class defaults, or None when the class needs arguments."""
    try:
        return to_dict(type(config)())
    except (TypeError, ConfigError):
        return None


# Written when a run folder is opened, before any result: a folder holding only these holds no results.
CLASSES_FILE = "classes.json"
OPENING_FILES = ("config.yaml", "run.json", CLASSES_FILE)


def _holds_results(path: Path) -> bool:
    """Whether the run folder ``path`` holds any file besides its :data:`OPENING_FILES`."""
    return any(item.is_file() and item.relative_to(path).as_posix() not in OPENING_FILES for item in path.rglob("*"))


# What reopening a folder rewrites or removes before the recipe runs: kept so a refusal can put them back.
_REOPEN_FILES = (*OPENING_FILES, *FINAL_OUTPUTS)


@dataclass
class _Reopened:
    """A run folder's state as a rerun found it: the bytes of the files opening rewrites or removes (None: absent)
    and the size and mtime of every other file. A rerun that fails before changing any of those other files (a
    refused resume: fewer steps than trained, a checkpoint of other data, a late setting error) puts the first back,
    so a completed run stays completed, with its report, instead of being marked failed."""

    saved: dict[str, bytes | None]
    others: dict[str, tuple[int, int]]

    @staticmethod
    def _listing(path: Path) -> dict[str, tuple[int, int]]:
        listing = {}
        for item in path.rglob("*"):
            name = item.relative_to(path).as_posix()
            if item.is_file() and name not in _REOPEN_FILES:
                stat = item.stat()
                listing[name] = (stat.st_size, stat.st_mtime_ns)
        return listing

    @classmethod
    def capture(cls, path: Path) -> _Reopened:
        saved = {name: (path / name).read_bytes() if (path / name).is_file() else None for name in _REOPEN_FILES}
        return cls(saved=saved, others=cls._listing(path))

    def was_complete(self) -> bool:
        """Whether the folder held a completed run (its saved ``run.json`` says so)."""
        try:
            return json.loads(self.saved["run.json"] or b"{}").get("status") == "complete"
        except (ValueError, AttributeError):
            return False

    def restore(self, path: Path) -> bool:
        """Put the saved files back if no other file changed since :meth:`capture`; returns whether it did."""
        if self._listing(path) != self.others:
            return False
        for name, data in self.saved.items():
            if data is None:
                (path / name).unlink(missing_ok=True)
            else:
                atomic_write_bytes(path / name, data)
        return True


@dataclass
class RunFolder:
    """A run folder being written (see the module docstring)."""

    path: Path
    recipe: str
    timings: dict[str, float] = field(default_factory=dict)
    main: bool = True
    reopened: _Reopened | None = None

    @classmethod
    def open(
        cls,
        path: str | Path,
        recipe: str,
        config: Any,
        fresh: bool = False,
        ignore_keys: tuple[str, ...] = ("run_dir",),
    ) -> RunFolder:
        """Create (or reopen, to resume) the folder for ``config``; refuses a folder of another config, except for
        differences in ``ignore_keys``, in the keys a resumed training may change, and in the config class's
        ``AFTER_TRAINING_KEYS`` (dotted keys or sections that training never reads: sampling and scoring settings,
        which a rerun applies to the trained model).

        Across processes rank 0 does this while the others wait; they get a folder that writes nothing.
        """
        context = distributed.current()
        run = distributed.on_main(lambda: cls._open_main(path, recipe, config, fresh, ignore_keys), context)
        return run if run is not None else cls(path=Path(path), recipe=recipe, main=False)

    @classmethod
    def _open_main(
        cls, path: str | Path, recipe: str, config: Any, fresh: bool, ignore_keys: tuple[str, ...]
    ) -> RunFolder:
        path = Path(path)
        config_path = path / "config.yaml"
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run_dir={path} is a file, not a folder; choose another run_dir")
        if fresh and path.exists():
            if not (path / "run.json").is_file() and any(path.iterdir()):
                raise ConfigError(f"--fresh refuses to delete {path}: it is not a difflab run folder")
            shutil.rmtree(path)
        if config_path.is_file():
            try:
                old = yaml.safe_load(config_path.read_text())
            except (yaml.YAMLError, UnicodeDecodeError):
                old = None
            new = to_dict(config)
            problem = ""
            if not isinstance(old, dict):
                problem = "has a damaged config.yaml (not a YAML mapping)"
            elif old.get("recipe") != new.get("recipe"):
                problem = f"holds a {old.get('recipe')!r} run, not a {new.get('recipe')!r} one"
            else:
                rerun_keys = (*ignore_keys, *getattr(config, "AFTER_TRAINING_KEYS", ()))
                differences = [
                    k
                    for k in config_differences(old, new, _defaults(config))
                    if not matches_key(k, rerun_keys) and not resumable_difference(config, k)
                ]
                if differences:
                    shown = ", ".join(differences[:6]) + (" ..." if len(differences) > 6 else "")
                    problem = f"holds a run with a different config (differs in: {shown})"
            if problem and not _holds_results(path):
                # Nothing trained or written yet (e.g. the last try stopped at a mistyped data path): start over.
                print(f"[{recipe}] {path} held no results of its earlier config; starting it over with this one")
                shutil.rmtree(path)
            elif problem:
                raise ConfigError(f"{path} {problem}; choose another run_dir=... or pass --fresh to start over")
        elif path.exists() and any(path.iterdir()) and not (path / "run.json").is_file():
            raise ConfigError(f"{path} exists and is not a difflab run folder; choose another run_dir")
        for sub in ("checkpoints", "samples", "figures"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        reopened = _Reopened.capture(path) if (path / "run.json").is_file() else None
        for name in FINAL_OUTPUTS:  # a rerun must never leave the previous run's results looking current
            (path / name).unlink(missing_ok=True)
        dump_yaml(config, config_path)
        run = cls(path=path, recipe=recipe, reopened=reopened)
        run._write_status("running")
        return run

    def _write_status(self, status: str, message: str = "") -> None:
        if not self.main:
            return
        record = {
            "recipe": self.recipe,
            "status": status,
            "message": message,
            "command": " ".join(["difflab"] + sys.argv[1:]) if sys.argv and "difflab" in sys.argv[0] else "",
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "timings_seconds": {k: round(v, 3) for k, v in self.timings.items()},
            "environment": environment(),
            # who writes it: a "running" record whose process is gone was killed (the run browser says so)
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        atomic_write_bytes(self.path / "run.json", (json.dumps(record, indent=2) + "\n").encode())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage of the run (accumulated into ``timings[name]``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Mark the run ``failed`` (with the reason) when the body raises; the error propagates."""
        try:
            yield
        except DifflabError as exc:
            self.fail(str(exc))
            raise
        except BaseException as exc:
            self.fail(f"interrupted by {type(exc).__name__}")
            raise

    def sub(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def discard_if_inputs_changed(self, name: str, *inputs: torch.Tensor, echo: Any = print) -> bool:
        """Keep the trained model ``name`` (``checkpoints/<name>/`` and ``<name>.safetensors``) only if it was
        trained on exactly ``inputs``: their sha256 is kept in ``checkpoints/<name>.inputs``; when it differs (other
        data, autoencoder or settings upstream), or a checkpoint exists without one, the checkpoints are removed
        and this says so, so the model is retrained instead of silently reused. Returns True when it removed any.
        Under torchrun rank 0 alone checks and removes, and the other ranks wait for it (they resume what is left)."""
        return bool(distributed.on_main(lambda: self._discard_if_inputs_changed(name, inputs, echo)))

    def _discard_if_inputs_changed(self, name: str, inputs: tuple[torch.Tensor, ...], echo: Any) -> bool:
        digest = tensor_digest({f"{k:04d}": t.detach().to("cpu", torch.float32) for k, t in enumerate(inputs)})
        marker = self.sub("checkpoints", f"{name}.inputs")
        state, weights = self.sub("checkpoints", name), self.sub("checkpoints", f"{name}.safetensors")
        saved = marker.read_text().strip() if marker.is_file() else None
        trained = state.exists() or weights.exists()
        removed = trained and saved != digest
        if removed:
            echo(f"[{self.recipe}] {name} was trained on other inputs (data, autoencoder or settings): retraining it")
            shutil.rmtree(state, ignore_errors=True)
            for path in (weights, weights.with_suffix(".json")):
                path.unlink(missing_ok=True)
        atomic_write_bytes(marker, (digest + "\n").encode())
        return removed

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        path = self.path / "metrics.json"
        if not self.main:
            return path
        atomic_write_bytes(path, (json.dumps(metrics, indent=2, default=float) + "\n").encode())
        return path

    def write_report(self, build: Callable[[RunContents], Report]) -> None:
        """Write ``report.md`` and ``report.html``, built by ``build`` from the folder as the recipe has written it so
        far (the same builder ``difflab report RUN`` calls); rank 0 alone, after :meth:`write_metrics`."""
        if self.main:
            write_report(build(load_run(self.path, require_complete=False)), self.path)

    def complete(self, message: str = "") -> None:
        """Mark the run complete (the recipe has written its report)."""
        self._write_status("complete", message)

    def fail(self, message: str) -> None:
        """Mark the run ``failed`` and remove its final outputs; a rerun that changed nothing in the folder it
        reopened (see :class:`_Reopened`) leaves it as it found it instead."""
        if not self.main:
            return
        if self.reopened is not None and self.reopened.restore(self.path):
            return
        for name in FINAL_OUTPUTS:
            (self.path / name).unlink(missing_ok=True)
        self._write_status("failed", message)


def read_run_config(path: str | Path, default: C) -> C:
    """The resolved ``config.yaml`` of run folder ``path`` as ``default``'s dataclass; refuses (one line) a folder
    without ``run.json``, a ``config.yaml`` that is missing or empty, or one of another recipe than ``run.json``'s
    (keys it lacks would silently take this difflab's defaults)."""
    path = Path(path)
    recipe = read_run(path)["recipe"]
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{path} has no config.yaml")
    data = read_yaml(config_path)
    if data.get("recipe") != recipe:
        found = f"names recipe {data['recipe']!r}" if data.get("recipe") else "is empty or names no recipe"
        raise ConfigError(f"{config_path} {found}, but {path / 'run.json'} says {recipe!r}: the folder is damaged")
    try:
        return config_from(default, config_path)
    except ConfigError as exc:  # the run's own file, not a command-line setting
        raise ConfigError(f"{config_path}: {exc}") from None
