"""Checkpoints as safetensors, written atomically and verified by a checksum on load.

Two kinds of files:

- *training state* ``checkpoints/<name>/step-XXXXXXXX.safetensors``: model, EMA and optimizer
  tensors plus RNG states, with the step, the model signature and a sha256 of all tensor bytes in
  the safetensors metadata. Resume loads the newest one whose checksum verifies.
- *exported weights* ``checkpoints/<name>.safetensors`` (what a user loads: the EMA weights when EMA
  is on) with ``checkpoints/<name>.json`` (model config, step, checksum).

Every file is written to a temporary name in the same folder and renamed into place, so a kill
never leaves a half-written file under a real name. Nothing is ever unpickled.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from difflab.errors import CheckpointError, first_line

STEP_FILE = re.compile(r"step-(\d{8})\.safetensors$")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _write_failed(path: Path, exc: BaseException) -> CheckpointError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        reason = "no space left on device"
    return CheckpointError(f"could not write {path}: {reason}; the file already there (if any) is untouched")


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # a temp name is never loaded; the next start removes it (remove_stale_temp_files)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: the directory entry is data too); best effort where
    directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename and fsync of the folder.

    A failure (a full disk, a read-only folder) raises :class:`CheckpointError` and leaves ``path`` as it was.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except OSError as exc:
        raise _write_failed(path, exc) from None
    finally:
        _discard(tmp)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors`` save via a temporary file, fsync, rename and fsync of the folder; the old file survives
    any failure.

    A failure (a full disk, a read-only folder) raises :class:`CheckpointError` naming the reason.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except (OSError, SafetensorError) as exc:
        raise _write_failed(path, exc) from None
    finally:
        _discard(tmp)


def remove_stale_temp_files(directory: Path, prefix: str = ".") -> list[Path]:
    """Delete ``.NAME.tmp-PID`` files (starting with ``prefix``) a killed writer left in ``directory``.

    They are never loaded (only ``step-XXXXXXXX.safetensors`` names are), this only frees the disk.
    """
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if path.name.startswith(prefix) and path.name.startswith(".") and ".tmp-" in path.name:
                _discard(path)
                removed.append(path)
    return removed


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata; a damaged file raises :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged or not a safetensors file ({exc})") from None
    return tensors, metadata


def verified_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_tensors`, then check the sha256 recorded in the metadata."""
    tensors, metadata = read_tensors(path)
    expected = metadata.get("sha256")
    if expected is None:
        raise CheckpointError(f"checkpoint {path} has no checksum in its metadata")
    if tensor_digest(tensors) != expected:
        raise CheckpointError(f"checkpoint {path} fails its checksum (corrupt or truncated)")
    return tensors, metadata


def state_differences(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``own``: the missing, unexpected and
    mis-shaped parameter names (an empty list when it fits)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short(unexpected)}")
    if shapes:
        detail = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes[:3])
        problems.append(f"shape mismatch {detail}{' ...' if len(shapes) > 3 else ''}")
    return problems


def check_compatible(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights that do not fit ``model``, naming the missing, unexpected and mis-shaped keys."""
    problems = state_differences(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit this model: {'; '.join(problems)}")


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")


def step_files(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the training-state files in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = STEP_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def save_training_state(
    directory: Path, step: int, tensors: dict[str, torch.Tensor], metadata: dict[str, Any], keep_last: int
) -> Path:
    """Write ``step-XXXXXXXX.safetensors`` atomically, then prune all but the newest ``keep_last``."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["step"] = str(step)
    meta["sha256"] = tensor_digest(tensors)
    path = directory / f"step-{step:08d}.safetensors"
    atomic_save_tensors(tensors, path, meta)
    for _, old in step_files(directory)[max(keep_last, 1) :]:
        old.unlink(missing_ok=True)
    return path


def latest_training_state(directory: Path, warn: Any = print) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The newest training state that verifies; damaged ones are reported through ``warn`` and skipped."""
    for _, path in step_files(directory):
        try:
            return verified_tensors(path)
        except CheckpointError as exc:
            warn(f"skipping {exc}")
    return None


def export_weights(path: Path, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write user-facing weights ``<name>.safetensors`` and their ``<name>.json`` (both atomically); an export that
    already holds exactly these (a resumed training that had nothing left to do) is left untouched."""
    tensors = {k: v for k, v in state_dict.items()}
    digest = tensor_digest(tensors)
    record = dict(info, sha256=digest, weights=path.name)
    text = (json.dumps(record, indent=2) + "\n").encode()
    if _holds_export(path, digest, text):
        return
    atomic_save_tensors(tensors, path, {"sha256": digest, "format": "difflab-weights"})
    atomic_write_bytes(path.with_suffix(".json"), text)


def _holds_export(path: Path, digest: str, record: bytes) -> bool:
    """Whether ``path`` and its ``.json`` already hold weights of sha256 ``digest`` (verified) and ``record``."""
    json_path = path.with_suffix(".json")
    if not (path.is_file() and json_path.is_file()) or json_path.read_bytes() != record:
        return False
    try:
        return verified_tensors(path)[1].get("sha256") == digest
    except CheckpointError:
        return False


def load_weights(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Load exported weights into ``model`` after checking the checksum and the keys; returns the JSON info.

    The record must describe these weights (its ``sha256`` is theirs): an export writes the weights, then the
    record, so a kill between the two leaves an older record, refused here until the training command reruns.
    """
    tensors, metadata = verified_tensors(path)
    check_compatible(model, tensors, path)
    info_path = path.with_suffix(".json")
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{info_path} is not valid JSON") from None
        if not isinstance(info, dict):
            raise CheckpointError(
                f"{info_path} must hold a JSON object (the export's record), not {type(info).__name__}"
            )
        recorded = info.get("sha256")
        if recorded is not None and recorded != metadata["sha256"]:  # verified_tensors ensured the latter
            raise CheckpointError(
                f"{info_path} does not describe {path} (checksums differ: an interrupted export?); "
                "rerun the command that trained it to export both again"
            )
    model.load_state_dict(tensors)
    return info


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors (for safetensors) plus the JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = value
            else:
                scalars[f"{param_id}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]
) -> None:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for name, value in rest.get("scalars", {}).items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def strip_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def digest_of(names: Iterable[str]) -> str:
    """A short digest of a list of names (used to tag a model signature)."""
    return hashlib.sha256("|".join(names).encode()).hexdigest()[:16]
