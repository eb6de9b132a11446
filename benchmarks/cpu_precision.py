"""fp32 vs bf16 autocast, NCHW vs channels-last: the CPU recipes' U-Net on this machine.

One training step (forward + backward + AdamW, as the trainer runs it: autocast around the forward, the loss
in fp32) and one sampling step (a forward pass under ``inference_mode``) of the ``mnist-ddpm`` CPU config's
U-Net (``MnistDDPMConfig().unet``) on 28 x 28 x 1 images, timed by ``unet_speed.Contender``. Every
configuration starts from the same weights; the median of ``--repeats`` timed steps after
``--warmup`` untimed ones is reported, with the step's ratio to fp32 channels-last (what fp32 CPU runs use).

    python benchmarks/cpu_precision.py [--batch 128] [--threads 2] [--repeats 15] [--json out.json]

bf16 pays only on CPUs that have it natively (``avx512_bf16`` / ``amx_bf16``; printed below): elsewhere
oneDNN emulates it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from unet_speed import Contender  # noqa: E402  (this folder is on sys.path when the script runs)

from difflab.experiments.mnist import MnistDDPMConfig  # noqa: E402
from difflab.models.unet import UNet  # noqa: E402
from difflab.training.precision import cpu_has_native_bf16  # noqa: E402


def measure(bf16: bool, channels_last: bool, batch: int, warmup: int, repeats: int) -> dict[str, float]:
    """Seconds per training step and per sampling step for one precision / memory format."""
    torch.manual_seed(0)

    def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            out = model(x, t)
        return out.float()  # the loss in fp32, as the trainer's autocast leaves it

    contender = Contender("", UNet(MnistDDPMConfig().unet), forward, batch, channels_last)
    for _ in range(warmup):
        contender.train_step()
        contender.sample_step()
    train = statistics.median(contender.train_step() for _ in range(repeats))
    contender.model.eval()
    sample = statistics.median(contender.sample_step() for _ in range(repeats))
    return {
        "train_s": train,
        "sample_s": sample,
        "train_images_per_s": batch / train,
        "sample_nfe_per_s": batch / sample,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, native bf16: {cpu_has_native_bf16()}"
    )
    rows = {}
    for bf16 in (False, True):
        for channels_last in (True, False):
            name = f"{'bf16' if bf16 else 'fp32'} {'NHWC' if channels_last else 'NCHW'}"
            rows[name] = measure(bf16, channels_last, args.batch, args.warmup, args.repeats)
    base = rows["fp32 NHWC"]
    print("configuration | train s/step | images/s | vs fp32 NHWC | sample s/step | NFE/s | vs fp32 NHWC")
    for name, row in rows.items():
        train_ratio, sample_ratio = base["train_s"] / row["train_s"], base["sample_s"] / row["sample_s"]
        print(
            f"{name} | {row['train_s']:.3f} | {row['train_images_per_s']:.0f} | {train_ratio:.2f}x | "
            f"{row['sample_s']:.3f} | {row['sample_nfe_per_s']:.0f} | {sample_ratio:.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
