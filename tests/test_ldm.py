"""The mnist-ldm recipe on 8 x 8 digits: one latent model, the comparison table in the same folder (reusing the
autoencoder, the cached latents and the model), autoencoders from a run and from diffusers, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.diffusion.schedule import NoiseSchedule
from reportcheck import assert_rebuilds

TINY = [
    "data.source=digits",
    "progress=false",
    "vae.training.model.base_channels=8",
    "vae.training.model.channel_mults=[1,2]",
    "vae.training.train.steps=150",
    "vae.training.train.warmup_steps=10",
    "vae.training.train.lr=3e-3",
    "vae.training.train.eval_every=20",
    "vae.eval_images=100",
    "schedule.num_timesteps=20",
    "unet.base_channels=16",
    "unet.num_res_blocks=1",
    "unet.attention_head_channels=16",
    "train.steps=40",
    "train.batch_size=32",
    "train.warmup_steps=5",
    "train.eval_every=20",
    "train.lr=3e-3",
    "evaluation.n_samples=20",
    "evaluation.batch_size=20",
    "evaluation.vlb_images=16",
    "evaluation.ddim_steps=[5]",
    "evaluation.respaced_steps=5",
    "evaluation.throughput_batch=8",
    "guidance.sweep=[2]",
    "guidance.grid_per_digit=2",
    "table_config.pixel.schedule.num_timesteps=20",
    "table_config.pixel.train.steps=20",
    "table_config.pixel.train.warmup_steps=5",
    "table_config.pixel.unet.base_channels=8",
]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "ldm"
    assert main(["run", "mnist-ldm", f"run_dir={run_dir}", *TINY, "diffusion.learned_variance=true"]) == 0
    return run_dir


def test_one_latent_model_end_to_end(ldm_run: Path) -> None:
    metrics = json.loads((ldm_run / "metrics.json").read_text())
    assert metrics["latents"]["shape"] == [4, 4, 4] and not metrics["latents"]["cached"]
    assert list(metrics["models"]) == ["latent-cfg-learned"]
    assert [r["label"] for r in metrics["rows"]] == [
        "latent DDPM, w = 2",
        "latent DDIM-5, w = 2",
        "latent DDPM-5 respaced, w = 2",
    ]
    assert [r["network_evaluations"] for r in metrics["rows"]] == [20 * 20 * 2, 20 * 5 * 2, 20 * 5 * 2]
    assert metrics["vlb"]["latent-cfg-learned"]["variance"] == "learned"
    val = [r["value"] for r in records(ldm_run) if r["tag"] == "latent-cfg-learned/val_loss"]
    assert val[-1] < 0.95 * val[0]  # measured 0.92 between steps 20 and 40
    # ... and below the data-agnostic eps sqrt(1 - alpha_bar) x_t on the same held-out latents and timesteps, whose
    # expected MSE is alpha_bar (1 - alpha_bar) E[z_0^2] + alpha_bar^2; measured 0.801 against 0.925 (the linear
    # 20-step schedule of TINY noises little: alpha_bar_T = 0.82)
    cache = list((ldm_run / "latents").glob("latents-*.safetensors"))
    heldout = load_file(cache[0])["heldout"][:256].double()
    alpha_bar = NoiseSchedule.linear(20).alpha_bar.double()[torch.linspace(0, 19, 10).round().long()]
    agnostic = float((alpha_bar * (1 - alpha_bar) * heldout.square().mean() + alpha_bar.square()).mean())
    assert val[-1] < 0.92 * agnostic, (val[-1], agnostic)
    ae = [r["value"] for r in records(ldm_run) if r["tag"] == "autoencoder/val_l1"]
    assert ae[-1] < ae[0]
    # the autoencoder beats the 2 x 2 average pool of the same downsampling (13.7 dB / SSIM 0.76 on these digits,
    # test_autoencoder.py); measured 2026-12-06: 17.4 dB / 0.90 after 150 steps (12.7 dB / 0.69 after 60)
    reconstruction = metrics["autoencoder"]["reconstruction"]
    assert reconstruction["psnr"] > 15.5 and reconstruction["ssim"] > 0.85
    samples = torch.load(ldm_run / "samples" / "latent-cfg-learned_ddpmT_w2.pt", weights_only=True)
    assert samples["images"].shape == (20, 1, 8, 8) and samples["images"].abs().max() <= 1
    assert samples["labels"].tolist()[:3] == [0, 1, 2]
    assert len(cache) == 1 and metrics["latents"]["key"] in cache[0].name
    for name in [
        "report.md",
        "figures/reconstructions.png",
        "figures/grid_latent-cfg-learned.png",
        "figures/loss.png",
        "checkpoints/autoencoder.safetensors",
        "checkpoints/latent-cfg-learned.json",
    ]:
        assert (ldm_run / name).is_file(), name
    assert metrics["throughput"][0]["latent_step_seconds"] > 0
    assert metrics["throughput"][0]["model"] == "latent-cfg-learned"
    assert_rebuilds(ldm_run)


def test_the_table_reuses_the_folder(ldm_run: Path, capsys) -> None:
    assert main(["run", "mnist-ldm", "--table", f"run_dir={ldm_run}", *TINY, "diffusion.learned_variance=true"]) == 0
    out = capsys.readouterr().out
    assert "[autoencoder] resumed from step 150 of 150 (training already complete)" in out
    assert "[latent-cfg-learned] resumed from step 40 of 40 (training already complete)" in out
    metrics = json.loads((ldm_run / "metrics.json").read_text())
    assert metrics["latents"]["cached"]
    assert set(metrics["models"]) == {
        "pixel",
        "latent",
        "latent-cfg",
        "latent-cfg-cosine",
        "latent-cfg-learned",
        "latent-cfg-cosine-learned-attn",
    }
    labels = [r["label"] for r in metrics["rows"]]
    assert labels[:3] == ["pixel DDPM", "pixel DDIM-5", "latent DDPM"]
    assert "+ learned variance, w = 2, DDPM-5 respaced" in labels and "combined, w = 2" in labels
    assert metrics["models"]["latent-cfg-cosine"]["schedule"] == "cosine"
    reused = {r["label"] for r in metrics["rows"] if r["reused_samples"]}
    assert reused == {"+ learned variance, w = 2", "+ learned variance, w = 2, DDPM-5 respaced"}
    assert metrics["vlb"]["pixel"]["decoder"] == "discretized" and metrics["vlb"]["latent-cfg"]["decoder"] == "gaussian"
    assert metrics["vlb"]["pixel"]["decoder_levels"] == 17  # sklearn's digits: 0..16
    targets = [t["target"] for t in metrics["targets"]]
    assert any("VLB below the fixed-variance" in t for t in targets)
    assert any("throughput" in t for t in targets)
    assert [tp["model"] for tp in metrics["throughput"]] == ["latent-cfg", "pixel"]
    assert "## Results" in (ldm_run / "report.md").read_text()
    assert (ldm_run / "report.md").read_text().count("![Samples of ") == 6  # a grid per model, in the table's order
    assert_rebuilds(ldm_run)


def test_autoencoders_from_a_run_and_from_diffusers(tmp_path: Path, capsys) -> None:
    from diffusers import AutoencoderKL

    ae_dir = tmp_path / "ae"
    assert (
        main(
            [
                "run",
                "autoencoder",
                f"run_dir={ae_dir}",
                "data.source=digits",
                "progress=false",
                "autoencoder.model.base_channels=8",
                "autoencoder.model.channel_mults=[1,2]",
                "autoencoder.train.steps=10",
            ]
        )
        == 0
    )
    quick = [*TINY, "train.steps=5", "evaluation.vlb_images=0"]
    assert (
        main(["run", "mnist-ldm", f"run_dir={tmp_path / 'from-run'}", *quick, "vae.kind=run", f"vae.path={ae_dir}"])
        == 0
    )
    metrics = json.loads((tmp_path / "from-run" / "metrics.json").read_text())
    assert metrics["autoencoder"]["kind"] == "run" and metrics["latents"]["shape"] == [4, 4, 4]
    assert not (tmp_path / "from-run" / "checkpoints" / "autoencoder.safetensors").exists()
    # a 1-channel autoencoder for rgb2ir's 3-channel images is refused by name, before any run folder exists
    rgb2ir = ["run", "rgb2ir", f"run_dir={tmp_path / 'rgb2ir'}", "data.size=16", "vae.kind=run", f"vae.path={ae_dir}"]
    assert main(rgb2ir) == 2
    assert "holds a 1-channel autoencoder; these images have 3 channels" in capsys.readouterr().err
    assert not (tmp_path / "rgb2ir").exists()

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(tmp_path / "sd")
    assert (
        main(
            [
                "run",
                "mnist-ldm",
                f"run_dir={tmp_path / 'from-diffusers'}",
                *quick,
                "vae.kind=diffusers",
                f"vae.path={tmp_path / 'sd'}",
                "vae.scaling_factor=0.5",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "from-diffusers" / "metrics.json").read_text())
    assert metrics["autoencoder"]["scaling_factor"] == 0.5 and "diffusers" in metrics["autoencoder"]["description"]
    assert metrics["latents"]["shape"] == [4, 4, 4]


def test_bad_ldm_input(tmp_path: Path, capsys) -> None:
    assert main(["run", "mnist-ldm", "vae.kind=diffusers", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "needs vae.path" in capsys.readouterr().err
    assert (
        main(
            [
                "run",
                "mnist-ldm",
                "data.source=digits",
                "vae.kind=diffusers",
                f"vae.path={tmp_path / 'none'}",
                f"run_dir={tmp_path / 'r'}",
            ]
        )
        == 2
    )
    assert "local folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # a bad vae.path is refused before the run folder is made
    assert (
        main(
            [
                "run",
                "mnist-ldm",
                "data.source=digits",
                "vae.kind=run",
                f"vae.path={tmp_path}",
                f"run_dir={tmp_path / 'r2'}",
            ]
        )
        == 2
    )
    assert "not an autoencoder run" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    assert main(["run", "states", "--table"]) == 2
    assert "--table" in capsys.readouterr().err
    assert main(["run", "mnist-ldm", "table_config.combined_attention_levels=[4]"]) == 2
    assert "combined_attention_levels" in capsys.readouterr().err


def test_an_rgb_image_folder_runs_without_further_keys(tmp_path: Path, capsys) -> None:
    """The autoencoder's channels and the class count come from the data, as in the pixel recipes; an image size the
    autoencoder cannot halve is refused before the run folder exists, naming the recipe's own key."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for k in range(12):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{k}.png")
    quick = {
        "vae.training.train.steps": "4",
        "train.steps": "4",
        "vae.eval_images": "4",
        "evaluation.n_samples": "4",
        "evaluation.batch_size": "4",
        "evaluation.vlb_images": "2",
        "evaluation.throughput_batch": "2",
    }
    options = [o for o in TINY if o.split("=")[0] not in quick and o != "data.source=digits"]
    options += [f"{key}={value}" for key, value in quick.items()]
    folder = ["data.source=imagefolder", f"data.path={tmp_path / 'photos'}"]
    assert main(["run", "mnist-ldm", f"run_dir={tmp_path / 'odd'}", *options, *folder, "data.size=9"]) == 2
    said = capsys.readouterr().err
    assert "choose a data.size that 2 divides, or fewer vae.training.model.channel_mults" in said
    assert not (tmp_path / "odd").exists()
    run_dir = tmp_path / "run"
    assert main(["run", "mnist-ldm", f"run_dir={run_dir}", *options, *folder, "data.size=8"]) == 0
    printed = capsys.readouterr().out
    assert "from the data: vae.training.model.in_channels=3 unet.num_classes=2" in printed
    assert json.loads((run_dir / "classes.json").read_text()) == {"class_names": ["cats", "dogs"]}
    assert main(["sample", str(run_dir), "--class", "dogs", "--n", "2", "--steps", "3"]) == 0


def _learned_variance_metrics(full: tuple[float, float], respaced: tuple[float, float], n: int) -> dict:
    def row(steps: int, fid: float, std: float) -> dict:
        return {
            "label": f"DDPM-{steps}",
            "variant": "latent-cfg-learned",
            "sampler": "ddpm",
            "steps": steps,
            "w": 2.0,
            "n": n,
            "fid": fid,
            "fid_std": std,
            "train_seconds": 1.0,
        }

    return {
        "rows": [row(1000, *full), row(100, *respaced)],
        "models": {"latent-cfg-learned": {"learned_variance": True}},
        "autoencoder": {},
        "vlb": {},
        "throughput": [{"speedup_1000_steps": 12.0}],
    }


def test_the_respaced_target_prints_the_ratios_sampling_noise_and_says_when_n_cannot_tell():
    from difflab.experiments.ldm import MnistLDMConfig, ldm_targets

    def respaced_target(metrics: dict) -> dict:
        return next(t for t in ldm_targets(metrics, MnistLDMConfig()) if "respaced" in t["target"])

    # The n = 300 table: +13% with FID deviations of ~2.2 each -> ratio noise ~0.13, which cannot resolve 10%.
    small = respaced_target(_learned_variance_metrics((22.6, 2.2), (25.6, 2.3), 300))
    assert not small["met"] and small["value"] == pytest.approx(25.6 / 22.6) and not small["resolved"]
    assert small["noise"] == pytest.approx((25.6 / 22.6) * ((2.2 / 22.6) ** 2 + (2.3 / 25.6) ** 2) ** 0.5)
    assert "cannot tell" in small["target"] and "n = 300" in small["target"]
    # More samples: -3.5% with deviations of 0.6 -> ratio noise 0.05, resolved, met.
    large = respaced_target(_learned_variance_metrics((17.03, 0.6), (16.44, 0.6), 4000))
    assert large["met"] and "cannot tell" not in large["target"] and large["noise"] < 0.06 and large["resolved"]
    assert "<= 1.10" in large["target"] and "verdict holds beyond 2 sd" in large["target"]


def test_sampling_commands_load_a_latent_run_and_reproduce_its_samples(ldm_run: Path, capsys, unet_labels) -> None:
    # compare-samplers / sample / likelihood see the run's latent model through its loader: the same weights,
    # guidance (digits in turn, w = 2), x_0 bound and decoder reproduce the recipe's own DDIM-5 samples.
    from difflab.config import config_from
    from difflab.experiments.images import load_image_data
    from difflab.experiments.ldm import MnistLDMConfig, _finished_autoencoder
    from difflab.experiments.samplers import load_target
    from difflab.sampling.solvers import sample_ddim
    from difflab.seeding import mix_seed, seeded_generator
    from difflab.training.distributed import shard_seed

    target = load_target(ldm_run, "cpu")
    metrics = json.loads((ldm_run / "metrics.json").read_text())
    assert target.recipe == "mnist-ldm" and target.sample_shape == (4, 4, 4)
    assert target.model.clip_x0 == pytest.approx(metrics["evaluation"]["latent_clip_x0"])
    assert target.heldout is not None and target.heldout.shape[1:] == (4, 4, 4) and target.bin_width is None
    generator = seeded_generator(mix_seed(shard_seed(4321, 0), 0, 95), torch.device("cpu"))
    with torch.inference_mode():
        latents = sample_ddim(
            target.model, target.schedule, (20, 4, 4, 4), steps=5, spacing="leading", generator=generator
        )
    config = config_from(MnistLDMConfig(), ldm_run / "config.yaml")
    vae = _finished_autoencoder(config, ldm_run, load_image_data(config.data, config.seed)[0], torch.device("cpu"))
    with torch.inference_mode():
        decoded = vae.decode(latents).clamp(-1, 1)
    recorded = torch.load(ldm_run / "samples" / "latent-cfg-learned_ddim5_w2.pt", weights_only=True)["images"]
    assert torch.allclose(decoded, recorded, atol=1e-5)
    assert torch.allclose(target.decode(latents), recorded, atol=1e-5)
    # `difflab sample` on the run: latents and decoded images in the .pt, a decoded grid beside it.
    out = ldm_run / "sampled" / "dpmpp.pt"
    assert main(["sample", str(ldm_run), "--sampler", "dpmpp-2m", "--steps", "4", "--out", str(out)]) == 0
    saved = torch.load(out, weights_only=True)  # without --n a grid of 16, as for pixel models (not 5,000 points)
    assert saved["latents"].shape == (16, 4, 4, 4) and saved["images"].shape == (16, 1, 8, 8)
    assert saved["images"].abs().max() <= 1 and out.with_suffix(".png").is_file()
    # --digit / --guidance steer the conditional latent model: the label reaches every network call, the null
    # label only the unconditional half of guidance; the file name and the record say what was asked for.
    unet_labels.clear()
    assert main(["sample", str(ldm_run), "--digit", "3", "--guidance", "4", "--steps", "3", "--n", "5"]) == 0
    seen = unet_labels
    assert "dpmpp-2m: 3 steps" in capsys.readouterr().out
    steered = torch.load(ldm_run / "samples" / "dpmpp-2m-digit3-w4-3steps-seed0.pt", weights_only=True)
    assert steered["images"].shape == (5, 1, 8, 8) and steered["labels"].tolist() == [3] * 5  # for evaluate
    assert seen and all(set(labels.tolist()) == {3, 10} for labels in seen)
    assert main(["sample", str(ldm_run), "--digit", "10", "--steps", "3", "--n", "2"]) == 2
    assert "--digit must name a class or be an index 0 .. 9" in capsys.readouterr().err


def test_likelihood_of_a_latent_run_is_a_continuous_density_in_bits_per_latent_dimension(ldm_run: Path, capsys) -> None:
    assert main(["likelihood", str(ldm_run), "--n", "4", "--device", "cpu"]) == 0
    record = json.loads((ldm_run / "likelihood.json").read_text())["model"]
    assert record["dims"] == 4 * 4 * 4 and "continuous" in record["dequantization"]
    assert record["bits_per_dim"] == pytest.approx(record["nll_nats"] / (64 * math.log(2)))
    assert "kde" not in json.loads((ldm_run / "likelihood.json").read_text())
    # The learned-variance model's variational bound of the same 4 latents beside it: an upper bound on the NLL
    # (up to the estimators' noise), in the same units.
    bound = json.loads((ldm_run / "likelihood.json").read_text())["vlb"]
    assert bound["variance"] == "learned" and bound["n"] == 4
    assert bound["bits_per_dim"] > record["bits_per_dim"] - 0.2
    output = capsys.readouterr().out
    assert "bits/dim" in output and "variational bound" in output


def test_invert_a_latent_run(ldm_run: Path, capsys, unet_labels) -> None:
    """`difflab invert` on a mnist-ldm run: its held-out latents round-trip under the null-label latent model, closer
    with more steps; PSNR / SSIM are of the decoded round trip against the decoded original latent."""
    assert main(["invert", str(ldm_run), "--steps", "2", "10", "--n", "12", "--t-end", "15"]) == 0
    printed = capsys.readouterr().out
    assert "| latents | uniform | 1 | 10 |" in printed and f"report: {ldm_run / 'report.md'}" in printed
    assert "## DDIM round trips (difflab invert)" in (ldm_run / "report.md").read_text()
    result = json.loads((ldm_run / "inversion.json").read_text())
    coarse, fine = result["rows"]
    assert result["t_end"] == 15 and coarse["n"] == fine["n"] == 12 and fine["nfe"] == 20
    assert fine["latent_mse"] < coarse["latent_mse"] / 2 and fine["psnr_db"] > coarse["psnr_db"]
    assert all(set(labels.tolist()) == {10} for labels in unet_labels)  # the null label alone
    assert (ldm_run / "figures" / "inversion.png").is_file()
