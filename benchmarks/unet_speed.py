"""U-Net speed on this machine: difflab vs diffusers' UNet2DModel vs denoising-diffusion-pytorch's Unet.

One training step (forward + backward + AdamW) and one sampling step (a forward pass under
``inference_mode``) on 28 x 28 x 1 images at the same batch, with the peers sized to the same parameter
count as difflab's CPU recipe U-Net. Each peer runs as its users run it (NCHW) and with channels-last;
the faster of the two counts. Reports images/s, the ratio to the faster peer, and the achieved GFLOP/s
against the machine's measured fp32 matmul GFLOP/s.

    python benchmarks/unet_speed.py [--batch 128] [--repeats 5] [--json out.json]

Peers (test-only, not dependencies): ``pip install diffusers`` and
``pip install --no-deps denoising-diffusion-pytorch einops ema-pytorch`` (torchvision and accelerate,
which it imports only for its Trainer, are stubbed here).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from difflab.models.unet import UNet, count_parameters  # noqa: E402


@functools.cache
def load_lucidrains_unet() -> type:
    """Import denoising_diffusion_pytorch's Unet without running its package __init__ (which needs
    torchvision and accelerate for the Trainer): stub those two and load the module file directly."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.utils", "accelerate"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    sys.modules["accelerate"].Accelerator = object
    spec = importlib.util.find_spec("denoising_diffusion_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps denoising-diffusion-pytorch einops ema-pytorch")
    package = types.ModuleType("denoising_diffusion_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["denoising_diffusion_pytorch"] = package
    module_path = Path(package.__path__[0]) / "denoising_diffusion_pytorch.py"
    module_spec = importlib.util.spec_from_file_location(
        "denoising_diffusion_pytorch.denoising_diffusion_pytorch", module_path
    )
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module.Unet


def diffusers_unet(base: int) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=(base, 2 * base, 2 * base),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def lucidrains_unet(dim: int) -> torch.nn.Module:
    unet_class = load_lucidrains_unet()
    return unet_class(dim=dim, dim_mults=(1, 2, 2), channels=1, flash_attn=False)


def matched(build: Callable[[int], torch.nn.Module], target: int, widths: range) -> tuple[int, torch.nn.Module]:
    """The width whose parameter count is closest to ``target``."""
    best = min(widths, key=lambda w: abs(count_parameters(build(w)) - target))
    return best, build(best)


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def flops(call: Callable[[], torch.Tensor], backward: bool) -> float:
    with FlopCounterMode(display=False) as counter:
        out = call()
        if backward:
            out.float().square().mean().backward()
    return float(counter.get_total_flops())


class Contender:
    def __init__(self, name: str, model: torch.nn.Module, forward: Callable, batch: int, channels_last: bool) -> None:
        self.name = name
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.forward = forward
        self.batch = batch
        self.x = torch.randn(batch, 1, 28, 28)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.t = torch.randint(0, 1000, (batch,))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.train_times: list[float] = []
        self.sample_times: list[float] = []

    def train_step(self) -> float:
        start = time.perf_counter()
        loss = self.forward(self.model, self.x, self.t).square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start

    def sample_step(self) -> float:
        with torch.inference_mode():
            start = time.perf_counter()
            self.forward(self.model, self.x, self.t)
            return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument("--recipe", default="mnist-ddpm", help="whose CPU-config U-Net to measure (default mnist-ddpm)")
    parser.add_argument("unet", nargs="*", help="overrides of that U-Net, e.g. base_channels=24 channel_mults=[1,2,4]")
    args = parser.parse_args()
    torch.manual_seed(0)

    from difflab.config import config_from
    from difflab.experiments import recipes

    recipe_config = config_from(recipes()[args.recipe].config_class(), None, [f"unet.{o}" for o in args.unet])
    ours_config = recipe_config.unet
    ours = UNet(ours_config)
    target = count_parameters(ours)
    base, diffusers_model = matched(diffusers_unet, target, range(16, 129, 8))
    dim, lucid_model = matched(lucidrains_unet, target, range(8, 97, 2))

    def call_ours(m, x, t):
        return m(x, t)

    def call_diffusers(m, x, t):
        return m(x, t).sample

    def call_lucid(m, x, t):
        return m(x, t)

    contenders = []
    for name, model, call in (
        ("difflab UNet", ours, call_ours),
        ("diffusers UNet2DModel", diffusers_model, call_diffusers),
        ("denoising-diffusion-pytorch Unet", lucid_model, call_lucid),
    ):
        import copy

        contenders.append(Contender(f"{name} (NCHW)", copy.deepcopy(model), call, args.batch, False))
        contenders.append(Contender(f"{name} (channels-last)", copy.deepcopy(model), call, args.batch, True))

    for contender in contenders:  # warm-up
        for _ in range(2):
            contender.train_step()
            contender.sample_step()
    for _ in range(args.repeats):  # interleaved, so machine noise hits everyone alike
        for contender in contenders:
            contender.train_times.append(contender.train_step())
            contender.sample_times.append(contender.sample_step())

    peak = matmul_gflops()
    rows = []
    for contender in contenders:
        train_s = statistics.median(contender.train_times)
        sample_s = statistics.median(contender.sample_times)
        train_flops = flops(lambda c=contender: c.forward(c.model, c.x, c.t), backward=True)
        with torch.inference_mode():
            sample_flops = flops(lambda c=contender: c.forward(c.model, c.x, c.t), backward=False)
        rows.append(
            {
                "name": contender.name,
                "parameters": count_parameters(contender.model),
                "train_images_per_s": contender.batch / train_s,
                "sample_images_per_s": contender.batch / sample_s,
                "train_gflops": train_flops / train_s / 1e9,
                "sample_gflops": sample_flops / sample_s / 1e9,
                "gflop_per_image_forward": sample_flops / contender.batch / 1e9,
            }
        )
    ours = [r for r in rows if r["name"].startswith("difflab")]
    peers = [r for r in rows if not r["name"].startswith("difflab")]
    ours_train = max(r["train_images_per_s"] for r in ours)
    ours_sample = max(r["sample_images_per_s"] for r in ours)
    best_train = max(r["train_images_per_s"] for r in peers)
    best_sample = max(r["sample_images_per_s"] for r in peers)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"peers sized to {target:,} parameters (diffusers base {base}, denoising-diffusion-pytorch dim {dim}); "
        f"machine fp32 matmul {peak:.0f} GFLOP/s"
    )
    print(
        "| model | parameters | train images/s | sampling images/s (NFE/s) | train GFLOP/s | sampling GFLOP/s "
        "| GFLOP per image (fwd) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['parameters']:,} | {r['train_images_per_s']:.1f} | {r['sample_images_per_s']:.1f} "
            f"| {r['train_gflops']:.1f} | {r['sample_gflops']:.1f} | {r['gflop_per_image_forward']:.3f} |"
        )
    print(
        f"\ndifflab / faster peer (each in its faster layout): training {ours_train / best_train:.2f}x, "
        f"sampling {ours_sample / best_sample:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": rows,
                    "matmul_gflops": peak,
                    "batch": args.batch,
                    "train_ratio": ours_train / best_train,
                    "sample_ratio": ours_sample / best_sample,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
