"""fp32 vs bf16 autocast, NCHW vs channels-last: the CPU recipes' U-Net on this machine.

One training step (forward + backward + AdamW, as the trainer runs it: autocast around the forward, the loss
in fp32) and one sampling step (a forward pass under ``inference_mode``) of the ``mnist-ddpm`` CPU config's
U-Net (``MnistDDPMConfig().unet``) on 28 x 28 x 1 images, timed by ``unet_speed.Contender``. Every
configuration starts from the same weights; the median of ``--repeats`` timed steps after
``--warmup`` untimed ones is reported, with the step's ratio to fp32 channels-last (what fp32 CPU runs use).

    python benchmarks/cpu_precision.py [--batch 128 ...] [--precisions fp32 bf16] [--formats nhwc nchw]
                                       [--threads 2] [--repeats 15] [--json out.json]

Several ``--batch`` values give a batch sweep (one table row per batch and configuration; the ratios are to
fp32 channels-last at the same batch, or to the first configuration measured when fp32 channels-last is not);
``--precisions fp32`` skips bf16, which is 11-13x slower than fp32 where the CPU only emulates it.

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
    parser.add_argument("--batch", type=int, nargs="+", default=[128], help="one or more batch sizes")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--formats", nargs="+", choices=("nhwc", "nchw"), default=["nhwc", "nchw"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if min(args.batch) < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, native bf16: {cpu_has_native_bf16()}")
    rows = {}
    print(
        "batch | configuration | train s/step | images/s | vs fp32 NHWC | sample s/step | NFE/s | vs fp32 NHWC",
        flush=True,
    )
    for batch in args.batch:
        measured = {}
        for precision in args.precisions:
            for memory_format in args.formats:
                name = f"{precision} {memory_format.upper()}"
                measured[name] = measure(precision == "bf16", memory_format == "nhwc", batch, args.warmup, args.repeats)
        base = measured.get("fp32 NHWC", next(iter(measured.values())))
        for name, row in measured.items():
            train_ratio, sample_ratio = base["train_s"] / row["train_s"], base["sample_s"] / row["sample_s"]
            print(
                f"{batch} | {name} | {row['train_s']:.3f} | {row['train_images_per_s']:.0f} | {train_ratio:.2f}x | "
                f"{row['sample_s']:.3f} | {row['sample_nfe_per_s']:.0f} | {sample_ratio:.2f}x",
                flush=True,
            )
            rows[f"batch {batch} {name}" if len(args.batch) > 1 else name] = row
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
