"""Latent vs pixel sampling throughput at equal U-Net width (the point of latent diffusion).

Each U-Net config runs one sampling step (a forward pass under ``inference_mode``, random weights: the cost does
not depend on them) on a batch of 4 x 7 x 7 latents and, with one in/out channel, on a batch of 28 x 28 MNIST
images; the latent path also pays the autoencoder's decoder once per sample. The speed-up of sampling T = 1,000
steps is ``1000 t_pixel / (1000 t_latent + t_decode)``. Also reported: process CPU seconds, which is what a quiet
single-threaded machine takes when this one is shared.

    OMP_NUM_THREADS=1 python benchmarks/latent_throughput.py [--batch 256] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from difflab.experiments.ldm import MnistLDMConfig, measure_throughput  # noqa: E402
from difflab.experiments.mnist import MnistCFGConfig  # noqa: E402
from difflab.models.autoencoder import KLAutoencoder  # noqa: E402
from difflab.models.unet import describe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ldm = MnistLDMConfig()
    vae = KLAutoencoder(ldm.vae.training.model).eval()
    unets = {
        "mnist-ldm latent U-Net (CPU)": ldm.unet,
        "mnist-ldm pixel baseline (CPU)": ldm.table_config.pixel.unet,
        "mnist-cfg U-Net (CPU)": MnistCFGConfig().unet,
    }
    device = torch.device("cpu")
    rows = []
    for name, unet in unets.items():
        start = time.process_time()
        measured = measure_throughput(unet, (4, 7, 7), (1, 28, 28), vae.decode, args.batch, device, args.repeats)
        measured.update(
            name=name,
            unet=describe(replace(unet, in_channels=1, out_channels=1), 28),
            cpu_seconds=time.process_time() - start,
        )
        rows.append(measured)
        print(
            f"{name}: {measured['unet']}\n  latent {measured['latent_step_seconds']:.4f} s/step, pixel "
            f"{measured['pixel_step_seconds']:.4f} s/step, decode {measured['decode_seconds']:.4f} s per batch of "
            f"{args.batch}: {measured['speedup_per_step']:.1f}x per step, {measured['speedup_1000_steps']:.1f}x "
            "over 1,000 steps + decoding",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
