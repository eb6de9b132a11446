"""Scalar logs of a run: ``metrics.jsonl`` (one JSON object a line) and TensorBoard event files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from difflab.training.checkpoint import atomic_write_bytes


class RunLogger:
    """Writes ``{"tag", "step", "value", "time"}`` lines to ``run_dir/metrics.jsonl`` and the same scalars
    to TensorBoard: a tag ``group/name`` goes to the event files of ``run_dir/tensorboard/group`` (one
    TensorBoard run per trained network, so a resumed network's purge of its redone steps touches no other)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}
        self._purge_steps: dict[str, int] = {}
        self._tensorboard = tensorboard
        self._tb_dir = Path(run_dir) / "tensorboard"
        self._checked_tail = False

    def _end_cut_line(self) -> None:
        """End a last line a killed writer cut short, so the next record is not glued onto it."""
        self._checked_tail = True
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as handle:
                handle.seek(-1, 2)
                cut = handle.read(1) != b"\n"
            if cut:
                with open(self.path, "a") as handle:
                    handle.write("\n")

    @staticmethod
    def _group(tag: str) -> str:
        return tag.split("/", 1)[0] if "/" in tag else "run"

    def _tb(self, group: str) -> Any:
        if group not in self._writers and self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSONL log is enough
                self._tensorboard = False
                return None
            # purge_step: TensorBoard hides this run's earlier events at or after the step a resume redoes.
            self._writers[group] = SummaryWriter(str(self._tb_dir / group), purge_step=self._purge_steps.get(group))
        return self._writers.get(group)

    def log(self, tag: str, step: int, value: float) -> None:
        if not self._checked_tail:
            self._end_cut_line()
        value = float(value)
        record = {
            "tag": tag,
            "step": int(step),
            "value": value if math.isfinite(value) else str(value),
            "time": round(time.time(), 3),
        }
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        writer = self._tb(self._group(tag))
        if writer is not None:
            writer.add_scalar(tag, value, int(step))

    def truncate(self, prefix: str, after_step: int) -> None:
        """Drop records of tags starting with ``prefix`` logged after ``after_step`` (used on resume, so the
        killed run's steps beyond its last checkpoint are not counted twice), and lines a kill cut short.

        The file is replaced atomically (a kill during the rewrite leaves the old file) and left untouched
        when there is nothing to drop. In TensorBoard, the group ``prefix`` names (``denoiser/`` ->
        ``tensorboard/denoiser``) hides its events after ``after_step`` from then on.
        """
        group = self._group(prefix)
        self._purge_steps[group] = after_step + 1
        if group in self._writers:
            self._writers.pop(group).close()
        if not self.path.is_file():
            return
        kept, dropped = [], False
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                late = str(record.get("tag", "")).startswith(prefix) and float(record.get("step", 0)) > after_step
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                dropped = True  # a line cut short by a kill, or damaged: not a record
                continue
            if late:
                dropped = True
                continue
            kept.append(json.dumps(record))
        if dropped:
            atomic_write_bytes(self.path, "".join(k + "\n" for k in kept).encode())

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def read_series(path: Path, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one tag from a ``metrics.jsonl`` file (the last value wins for a repeated step)."""
    return read_all_series(path).get(tag, ([], []))


def read_all_series(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every tag of a ``metrics.jsonl`` file: ``{tag: (steps, values)}`` sorted by step (the last value wins
    for a repeated step; lines that are not records, such as one cut short by a kill, are skipped)."""
    found: dict[str, dict[int, float]] = {}
    if Path(path).is_file():
        # errors="replace": a damaged (non-UTF-8) line is skipped like any other line that is not a record
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
                tag, step, value = str(record["tag"]), int(record["step"]), float(record["value"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
                continue
            found.setdefault(tag, {})[step] = value
    return {tag: (sorted(s), [s[k] for k in sorted(s)]) for tag, s in sorted(found.items())}
