"""SIGKILL one training run at random moments, restart the same command each time, and check nothing is lost.

    PYTHONPATH=src python benchmarks/kill_resume.py [--kills 20] [--seed 0] [--workdir DIR] [--out FILE]

The run is ``difflab train states`` (the STATES denoiser, then its noisy classifier, with the recipe's
networks and batch size) shortened to DENOISER_STEPS + CLASSIFIER_STEPS steps with a checkpoint every
CHECKPOINT_EVERY steps, on one thread, in deterministic mode. An uninterrupted run of the same command runs
beside it. Each kill lands either while training, a random 1..3 x CHECKPOINT_EVERY steps after the point the
run resumed from plus a random 0-50 ms (inside a step, a log write or a checkpoint write); or, one time in
six, at a random moment 0-3 s after the launch (imports, restore, or the first steps); or, one time in six,
as soon as a checkpoint's temporary file appears (mid-write). After every kill the script checks:

- lost steps: the last step logged before the kill minus the step the next start resumes from (the newest
  checkpoint that verifies); it must never exceed CHECKPOINT_EVERY;
- corrupt checkpoints: every ``step-XXXXXXXX.safetensors`` and exported ``.safetensors`` file must verify
  (sha256 in the metadata); a kill during a write may leave a ``.tmp-PID`` file, never a torn real file.

At the end the restarted run's exported weights and final training states (model, EMA, optimizer, RNG)
must be bit-identical to the uninterrupted run's. Results go to ``--out`` (JSON) and stdout (markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from difflab.errors import CheckpointError
from difflab.training import checkpoint as ckpt

DENOISER_STEPS = 600
CLASSIFIER_STEPS = 400
CHECKPOINT_EVERY = 50
ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "progress=false",
    "device=cpu",
    f"denoiser_train.steps={DENOISER_STEPS}",
    f"classifier_train.steps={CLASSIFIER_STEPS}",
    f"denoiser_train.checkpoint_every={CHECKPOINT_EVERY}",
    f"classifier_train.checkpoint_every={CHECKPOINT_EVERY}",
    "denoiser_train.log_every=1",
    "classifier_train.log_every=1",
    "denoiser_train.eval_every=200",
    "classifier_train.eval_every=200",
    "denoiser_train.deterministic=true",
    "classifier_train.deterministic=true",
]
LOG_LINE = re.compile(r'"tag": "(denoiser|classifier)/train_loss", "step": (\d+)')


def command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "difflab", "train", "states", f"run_dir={run_dir}", *ARGS]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def global_step(stage: str, step: int) -> int:
    return step if stage == "denoiser" else DENOISER_STEPS + step


def last_logged(run_dir: Path) -> int:
    """The furthest step (denoiser steps, then classifier steps after them) in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((global_step(m[1], int(m[2])) for m in LOG_LINE.finditer(path.read_text())), default=0)


def writing(run_dir: Path) -> bool:
    """Whether a checkpoint is being written: a temporary file exists next to the training states."""
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(".tmp-" in p.name for p in folder.rglob(".*"))


def resume_point(run_dir: Path) -> int:
    """The step the next start resumes from: the newest training state that verifies, per stage."""
    steps = {}
    for stage in ("denoiser", "classifier"):
        steps[stage] = 0
        for step, path in ckpt.step_files(run_dir / "checkpoints" / stage):
            try:
                ckpt.verified_tensors(path)
            except CheckpointError:
                continue
            steps[stage] = step
            break
    if steps["classifier"] or steps["denoiser"] >= DENOISER_STEPS:
        return global_step("classifier", steps["classifier"])
    return steps["denoiser"]


def audit(run_dir: Path) -> tuple[list[str], list[str]]:
    """(files under real names that fail verification, temp files left by a killed writer)."""
    corrupt, temps = [], []
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if ".tmp-" in path.name:
                temps.append(str(path.relative_to(run_dir)))
            elif path.suffix == ".safetensors":
                try:
                    ckpt.verified_tensors(path)
                except CheckpointError:
                    corrupt.append(str(path.relative_to(run_dir)))
    return corrupt, temps


def compare(reference: Path, restarted: Path) -> dict[str, bool]:
    names = ["denoiser.safetensors", "classifier.safetensors"]
    names += [f"denoiser/step-{DENOISER_STEPS:08d}.safetensors", f"classifier/step-{CLASSIFIER_STEPS:08d}.safetensors"]
    same = {}
    for name in names:
        a, b = load_file(reference / "checkpoints" / name), load_file(restarted / "checkpoints" / name)
        same[name] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kill_resume.json")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kill_resume_"))
    reference, restarted = workdir / "reference", workdir / "restarted"
    rng = random.Random(args.seed)
    total = DENOISER_STEPS + CLASSIFIER_STEPS
    start = time.perf_counter()
    uninterrupted = subprocess.Popen(command(reference), env=environment(), stdout=subprocess.DEVNULL)
    kills = []
    resumed = 0
    while len(kills) < args.kills:
        process = subprocess.Popen(command(restarted), env=environment(), stdout=subprocess.DEVNULL)
        launched = time.monotonic()
        mode = rng.random()
        if mode < 1 / 6:
            phase = "start-up"
            time.sleep(rng.uniform(0.0, 3.0))
        elif mode < 2 / 6:
            phase = "checkpoint write"
            while process.poll() is None and not writing(restarted) and time.monotonic() - launched < 60:
                time.sleep(0.0005)
        else:
            phase, target = "training", min(resumed + rng.randint(1, 3 * CHECKPOINT_EVERY), total - 1)
            # A restart first drops the killed run's lines past its checkpoint (an atomic rewrite): wait for
            # this process's own lines (the file ends at the resume point, or goes past the killed run's end).
            stale = last_logged(restarted)
            own = stale <= resumed
            while process.poll() is None:
                step = last_logged(restarted)
                own = own or 0 < step <= resumed or step > stale
                if own and step >= target:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))
        if process.poll() is not None:
            raise SystemExit(f"the run ended (status {process.returncode}) before kill {len(kills) + 1}")
        process.send_signal(signal.SIGKILL)
        process.wait()
        logged = last_logged(restarted)
        resumed = resume_point(restarted)
        corrupt, temps = audit(restarted)
        kills.append(
            {
                "phase": phase,
                "seconds_after_launch": round(time.monotonic() - launched, 2),
                "last_logged_step": logged,
                "resumes_from": resumed,
                "lost_steps": logged - resumed,
                "corrupt_files": corrupt,
                "temp_files": temps,
            }
        )
        print(
            f"kill {len(kills):2d} ({phase:16s}): logged {logged:4d}, resumes from {resumed:4d}, "
            f"lost {logged - resumed:3d}, corrupt {len(corrupt)}, temp files {len(temps)}",
            flush=True,
        )
    final = subprocess.run(command(restarted), env=environment(), capture_output=True, text=True)
    if final.returncode != 0:
        raise SystemExit(f"the final restart failed:\n{final.stderr[-3000:]}")
    if uninterrupted.wait() != 0:
        raise SystemExit("the uninterrupted run failed")
    identical = compare(reference, restarted)
    corrupt_final, _ = audit(restarted)
    result = {
        "kills": len(kills),
        "kills_while_training": sum(k["phase"] == "training" for k in kills),
        "kills_during_start_up": sum(k["phase"] == "start-up" for k in kills),
        "kills_during_a_checkpoint_write": sum(k["phase"] == "checkpoint write" for k in kills),
        "kills_that_left_a_temp_file": sum(bool(k["temp_files"]) for k in kills),
        "max_lost_steps": max(k["lost_steps"] for k in kills),
        "lost_steps_beyond_checkpoint_interval": sum(max(0, k["lost_steps"] - CHECKPOINT_EVERY) for k in kills),
        "corrupt_checkpoints": sum(len(k["corrupt_files"]) for k in kills) + len(corrupt_final),
        "bit_identical": identical,
        "all_bit_identical": all(identical.values()),
        "checkpoint_every": CHECKPOINT_EVERY,
        "steps": {"denoiser": DENOISER_STEPS, "classifier": CLASSIFIER_STEPS},
        "command": " ".join(["difflab", "train", "states", *ARGS]),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "per_kill": kills,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{result['kills']} SIGKILLs ({result['kills_while_training']} while training, "
        f"{result['kills_during_start_up']} during start-up, {result['kills_during_a_checkpoint_write']} during a "
        f"checkpoint write; {result['kills_that_left_a_temp_file']} left a temp file): lost steps beyond the "
        f"{CHECKPOINT_EVERY}-step checkpoint interval "
        f"{result['lost_steps_beyond_checkpoint_interval']} (max lost {result['max_lost_steps']}), corrupt "
        f"checkpoints {result['corrupt_checkpoints']}, final weights bit-identical: {result['all_bit_identical']} "
        f"({result['wall_seconds']} s) -> {args.out}"
    )
    return 0 if result["all_bit_identical"] and not result["corrupt_checkpoints"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
