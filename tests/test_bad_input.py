"""Bad input found by a robustness audit (2026-12-06): each case must stop with one line on stderr and exit status
2, before any work where the input is a setting, and without touching the outputs of an earlier command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from difflab.cli import main
from difflab.data.images import load_image_folder
from difflab.training.logging import read_all_series, read_series

TINY_SWISSROLL = [
    "progress=false",
    "denoiser_train.steps=5",
    "denoiser_train.eval_every=5",
    "sampling.n=50",
    "data.n_train=200",
    "data.n_heldout=200",
    "denoiser.hidden=[16]",
    "figures.trajectory_points=10",
]
DIGITS = ["data.source=digits", "progress=false", "train.steps=2", "unet.base_channels=8"]


def fails_in_one_line(capsys, argv: list[str]) -> str:
    """Run the CLI; assert exit status 2 and a single stderr line without a traceback; return that line."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors exit from inside the parser
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def swissroll_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "swissroll"
    assert main(["run", "swissroll", f"run_dir={run_dir}", *TINY_SWISSROLL]) == 0
    return run_dir


@pytest.mark.parametrize(
    ("recipe", "overrides", "expected"),
    [
        ("swissroll", ["sampling.n=0"], "sampling.n must be >= 3 (a KDE of the samples)"),
        ("swissroll", ["sampling.n=2"], "sampling.n must be >= 3 (a KDE of the samples)"),
        ("swissroll", ["data.n_train=2"], "data needs n_train >= 10, n_heldout >= 10 and val_fraction in (0, 1)"),
        ("swissroll", ["data.val_fraction=0"], "val_fraction in (0, 1), got 5000, 5000 and 0"),
        ("swissroll-ncsn", ["data.val_fraction=1"], "val_fraction in (0, 1)"),
        ("states", ["data.val_fraction=0"], "data needs heldout_fraction and val_fraction in (0, 1)"),
        ("mnist-ddpm", [*DIGITS, "schedule.max_beta=1"], "schedule needs 0 < max_beta < 1"),
        ("states", ["sampling.n_cond=1"], "n_cond 0 or >= 3"),
        ("mnist-ddpm", [*DIGITS, "metrics.n_ddpm=1"], "n_ddpm 0 or >= 2 (a FID needs two samples)"),
        ("swissroll", ["figures.reverse_steps=[]"], "figures.reverse_steps must be a non-empty list"),
        ("swissroll", ["figures.forward_steps=[0,500]"], "timesteps in [0, 100]"),
        ("swissroll", ["sampling.steps=200"], "sampling.steps must be in 0..100 (schedule.num_timesteps; 0 = all)"),
        ("swissroll", ["sampling.eta=-1"], "sampling.eta must be >= 0"),
        ("swissroll", ["sampling.eta=0.5"], "sampling.sampler=ddpm runs all T steps"),  # it was ignored
        ("swissroll", ["sampling.steps=20"], "set sampling.steps=0 and sampling.eta=0, or sampling.sampler=ddim"),
        ("states", ["sampling.cond_sampler=ddpm"], "sampling.cond_sampler=ddpm runs all T steps"),
        ("swissroll", ["seed=1e30"], "seed must be an integer within +-2^63"),
        ("swissroll", ["denoiser_train.batch_size=1e30"], "denoiser_train.batch_size must be an integer within"),
        ("swissroll", ["recipe=spiral"], "the config names recipe 'spiral' but the command asked for 'swissroll'"),
        ("swissroll", ["run_dir="], "run_dir is empty: name a folder (the default is runs/swissroll)"),
        ("moons", ["denoiser.hidden=[64,0]"], "denoiser: hidden layer widths must be >= 1, got [64, 0]"),
        ("states", ["sampling.cond_steps=900"], "sampling.cond_steps must be in 0..500 (schedule.num_timesteps; 0"),
        ("states", ["sampling.ddpm_variance=large"], "sampling.ddpm_variance must be one of beta, posterior"),
        ("mnist-ddpm", [*DIGITS, "schedule.num_timesteps=10"], "metrics.ddim_steps=50 exceeds"),
        ("mnist-ddpm", [*DIGITS, "unet.time_embedding_dim=-1"], "unet.time_embedding_dim must be >= 0"),
        ("mnist-ddpm", [*DIGITS, "unet.time_scale=0"], "unet.time_scale must be a positive finite number"),
        ("mnist-ddpm", [*DIGITS, "unet.time_scale=-1"], "unet.time_scale must be a positive finite number"),
        ("mnist-ddpm", [*DIGITS, "data.channels=-1"], "data.channels must be 0 (infer), 1 or 3"),
        ("mnist-ddpm", [*DIGITS, "unet.cross_attention_levels=[0]"], "set unet.class_conditioning=cross or both"),
        ("mnist-cfg", [*DIGITS, "guidance.n_sweep=0"], "guidance.n_sweep >= 2"),
        ("mnist-cfg", [*DIGITS, "guidance.grid_per_digit=0"], "guidance.grid_per_digit and guidance.steps"),
        # the audit of 2026-12-07: these were refused only after training
        ("mnist-cfg", [*DIGITS, "guidance.sampler=nope"], "guidance.sampler='nope' is not a sampler; choose one of"),
        ("mnist-ldm", ["data.source=digits", "evaluation.ddim_steps=[50,5000]"], "evaluation.ddim_steps=5000 exceeds"),
        ("mnist-ldm", ["data.source=digits", "evaluation.respaced_steps=5000"], "evaluation.respaced_steps=5000"),
        ("states-ncsn", ["figures.grid=0"], "figures.grid must be >= 2"),
        ("states-ncsn", ["data.n_train=200"], "states-ncsn trains on the shipped STATES points: data.n_train does not"),
        ("swissroll-ncsn", ["figures.trajectory_levels=[]"], "must list at least one noise level"),
        ("mnist-ncsn", ["data.source=digits", "unet.num_classes=-1"], "unet.num_classes >= 0"),
        ("mnist-ncsn", ["data.source=digits", "unet.in_channels=0"], "unet.in_channels and unet.out_channels"),
        ("mnist-ncsn", ["data.source=digits", "unet.cross_attention_levels=[0]"], "unet.class_conditioning=cross"),
        ("mnist-ncsn", ["data.source=digits", "sweep.grid_per_cell=0"], "sweep.grid_per_cell must be >= 1"),
        ("rgb2ir", ["regressor.unet.out_channels=-1"], "regressor.unet: unet.in_channels and unet.out_channels"),
        ("rgb2ir", ["inversion.unet.cross_attention_levels=[0]"], "set inversion.unet.class_conditioning=cross"),
    ],
)
def test_settings_that_used_to_fail_deep_inside_are_refused_up_front(
    tmp_path: Path, capsys, recipe: str, overrides: list[str], expected: str
) -> None:
    run_dir = tmp_path / "run"
    line = fails_in_one_line(capsys, ["run", recipe, f"run_dir={run_dir}", *overrides])
    assert expected in line
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_wrong_inception_weights_are_refused_before_the_run_folder_exists(tmp_path: Path, capsys) -> None:
    """They were read only when the evaluator was built, after the folder was made (a skeleton marked failed)."""
    junk = tmp_path / "junk.pth"
    junk.write_text("junk")
    run = ["run", "mnist-ddpm", f"run_dir={tmp_path / 'run'}", f"metrics.inception_weights={junk}"]
    line = fails_in_one_line(capsys, run)
    assert f"cannot read InceptionV3 weights {junk} (it is not a torch file, or is damaged" in line
    assert not (tmp_path / "run").exists()


def test_the_recipe_may_come_from_the_config_file(tmp_path: Path, capsys) -> None:
    """``difflab run --config my.yaml run_dir=R`` once read ``run_dir=R`` as the recipe's name."""
    assert main(["config", "swissroll"]) == 0
    config = tmp_path / "my.yaml"
    config.write_text(capsys.readouterr().out)
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config), f"run_dir={run_dir}", *TINY_SWISSROLL]) == 0
    assert "[swissroll] training into run folder" in capsys.readouterr().out
    assert (run_dir / "checkpoints" / "denoiser.safetensors").is_file()
    assert "name a recipe (see `difflab recipes`) or give --config FILE" in fails_in_one_line(capsys, ["run"])
    (tmp_path / "bare.yaml").write_text("seed: 1\n")
    line = fails_in_one_line(capsys, ["run", "--config", str(tmp_path / "bare.yaml"), f"run_dir={run_dir}"])
    assert "bare.yaml names no recipe: name one on the command line" in line


def test_a_config_file_of_another_recipe_is_refused_as_such(tmp_path: Path, capsys) -> None:
    """``difflab config states > my.yaml; difflab run moons --config my.yaml`` names the two recipes, not the first
    of the states keys that moons does not have."""
    assert main(["config", "states"]) == 0
    config = tmp_path / "my.yaml"
    config.write_text(capsys.readouterr().out)
    line = fails_in_one_line(capsys, ["run", "moons", "--config", str(config), f"run_dir={tmp_path / 'run'}"])
    assert "the config names recipe 'states' but the command asked for 'moons'" in line
    assert not (tmp_path / "run").exists()


def test_command_line_values_are_checked_in_one_line(swissroll_run: Path, tmp_path: Path, capsys) -> None:
    run = str(swissroll_run)
    assert "must be a finite number" in fails_in_one_line(capsys, ["sample", run, "--eta", "nan"])
    assert "must be a finite number" in fails_in_one_line(capsys, ["likelihood", run, "--rtol", "nan"])  # once a hang
    assert "--option eta must be a finite number" in fails_in_one_line(capsys, ["sample", run, "--option", "eta=inf"])
    assert "a port is 0 to 65535" in fails_in_one_line(capsys, ["serve", run, "--port", "70000"])
    assert "invalid int value" in fails_in_one_line(capsys, ["sample", run, "--seed", "abc"])  # argparse: one line
    assert "is a folder" in fails_in_one_line(capsys, ["sample", run, "--out", str(tmp_path)])
    # --out x.png writes x.pt too: a folder there once failed after x.png was written, with a torch traceback
    (tmp_path / "taken.pt").mkdir()
    line = fails_in_one_line(capsys, ["sample", run, "--n", "10", "--out", str(tmp_path / "taken.png")])
    assert "would write" in line and "taken.pt, which is a folder" in line
    assert not (tmp_path / "taken.png").exists()
    (tmp_path / "plain").write_text("x")
    line = fails_in_one_line(capsys, ["sample", run, "--n", "10", "--out", str(tmp_path / "plain" / "x.png")])
    assert "plain is a file, not a folder" in line
    # sampler options out of their range, found by an edge-case audit (rho=0 was a ZeroDivisionError traceback)
    euler = ["sample", run, "--sampler", "euler", "--steps", "3", "--n", "10"]
    assert "rho must be finite and > 0, got 0" in fails_in_one_line(capsys, [*euler, "--option", "rho=0"])
    assert "rho=0.001 is too small" in fails_in_one_line(capsys, [*euler, "--option", "rho=0.001"])
    ancestral = ["sample", run, "--sampler", "euler-a", "--steps", "3", "--n", "10", "--option", "eta=-1"]
    assert "eta must be finite and >= 0, got -1" in fails_in_one_line(capsys, ancestral)
    heun = ["sample", run, "--sampler", "heun", "--steps", "3", "--n", "10", "--option", "churn=-1"]
    assert "heun needs churn >= 0" in fails_in_one_line(capsys, heun)
    sde = ["sample", run, "--sampler", "dpmpp-2m-sde", "--steps", "3", "--eta", "0.5", "--option", "eta=1"]
    assert "give eta once" in fails_in_one_line(capsys, sde)
    full = ["compare-samplers", run, "--samplers", "ddim", "--nfe", "3", "--full", "ddpm"]
    assert "--full ddpm: not among the compared samplers (ddim)" in fails_in_one_line(capsys, full)
    wrapped = ["sample", run, "--seed", str(2**64 - 1)]  # it once gave --seed -1's samples under another name
    assert "a seed is an integer within +-2^63" in fails_in_one_line(capsys, wrapped)
    # An --n beyond the held-out set is scored on all of it, and says so (2-D likelihood: 200 points, loose ODE).
    assert main(["likelihood", run, "--n", "100000000", "--rtol", "1e-2", "--atol", "1e-2"]) == 0
    assert "(--n 100000000: the run holds 200 held-out points, all scored)" in capsys.readouterr().out
    # --out may not overwrite the run's own files (it once wrote samples over the trained weights, exit 0).
    weights = swissroll_run / "checkpoints" / "denoiser.safetensors"
    before = weights.read_bytes()
    assert "give a .pt or .png" in fails_in_one_line(capsys, ["sample", run, "--out", str(weights)])
    for target in ("checkpoints/denoiser.pt", "figures/samples.png", "run.pt"):
        line = fails_in_one_line(capsys, ["sample", run, "--out", str(swissroll_run / target)])
        assert "among the run's own files" in line, line
    assert weights.read_bytes() == before and not (swissroll_run / "checkpoints" / "denoiser.pt").exists()
    # one sample is drawn and saved, and said to be too few to score (it once failed after writing the file)
    assert main(["sample", run, "--n", "1", "--steps", "3"]) == 0
    assert "not scored: n = 1: the scores need at least 3 samples" in capsys.readouterr().out
    # nor the recipe's samples (they once became 10 points, which `likelihood` then read as the run's samples)
    samples = swissroll_run / "samples" / "samples.pt"
    before = samples.read_bytes()
    line = fails_in_one_line(capsys, ["sample", run, "--n", "10", "--out", str(samples)])
    assert "would overwrite" in line and samples.read_bytes() == before
    (tmp_path / "file").write_text("x")
    line = fails_in_one_line(capsys, ["run", "swissroll", f"run_dir={tmp_path / 'file'}"])
    assert "is a file, not a folder" in line
    assert "is a folder, not a YAML file" in fails_in_one_line(capsys, ["run", "swissroll", "--config", str(tmp_path)])


def test_compare_samplers_refuses_a_plan_with_nothing_to_draw_before_writing(swissroll_run: Path, capsys) -> None:
    out = swissroll_run / "compare_samplers"
    shutil.rmtree(out, ignore_errors=True)
    run = str(swissroll_run)
    assert "names none" in fails_in_one_line(capsys, ["compare-samplers", run, "--samplers", ","])
    line = fails_in_one_line(capsys, ["compare-samplers", run, "--samplers", "ddim", "--nfe", "10000", "--no-full"])
    assert "a budget buys at most T steps" in line and "T = 100" in line
    assert not out.exists()


def test_damaged_run_folders_are_named_not_tracebacks(swissroll_run: Path, tmp_path: Path, capsys) -> None:
    def copy(name: str) -> Path:
        return Path(shutil.copytree(swissroll_run, tmp_path / name))

    listed = copy("listed")
    (listed / "run.json").write_text("[1]")
    for command in ("sample", "likelihood", "report"):
        assert "run.json is damaged (not a JSON object)" in fails_in_one_line(capsys, [command, str(listed)])
    nameless = copy("nameless")
    (nameless / "run.json").write_text(json.dumps({"status": "complete"}))
    assert "it names no recipe" in fails_in_one_line(capsys, ["report", str(nameless)])
    empty = copy("empty")
    (empty / "config.yaml").write_text("")
    assert "empty or names no recipe" in fails_in_one_line(capsys, ["sample", str(empty)])
    # a report from this difflab's defaults would describe another run
    assert "config.yaml is missing, empty or of another recipe" in fails_in_one_line(capsys, ["report", str(empty)])
    bogus = copy("bogus")  # a bad key in the run's own config.yaml is named as the file's, not a command-line one's
    (bogus / "config.yaml").write_text((bogus / "config.yaml").read_text() + "bogus: 1\n")
    line = fails_in_one_line(capsys, ["sample", str(bogus)])
    assert f"{bogus / 'config.yaml'}: unknown config key 'bogus'" in line
    numbers = copy("numbers")
    (numbers / "metrics.json").write_text("[1, 2]")
    assert "metrics.json is damaged" in fails_in_one_line(capsys, ["report", str(numbers)])
    record = copy("record")
    (record / "checkpoints" / "denoiser.json").write_text("[]")
    assert "denoiser.json must hold a JSON object" in fails_in_one_line(capsys, ["sample", str(record)])
    (record / "checkpoints" / "denoiser.json").write_bytes(b"\xff\xfe{")
    assert "denoiser.json is not valid JSON" in fails_in_one_line(capsys, ["sample", str(record)])
    other = copy("other")
    line = fails_in_one_line(capsys, ["run", "spiral", f"run_dir={other}", *TINY_SWISSROLL])
    assert "holds a 'swissroll' run, not a 'spiral' one" in line
    (other / "config.yaml").write_text("a: [")
    line = fails_in_one_line(capsys, ["run", "swissroll", f"run_dir={other}", *TINY_SWISSROLL])
    assert "has a damaged config.yaml" in line


def test_a_binary_metrics_log_is_read_around_and_the_report_rebuilds(swissroll_run: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(swissroll_run, tmp_path / "run"))
    log = run / "metrics.jsonl"
    steps, values = read_series(log, "denoiser/train_loss")
    assert steps
    log.write_bytes(b"\x83\xff garbage\n[1]\n" + log.read_bytes() + b'\n"text"\n\x00\x01')
    assert read_series(log, "denoiser/train_loss") == (steps, values)
    assert "denoiser/train_loss" in read_all_series(log)
    assert main(["report", str(run)]) == 0


def test_images_beside_class_subfolders_are_reported_as_such(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        Image.new("L", (8, 8), 40).save(tmp_path / name / "x.png")
    Image.new("L", (8, 8), 90).save(tmp_path / "loose.png")
    (tmp_path / "notes.txt").write_text("x")
    said: list[str] = []
    images = load_image_folder(tmp_path, 8, echo=said.append)
    assert len(images) == 2 and images.class_names == ("a", "b")
    assert any("1 image(s) outside the class subfolders" in line and "loose.png" in line for line in said)
    assert any("1 non-image file(s)" in line and "notes.txt" in line for line in said)
