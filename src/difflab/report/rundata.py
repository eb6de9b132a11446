"""What a report is made from: the files of one run folder, read without running anything.

A report is a function of ``run.json`` (recipe, status, environment, command), ``config.yaml``,
``metrics.json``, ``metrics.jsonl`` and the files under ``figures/`` and ``samples/``, so
``difflab report RUN`` can rebuild it at any time from the folder alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from difflab.config import config_from
from difflab.errors import ConfigError
from difflab.training.logging import read_all_series

T = TypeVar("T")
TRAJECTORY_FILE = "samples/trajectory.safetensors"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise ConfigError(f"{path} is damaged (not valid JSON)") from None


@dataclass
class RunContents:
    """One run folder, read. ``series`` maps each logged tag to ``(steps, values)``."""

    path: Path
    record: dict[str, Any]
    config: dict[str, Any]
    config_text: str
    metrics: dict[str, Any]
    series: dict[str, tuple[list[int], list[float]]]

    @property
    def recipe(self) -> str:
        return str(self.record.get("recipe", ""))

    @property
    def status(self) -> str:
        return str(self.record.get("status", ""))

    @property
    def environment(self) -> dict[str, str]:
        return dict(self.record.get("environment") or {})

    def has(self, relative: str) -> bool:
        return (self.path / relative).is_file()

    def figures(self) -> list[str]:
        """Relative paths of the PNG figures, sorted."""
        folder = self.path / "figures"
        return sorted(f"figures/{p.name}" for p in folder.glob("*.png")) if folder.is_dir() else []

    def figure_file(self, name: str) -> Path | None:
        """``figures/<name>`` of the run, or ``None`` when the run did not draw it."""
        path = self.path / "figures" / name
        return path if path.is_file() else None

    def typed_config(self, default: T) -> T:
        """``config.yaml`` read into the recipe's config dataclass (``default`` supplies missing keys)."""
        try:
            return config_from(default, self.path / "config.yaml")
        except ConfigError as exc:
            raise ConfigError(f"cannot read {self.path / 'config.yaml'} with this difflab: {exc}") from None


def is_run_folder(path: str | Path) -> bool:
    return (Path(path) / "run.json").is_file()


def read_run_record(path: str | Path) -> dict[str, Any]:
    """``run.json`` of run folder ``path``, refused in one line when the folder is not a run folder or the record is
    damaged (not a JSON object, or naming no recipe)."""
    path = Path(path)
    if not is_run_folder(path):
        raise ConfigError(f"{path} is not a difflab run folder (no run.json)")
    record = _read_json(path / "run.json")
    if not isinstance(record, dict):
        raise ConfigError(f"{path / 'run.json'} is damaged (not a JSON object)")
    if not isinstance(record.get("recipe"), str) or not record["recipe"]:
        raise ConfigError(f"{path / 'run.json'} is damaged (it names no recipe)")
    return record


def trained_only(path: Path, record: dict[str, Any]) -> bool:
    """Whether the run folder ``path`` with run.json ``record`` holds a ``difflab train`` and nothing after it."""
    message = str(record.get("message", ""))
    return message.startswith("trained (difflab train)") and not (path / "metrics.json").is_file()


def finish_command(path: Path, record: dict[str, Any]) -> str:
    """What samples, scores and reports a :func:`trained_only` folder, as a sentence."""
    command = f"difflab run {record.get('recipe', 'RECIPE')} --config {path / 'config.yaml'} run_dir={path}"
    return f"`{command}` samples, scores and writes its report in the same folder"


def load_run(path: str | Path, require_complete: bool = True) -> RunContents:
    """Read a run folder; refuses (one-line :class:`ConfigError`) a folder that is not a completed run.

    ``require_complete=False`` is for the recipe itself, which writes its report just before it marks the
    run complete; ``metrics.json`` must exist either way.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder")
    record = read_run_record(path)
    status = record.get("status", "unknown")
    if require_complete and status != "complete":
        raise ConfigError(f"{path} is not a completed run (status: {status}); only completed runs have a report")
    if not (path / "metrics.json").is_file():
        if trained_only(path, record):
            raise ConfigError(f"{path} holds trained weights only (difflab train): {finish_command(path, record)}")
        raise ConfigError(f"{path} has no metrics.json; only completed runs have a report")
    metrics = _read_json(path / "metrics.json")
    if not isinstance(metrics, dict):
        raise ConfigError(f"{path / 'metrics.json'} is damaged (not a JSON object)")
    config_path = path / "config.yaml"
    config_text = config_path.read_text() if config_path.is_file() else ""
    try:
        config = yaml.safe_load(config_text) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{config_path} is not valid YAML") from None
    if require_complete and (not isinstance(config, dict) or config.get("recipe") != record.get("recipe")):
        # a report from this difflab's defaults would describe another run
        raise ConfigError(f"{config_path} is missing, empty or of another recipe than {path / 'run.json'} says")
    return RunContents(
        path=path,
        record=record,
        config=config if isinstance(config, dict) else {},
        config_text=config_text,
        metrics=metrics if isinstance(metrics, dict) else {},
        series=read_all_series(path / "metrics.jsonl"),
    )
