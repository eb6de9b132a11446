"""Data-parallel scaling on this CPU: step time and samples/s of one process vs two gloo processes training
the same global batch.

    PYTHONPATH=src python benchmarks/scaling.py [--steps 80] [--repeats 3] [--out FILE]

The machine has 2 cores, so the honest comparison is 2 processes x 1 thread (torchrun, gloo, DDP) against
1 process x 2 threads (intra-op parallelism), with 1 process x 1 thread as the baseline. Models:

- ``mlp``: the STATES denoiser (MLP 4 x 256 on ``(x, y, t_bar)``, T = 500), global batch 1024;
- ``conv``: a small convolutional eps-network (4 conv layers of 32 channels, 3x3, on 1 x 16 x 16 images,
  learned time embedding), global batch 128.

Each configuration trains ``--steps`` steps through :class:`difflab.training.trainer.Trainer`; the step time
is the median over the steps after ``--warmup`` (rank 0 clocks them; DDP keeps the ranks in lockstep), and
the best median of ``--repeats`` runs is kept (other processes share this machine). The 2-process runs also
time a bare all-reduce of a gradient-sized tensor. Results: ``--out`` (JSON) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]
BATCH = {"mlp": 1024, "conv": 128}


class ConvEps(nn.Module):
    """``eps_theta(x_t, t)`` for (B, 1, H, W) images: 4 same-size 3x3 convolutions, time embedding added."""

    def __init__(self, channels: int = 32, num_timesteps: int = 1000) -> None:
        super().__init__()
        self.inp = nn.Conv2d(1, channels, 3, padding=1)
        self.time = nn.Embedding(num_timesteps, channels)
        self.mid = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2)])
        self.out = nn.Conv2d(channels, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inp(x) + self.time(t)[:, :, None, None])
        for conv in self.mid:
            h = F.silu(conv(h))
        return self.out(h)


def worker(args: argparse.Namespace) -> None:
    from difflab.data.batches import ShuffledBatches
    from difflab.data.states import load_states
    from difflab.diffusion.objectives import epsilon_loss
    from difflab.diffusion.schedule import NoiseSchedule
    from difflab.experiments.runs import setup_device
    from difflab.models.mlp import DenoiserMLP
    from difflab.training import distributed
    from difflab.training.logging import RunLogger
    from difflab.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    device = setup_device("cpu")
    context = distributed.current()
    torch.manual_seed(0)
    if args.model == "mlp":
        schedule = NoiseSchedule.linear(500, 1e-4, 0.02)
        model: nn.Module = DenoiserMLP(2, (256, 256, 256, 256), 500)
        data = load_states("train").data
    else:
        schedule = NoiseSchedule.linear(1000, 1e-4, 0.02)
        model = ConvEps()
        data = torch.randn(4096, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    batch = BATCH[args.model]
    never = 10**6
    config = TrainConfig(
        steps=args.steps, batch_size=batch, lr=1e-3, log_every=never, eval_every=never, checkpoint_every=never
    )
    clock: list[float] = []
    trainer = Trainer(
        "bench",
        model,
        lambda net, rows, generator: epsilon_loss(net, schedule, rows[0], generator),
        ShuffledBatches((data,), batch, seed=1),
        config,
        Path(args.run_dir),
        RunLogger(Path(args.run_dir), tensorboard=False),
        show_progress=False,
        echo=lambda message: None,
        hooks=[lambda _: clock.append(time.perf_counter())],
        device=device,
    )
    trainer.fit()
    allreduce_ms = None
    if context.enabled:
        flat = torch.zeros(sum(p.numel() for p in model.parameters()))
        for _ in range(5):
            torch.distributed.all_reduce(flat)
        start = time.perf_counter()
        for _ in range(20):
            torch.distributed.all_reduce(flat)
        allreduce_ms = (time.perf_counter() - start) / 20 * 1000
    if context.is_main:
        # the last step also writes a checkpoint and the exported weights: leave it out
        steps = [b - a for a, b in zip(clock[args.warmup :], clock[args.warmup + 1 : -1])]
        record = {
            "median_step_ms": statistics.median(steps) * 1000,
            "mean_step_ms": statistics.mean(steps) * 1000,
            "timed_steps": len(steps),
            "allreduce_ms": allreduce_ms,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        Path(args.out).write_text(json.dumps(record))


def run_one(model: str, processes: int, threads: int, steps: int, warmup: int) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="scaling_"))
    out = folder / "result.json"
    script = [str(Path(__file__).resolve()), "--worker", "--model", model, "--steps", str(steps)]
    script += ["--warmup", str(warmup), "--threads", str(threads), "--run-dir", str(folder / "run"), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        launch = [sys.executable, *script]
    else:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launch += script
    load = os.getloadavg()[0]
    subprocess.run(launch, env=env, check=True, capture_output=True)
    return {**json.loads(out.read_text()), "load_average": load}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mlp", choices=sorted(BATCH))
    parser.add_argument("--models", default="mlp,conv")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        results[model] = {}
        for repeat in range(args.repeats):
            for name, processes, threads in CONFIGS:
                record = run_one(model, processes, threads, args.steps, args.warmup)
                print(f"{model:5s} {name:24s} run {repeat + 1}: {record['median_step_ms']:7.2f} ms/step", flush=True)
                results[model].setdefault(name, []).append(record)
    summary = {"batch": BATCH, "steps": args.steps, "warmup": args.warmup, "cpus": os.cpu_count(), "runs": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| model | configuration | step time (ms, best median) | samples/s | vs 1 x 1 | all-reduce (ms) |")
    print("|---|---|---|---|---|---|")
    for model, by_config in results.items():
        base = min(r["median_step_ms"] for r in by_config[CONFIGS[0][0]])
        for name, records in by_config.items():
            best = min(records, key=lambda r: r["median_step_ms"])
            step = best["median_step_ms"]
            reduce_ms = f"{best['allreduce_ms']:.2f}" if best["allreduce_ms"] is not None else "-"
            print(
                f"| {model} (batch {BATCH[model]}) | {name} | {step:.1f} | {BATCH[model] / step * 1000:,.0f} | "
                f"{base / step:.2f}x | {reduce_ms} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
