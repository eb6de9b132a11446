"""Scaling out: data-parallel training over processes, gradient accumulation, bf16/fp16 and torch.compile.

Where the maths says two ways of running a step compute the same thing (one batch vs N micro-batches, one
process vs two), the tests ask for the same numbers up to float32 rounding; where it does not (bf16), they
ask for a loss close to fp32's and for learning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import difflab
from difflab.cli import main
from difflab.data.batches import ShuffledBatches
from difflab.diffusion.objectives import epsilon_loss
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.models.mlp import DenoiserMLP
from difflab.seeding import RowGenerator, batch_randint, batch_randn
from difflab.training import distributed
from difflab.training import precision as precision_module
from difflab.training import trainer as trainer_module
from difflab.training.distributed import DistContext, sample_sharded, shard_range, shard_seed
from difflab.training.logging import RunLogger, read_series
from difflab.training.trainer import TrainConfig, Trainer

SCHEDULE = NoiseSchedule.linear(100, 1e-3, 0.2)
SRC = Path(difflab.__file__).resolve().parent.parent

# float32 rounding only: a mean over 256 rows split into parts, or gradients averaged over ranks, differs from
# the one-piece sum in the last bits (~1e-7 relative); 20-60 AdamW steps keep that far below 1e-5.
SAME_MATHS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and two threads crawl when other processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data(n: int = 1024) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    angle = torch.rand(n, generator=generator) * 6.28
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=generator)


def make_trainer(run_dir: Path, steps: int, hidden=(64, 64), context: DistContext | None = None, **overrides):
    torch.manual_seed(0)
    model = DenoiserMLP(2, hidden, 100)
    echo = overrides.pop("echo", lambda message: None)
    settings = {"steps": steps, "batch_size": 256, "lr": 3e-3, "warmup_steps": 5, "log_every": 1, **overrides}
    config = TrainConfig(**{"eval_every": 1000, "checkpoint_every": 1000, **settings})
    return Trainer(
        "denoiser",
        model,
        lambda net, batch, generator: epsilon_loss(net, SCHEDULE, batch[0], generator),
        ShuffledBatches((data(),), config.batch_size, seed=1),
        config,
        run_dir,
        RunLogger(run_dir, tensorboard=False),
        seed=3,
        show_progress=False,
        echo=echo,
        distributed_context=context,
    )


def losses(run_dir: Path) -> list[float]:
    return read_series(run_dir / "metrics.jsonl", "denoiser/train_loss")[1]


def test_row_generators_slice_the_whole_batch_draw() -> None:
    full_t = torch.randint(0, 100, (12,), generator=torch.Generator().manual_seed(7))
    full_noise = torch.randn((12, 3), generator=torch.Generator().manual_seed(7).set_state(_after_randint(7)))
    pieces_t, pieces_noise, plain = [], [], []
    for start in (0, 4, 8):
        generator = RowGenerator.for_rows(7, start, start + 4, 12)
        pieces_t.append(batch_randint(100, 4, generator, "cpu"))
        pieces_noise.append(batch_randn((4, 3), generator, "cpu"))
        plain.append(torch.randn(4, generator=generator))
    assert torch.equal(torch.cat(pieces_t), full_t)
    assert torch.equal(torch.cat(pieces_noise), full_noise)
    assert not torch.equal(plain[0], plain[1])  # direct draws are independent per slice
    with pytest.raises(ValueError, match="whole micro-batch"):
        batch_randn((3, 3), RowGenerator.for_rows(7, 0, 4, 12), "cpu")


def _after_randint(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    torch.randint(0, 100, (12,), generator=generator)
    return generator.get_state()


def _split_draws(function, rows: int, parts: int, seed: int = 5) -> tuple[list, list]:
    """``function(start, stop, generator)`` on the whole batch (the single-process generator) and on each part."""
    whole = function(0, rows, torch.Generator().manual_seed(seed))
    size = rows // parts
    pieces = [
        function(k * size, (k + 1) * size, RowGenerator.for_rows(seed, k * size, (k + 1) * size, rows))
        for k in range(parts)
    ]
    return whole, pieces


def test_every_training_loss_is_the_same_function_of_the_global_batch() -> None:
    """The DSM, autoencoder and rgb2ir crop draws are per example, so micro-batches or ranks see the draws of
    the whole batch: the mean of the parts' losses is the whole batch's loss."""
    from difflab.diffusion.score_matching import dsm_loss, geometric_sigmas
    from difflab.models.autoencoder import AutoencoderConfig, KLAutoencoder
    from difflab.models.score import ScoreMLP
    from difflab.training.autoencoder import autoencoder_loss, random_crops

    torch.manual_seed(0)
    points, images = data(8), torch.rand(8, 1, 12, 12) * 2 - 1
    score, sigmas = ScoreMLP(2, (16, 16)), geometric_sigmas(1.0, 0.01, 10)
    autoencoder = KLAutoencoder(AutoencoderConfig(base_channels=8, channel_mults=(1, 2), norm_groups=4))
    losses = {
        "dsm": lambda a, b, g: dsm_loss(score, points[a:b], sigmas, g),
        "autoencoder": lambda a, b, g: autoencoder_loss(autoencoder, images[a:b], g, kl_weight=1.0)[0],
    }
    with torch.no_grad():
        for name, loss in losses.items():
            whole, pieces = _split_draws(loss, 8, 2)
            torch.testing.assert_close(torch.stack(pieces).mean(), whole, rtol=SAME_MATHS_RTOL, atol=0, msg=name)
    whole, pieces = _split_draws(lambda a, b, g: random_crops(images[a:b], 8, g), 8, 4)
    assert torch.equal(torch.cat(pieces), whole)


def test_grad_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    """4 micro-batches of 64 (losses scaled by 1/4) give the weights of one batch of 256."""
    whole = make_trainer(tmp_path / "whole", 40, ema_decay=0.9)
    whole.fit()
    accumulated = make_trainer(tmp_path / "accum", 40, ema_decay=0.9, grad_accum=4)
    accumulated.fit()
    for a, b in zip(whole.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=SAME_MATHS_RTOL, atol=1e-6)
    for a, b in zip(whole.ema.state_dict().values(), accumulated.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=SAME_MATHS_RTOL, atol=1e-6)
    torch.testing.assert_close(losses(tmp_path / "accum"), losses(tmp_path / "whole"), rtol=SAME_MATHS_RTOL, atol=0)
    assert losses(tmp_path / "whole")[-1] < losses(tmp_path / "whole")[0]
    with pytest.raises(ConfigError, match=r"batch_size \(256\) must be divisible by grad_accum \(3\)"):
        TrainConfig(batch_size=256, grad_accum=3)


def test_global_batch_must_split_over_processes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="global batch and must be divisible by processes x grad_accum = 3 x 1"):
        make_trainer(tmp_path, 5, context=DistContext(rank=0, world_size=3))


def test_bf16_is_close_to_fp32_and_learns(tmp_path: Path) -> None:
    make_trainer(tmp_path / "fp32", 120).fit()
    make_trainer(tmp_path / "bf16", 120, precision="bf16").fit()
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    # Same weights and batch at step 1: bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%) per op.
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 2e-2
    assert sum(bf16[-10:]) / 10 < 0.75 * sum(bf16[:5]) / 5
    assert abs(sum(bf16[-10:]) - sum(fp32[-10:])) / sum(fp32[-10:]) < 0.1


def test_bf16_on_a_cpu_that_emulates_it_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native = tmp_path / "native"
    native.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    emulated = tmp_path / "emulated"
    emulated.write_text("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n")
    assert trainer_module.cpu_has_native_bf16(native)
    assert not trainer_module.cpu_has_native_bf16(emulated)
    assert not trainer_module.cpu_has_native_bf16(tmp_path / "no-such-file")
    for has_bf16, expected in ((True, 0), (False, 1)):
        monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda has=has_bf16: has)
        said: list[str] = []
        make_trainer(tmp_path / f"run{has_bf16}", 5, precision="bf16", echo=said.append)
        assert sum("is emulated and may train slower than precision=fp32" in line for line in said) == expected
        said.clear()
        make_trainer(tmp_path / f"fp32-{has_bf16}", 5, echo=said.append)
        assert not any("emulated" in line for line in said)
        # precision=auto never emulates: it says which precision it picked.
        monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda has=has_bf16: has)
        said.clear()
        make_trainer(tmp_path / f"auto-{has_bf16}", 5, precision="auto", echo=said.append)
        picked, why = ("bf16", "it runs bf16 natively") if has_bf16 else ("fp32", "it has no native bf16")
        assert said == [f"[denoiser] precision=auto trains in {picked} on this cpu ({why})"]


def test_fp16_needs_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA GPU.*use precision=bf16"):
        make_trainer(tmp_path, 5, precision="fp16")
    with pytest.raises(ConfigError, match="precision must be one of fp32, bf16, fp16"):
        TrainConfig(precision="int8")


def test_compile_gives_the_eager_loss(tmp_path: Path) -> None:
    make_trainer(tmp_path / "eager", 8, hidden=(32,)).fit()
    compiled = make_trainer(tmp_path / "compiled", 8, hidden=(32,), compile=True)
    compiled.fit()
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"), rtol=SAME_MATHS_RTOL, atol=0)
    assert (tmp_path / "compiled" / "checkpoints" / "denoiser.safetensors").is_file()
    assert set(load_file(tmp_path / "compiled" / "checkpoints" / "denoiser.safetensors")) == set(
        compiled.model.state_dict()
    )  # the plain module's names, not the compiled wrapper's


def test_a_failing_compile_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(trainer_module, "_compile", lambda module: torch.compile(module, backend=broken_backend))
    torch._dynamo.reset()
    with pytest.raises(ConfigError) as info:
        make_trainer(tmp_path, 3, hidden=(8,), compile=True).fit()
    assert "compile=true failed" in str(info.value) and "compile=false" in str(info.value)
    assert "\n" not in str(info.value)


def test_sharding_helpers_on_one_process() -> None:
    assert [shard_range(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert shard_seed(123, 0) == 123 and shard_seed(123, 1) != 123
    samples = sample_sharded(lambda shard, count: torch.arange(count) + 100 * shard, 7)
    assert torch.equal(samples, torch.arange(7))
    assert distributed.on_main(lambda: 5) == 5
    assert distributed.current() == DistContext()


QUICK = [
    "progress=false",
    "device=cpu",
    "denoiser.hidden=[32,32]",
    "classifier.hidden=[32]",
    "denoiser_train.steps=20",
    "classifier_train.steps=10",
    "denoiser_train.log_every=1",
    "classifier_train.log_every=1",
    "denoiser_train.batch_size=256",
    "classifier_train.batch_size=256",
    "denoiser_train.checkpoint_every=10",
    "sampling.n_uncond=200",
    "sampling.n_cond=40",
    "sampling.cond_steps=10",
    "figures.prediction_map_steps=[1]",
]


def train_losses(path: Path) -> dict[tuple[str, int], float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [(r["tag"], r["step"]) for r in records]
    assert len(keys) == len(set(keys)), "a step was logged twice (more than one rank wrote)"
    return {(r["tag"], r["step"]): r["value"] for r in records if r["tag"].endswith("/train_loss")}


def test_torchrun_two_processes_match_one(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 -m difflab run states`` on gloo: the per-step losses of the same global
    batch match a single process (float rounding only), rank 0 alone writes, sampling is sharded."""
    two = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, "-m", "difflab", "run", "states", f"run_dir={two}", *QUICK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    worker_lines = [line for line in result.stderr.splitlines() if "terminate" in line or "rror" in line]
    assert result.returncode == 0, "\n".join(worker_lines[:20]) + "\n" + result.stderr[-1500:]
    assert result.stdout.count("report.md") == 1  # rank 0 alone speaks
    one = tmp_path / "one"
    assert main(["train", "states", f"run_dir={one}", *QUICK]) == 0

    single, double = train_losses(one / "metrics.jsonl"), train_losses(two / "metrics.jsonl")
    assert single.keys() == double.keys() and len(single) == 30
    for key, value in single.items():
        assert double[key] == pytest.approx(value, rel=SAME_MATHS_RTOL), key
    for name in ("denoiser", "classifier"):
        a = load_file(one / "checkpoints" / f"{name}.safetensors")
        b = load_file(two / "checkpoints" / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=SAME_MATHS_RTOL, atol=1e-6)

    assert json.loads((two / "run.json").read_text())["status"] == "complete"
    assert (two / "report.md").is_file() and (two / "metrics.json").is_file()
    event_files = list((two / "tensorboard").rglob("events.out.tfevents.*"))  # rank 0 alone writes them
    assert sorted(p.parent.name for p in event_files) == ["classifier", "denoiser"]
    samples = torch.load(two / "samples" / "uncond_gen_samples.pt", weights_only=True)
    assert samples.shape == (200, 2) and torch.isfinite(samples).all()
    assert not torch.allclose(samples[:100], samples[100:])  # two shards drawn with different seeds
    info = json.loads((two / "checkpoints" / "denoiser.json").read_text())
    assert info["step"] == 20


AUTOENCODER_QUICK = [
    "data.source=digits", "progress=false", "autoencoder.train.steps=30", "autoencoder.train.log_every=1",
]  # fmt: skip
STATES_NCSN_QUICK = [
    "progress=false", "model.hidden=[64,64]", "train.steps=30", "train.batch_size=256", "train.log_every=1",
    "sampling.n=100", "langevin.steps_per_level=3", "langevin.batch_size=25", "figures.grid=6",
]  # fmt: skip


LDM_QUICK = [
    "data.source=digits", "progress=false", "vae.training.model.base_channels=8",
    "vae.training.model.channel_mults=[1,2]", "vae.training.train.steps=30", "vae.training.train.log_every=1",
    "vae.eval_images=50", "schedule.num_timesteps=20", "unet.base_channels=8", "unet.num_res_blocks=1",
    "unet.attention_head_channels=8", "train.steps=10", "train.batch_size=32", "evaluation.n_samples=10",
    "evaluation.batch_size=10", "evaluation.vlb_images=4", "evaluation.ddim_steps=[3]", "evaluation.respaced_steps=3",
    "evaluation.throughput_batch=4", "guidance.sweep=[2]", "guidance.grid_per_digit=1",
]  # fmt: skip


RGB2IR_QUICK = [
    "progress=false", "data.size=16", "data.max_pairs=12", "data.test_fraction=0.25",
    "vae.training.model.base_channels=8", "vae.training.crop=0", "vae.training.train.steps=30",
    "vae.training.train.batch_size=8", "vae.training.train.log_every=1",
    "regressor.unet.base_channels=8", "regressor.unet.num_res_blocks=1", "regressor.train.steps=10",
    "regressor.train.batch_size=8",
]  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "network", "overrides"),
    [
        ("autoencoder", "autoencoder", AUTOENCODER_QUICK),
        ("states-ncsn", "score", STATES_NCSN_QUICK),
        ("mnist-ldm", "autoencoder", LDM_QUICK),  # its samples are drawn in shards, as mnist-ddpm's
        ("rgb2ir", "autoencoder", RGB2IR_QUICK),  # rank 0 writes the latent cache, the others read it
    ],
)
def test_torchrun_runs_more_recipes_as_one_process_would(tmp_path: Path, recipe, network, overrides) -> None:
    """The autoencoder (its loss runs the DDP wrapper's forward), the NCSN recipes, mnist-ldm and rgb2ir train
    data-parallel too: the same per-step losses as one process; rank 0 alone scores, reports, writes and speaks.
    Annealed Langevin sampling is split into batches over the ranks and gives the single process's samples."""
    two, one = tmp_path / "two", tmp_path / "one"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run(
        [*command, "-m", "difflab", "run", recipe, f"run_dir={two}", *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-1500:]
    assert result.stdout.count("run folder") == result.stdout.count("report: ") // 2 == 1  # rank 0 alone speaks
    assert main(["run", recipe, f"run_dir={one}", *overrides]) == 0
    single = read_series(one / "metrics.jsonl", f"{network}/train_loss")
    double = read_series(two / "metrics.jsonl", f"{network}/train_loss")
    assert single[0] == double[0] and len(single[0]) == 30
    assert double[1] == pytest.approx(single[1], rel=SAME_MATHS_RTOL)
    assert json.loads((two / "run.json").read_text())["status"] == "complete"
    assert (two / "report.html").is_file()
    if recipe == "states-ncsn":  # Langevin batches are dealt out over the ranks: the single process's samples
        a = torch.load(one / "samples" / "samples.pt", weights_only=True)
        b = torch.load(two / "samples" / "samples.pt", weights_only=True)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)  # the weights differ by float rounding only
