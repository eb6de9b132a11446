"""DDIM inversion: exact for the exact eps of Gaussian data in the many-step limit, and round trips that
improve with the number of steps on a trained model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.diffusion.gaussian import GaussianData
from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.sampling.ddim import ddim_sample
from difflab.sampling.inversion import (
    adams_bashforth_flow,
    ddim_invert,
    ddim_round_trip,
    inversion_timesteps,
    logsnr_inversion_timesteps,
    round_trip_timesteps,
)
from test_samplers import float64_oracle

SCHEDULE = NoiseSchedule.linear(1000)
MEAN, STD = torch.tensor([1.0, -2.0]), 0.5
DATA = GaussianData.isotropic(MEAN, STD)


def exact_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The optimal eps for data N(MEAN, STD^2 I)."""
    return DATA.eps(x, SCHEDULE.alpha_bar[t])


def test_inversion_maps_data_to_the_prior_and_back() -> None:
    x0 = MEAN + STD * torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    for t_end in (999, 600):
        latent, _ = ddim_round_trip(exact_eps, SCHEDULE, x0, steps=200, t_end=t_end)
        # The probability-flow map of a Gaussian is affine: x_t = sqrt(a) m + sqrt(a s^2 + 1 - a) (x_0 - m) / s.
        a = SCHEDULE.alpha_bar[t_end]
        expected = DATA.flow(x0, 1.0, a)
        assert (latent - expected).abs().mean() < 0.01
    errors = [float((ddim_round_trip(exact_eps, SCHEDULE, x0, steps)[1] - x0).abs().mean()) for steps in (10, 50, 200)]
    # The only approximation is eps taken at the start of each step: the error shrinks with the step size.
    assert errors[0] > 2.5 * errors[1] > 6 * errors[2] and errors[2] < 0.01, errors


def test_fixed_point_iterations_make_each_step_the_exact_inverse_of_ddim() -> None:
    """With eps evaluated where the DDIM step down starts, the round trip is exact up to the fixed-point error,
    which falls geometrically with the iterations (10 steps to the default t_end here)."""
    x0 = MEAN + STD * torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    errors = [
        float((ddim_round_trip(exact_eps, SCHEDULE, x0, 10, fixed_point_iterations=k)[1] - x0).abs().mean())
        for k in (0, 1, 2, 4, 16)
    ]
    assert all(a > 3 * b for a, b in zip(errors[:3], errors[1:4])), errors
    assert errors[0] > 0.05 and errors[4] < 1e-5, errors


def test_a_learned_variance_models_extra_channels_are_ignored_in_both_directions() -> None:
    """A model trained with learned variances outputs [eps, v] (twice the channels); inversion, like DDIM, uses eps."""
    x0 = MEAN + STD * torch.randn(500, 2, generator=torch.Generator().manual_seed(2))

    def eps_and_values(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([exact_eps(x, t), torch.full_like(x, 0.3)], dim=1)

    for order, fixed_point in ((1, 0), (1, 2), (2, 0)):
        expected = ddim_round_trip(exact_eps, SCHEDULE, x0, 20, fixed_point_iterations=fixed_point, order=order)
        got = ddim_round_trip(eps_and_values, SCHEDULE, x0, 20, fixed_point_iterations=fixed_point, order=order)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), (order, fixed_point)


def test_first_order_flow_is_ddim_in_both_directions() -> None:
    x0 = MEAN + STD * torch.randn(500, 2, generator=torch.Generator().manual_seed(2))
    timesteps = inversion_timesteps(1000, 20, 978)
    latent = adams_bashforth_flow(exact_eps, SCHEDULE, x0, [None, *timesteps], order=1)
    torch.testing.assert_close(latent, ddim_invert(exact_eps, SCHEDULE, x0, timesteps), rtol=1e-5, atol=1e-5)
    back = adams_bashforth_flow(exact_eps, SCHEDULE, latent, [*timesteps[::-1], None], order=1)
    expected = ddim_sample(exact_eps, SCHEDULE, tuple(x0.shape), timesteps=timesteps[::-1], x_T=latent)
    torch.testing.assert_close(back, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="inversion order must be one of 1, 2, got 3"):
        adams_bashforth_flow(exact_eps, SCHEDULE, x0, [None, *timesteps], order=3)
    with pytest.raises(ConfigError, match="fixed-point refinement inverts first-order"):
        ddim_round_trip(exact_eps, SCHEDULE, x0, 10, fixed_point_iterations=1, order=2)


@pytest.mark.parametrize("schedule", [SCHEDULE, NoiseSchedule.cosine(1000)], ids=["linear", "cosine"])
def test_second_order_flow_converges_faster_than_ddim(schedule: NoiseSchedule) -> None:
    """Against the closed-form flow of Gaussian data: the Adams-Bashforth inversion's error falls by more than 2x
    per halving of the step (second order; DDIM's by at most 2x), and its round trip closes 10x closer than DDIM's
    at the same NFE."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return DATA.eps(x, schedule.alpha_bar[t])

    x0 = (MEAN + STD * torch.randn(4000, 2, generator=torch.Generator().manual_seed(3))).double()
    a = schedule.alpha_bar[600].double()
    expected = DATA.flow(x0, 1.0, a)

    def inversion_error(steps: int, order: int) -> float:
        levels = [None, *inversion_timesteps(1000, steps, 600)]
        return float((adams_bashforth_flow(eps, schedule, x0, levels, order) - expected).abs().mean())

    first = [inversion_error(steps, 1) for steps in (20, 40, 80)]
    second = [inversion_error(steps, 2) for steps in (20, 40, 80)]
    assert first[0] / first[1] < 2.1 and first[1] / first[2] < 2.1, first
    assert second[0] / second[1] > 2.5 and second[1] / second[2] > 2.0, second
    assert second[2] < first[2] / 3, (first, second)
    for steps in (10, 20):
        ddim = ddim_round_trip(eps, schedule, x0.float(), steps, t_end=600)[1]
        adams = ddim_round_trip(eps, schedule, x0.float(), steps, t_end=600, order=2)[1]
        assert (adams - x0).abs().mean() < (ddim - x0).abs().mean() / 10


class QueuedEps:
    """A stand-in network returning pre-drawn outputs in turn, whatever its input; records the t it is given."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs, self.seen = iter(outputs), []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(t[0]))
        return next(self.outputs)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize(("kind", "beta_schedule"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_ddim_inversion_matches_diffusers_inverse_scheduler(kind: str, beta_schedule: str, spacing: str) -> None:
    """Step for step against diffusers' DDIMInverseScheduler on the same targets and eps: ``x_next = sqrt(a_next)
    x0_pred + sqrt(1 - a_next) eps`` from alpha_bar = 1 up. The one convention that differs is which t the network
    sees: difflab the step's start (its target on the first step), diffusers' pipelines the step's target."""
    from diffusers import DDIMInverseScheduler

    schedule = NoiseSchedule.linear(1000) if kind == "linear" else NoiseSchedule.cosine(1000)
    oracle = float64_oracle(
        DDIMInverseScheduler(
            1000, beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing
        )
    )
    oracle.set_timesteps(20)
    targets = oracle.timesteps.tolist()
    generator = torch.Generator().manual_seed(len(targets))
    outputs = [torch.randn(8, 3, generator=generator) for _ in targets]
    x0 = torch.randn(8, 3, generator=generator)
    expected = x0.double()
    for eps, t in zip(outputs, targets):
        expected = oracle.step(eps.double(), t, expected).prev_sample
    network = QueuedEps(outputs)
    ours = ddim_invert(network, schedule, x0, targets)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    assert network.seen == [targets[0], *targets[:-1]]


def test_a_round_trip_needs_an_end_above_zero() -> None:
    from difflab.experiments.inversion import resolved_t_end

    # it once said "use at most 0" steps, which --steps refuses
    with pytest.raises(ConfigError, match=r"a round trip needs --t-end >= 1 \(one step up and back\), got 0$"):
        resolved_t_end(NoiseSchedule.linear(100), 0, (1,))
    assert resolved_t_end(NoiseSchedule.linear(100), 1, (1,)) == 1


def test_inversion_timesteps() -> None:
    steps = inversion_timesteps(1000, 50)
    assert len(steps) == 50 and steps[0] == 20 and steps[-1] == 999 and steps == sorted(set(steps))
    assert inversion_timesteps(1000, 4, t_end=400) == [100, 200, 300, 400]
    visited = []
    ddim_invert(
        lambda x, t: visited.append(int(t[0])) or torch.zeros_like(x), SCHEDULE, torch.ones(2, 2), [100, 200, 300]
    )
    assert visited == [100, 100, 200]  # the first step takes eps at its target, the others at their start


def test_logsnr_spacing_keeps_the_end_points_and_spaces_evenly_in_log_snr() -> None:
    for schedule in (SCHEDULE, NoiseSchedule.cosine(1000)):
        for steps, t_end in ((10, None), (50, 978), (100, 978), (300, 400)):
            uniform = inversion_timesteps(1000, steps, t_end)
            spaced = logsnr_inversion_timesteps(schedule, steps, t_end)
            assert len(spaced) == steps and spaced == sorted(set(spaced)), (steps, t_end)
            assert (spaced[0], spaced[-1]) == (uniform[0], uniform[-1])
            assert 0 <= spaced[0] and spaced[-1] <= 999
    # away from rounding the gaps in lambda are equal (linear schedule, 10 steps: each gap spans many t)
    log_snr = torch.log(SCHEDULE.alpha_bar / (1 - SCHEDULE.alpha_bar))
    gaps = log_snr[logsnr_inversion_timesteps(SCHEDULE, 10, 999)].diff()
    assert float(gaps.max() - gaps.min()) < 0.05 * float(gaps.abs().mean())
    # smaller steps at both ends than the uniform spacing's ~100 timesteps
    spaced = logsnr_inversion_timesteps(NoiseSchedule.cosine(1000), 10, 978)
    assert spaced[1] - spaced[0] < 98 and spaced[-1] - spaced[-2] < 98
    with pytest.raises(ConfigError, match="inversion spacing must be one of uniform, logsnr"):
        round_trip_timesteps(SCHEDULE, 10, None, "karras")


def test_round_trips_go_through_the_network_in_batches_with_each_items_own_label() -> None:
    from difflab.experiments.inversion import WithLabels, round_trip_cases, round_trip_rows
    from difflab.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    network = UNet(UNetConfig(in_channels=1, out_channels=1, base_channels=8, channel_mults=(1, 2), num_classes=3))
    for module in network.modules():  # break the zero-initialised output so eps depends on x, t and the label
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    network.eval()
    schedule = NoiseSchedule.cosine(100)
    x0 = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    cases = round_trip_cases((4,), len(x0))
    said: list[str] = []
    whole, _ = round_trip_rows(network, schedule, x0, cases, 90, echo=said.append, labels=labels, batch_size=64)
    batched, figure = round_trip_rows(network, schedule, x0, cases, 90, echo=said.append, labels=labels, batch_size=3)
    assert "on each of 3 batch(es) of at most 3" in said[-2]
    for key in ("mse", "psnr_db", "psnr_db_mean_per_image", "ssim", "latent_std"):
        assert batched[0][key] == pytest.approx(whole[0][key], rel=1e-5), key
    # the batches keep each item's own label: item 4 alone, with label 1, round-trips to the same image
    _, alone = ddim_round_trip(WithLabels(network, labels[4:5]), schedule, x0[4:5], 4, 90)
    torch.testing.assert_close(figure[0][1][4:5], alone.clamp(-1, 1), atol=1e-4, rtol=0)
    _, wrong = ddim_round_trip(WithLabels(network, torch.tensor([2])), schedule, x0[4:5], 4, 90)
    assert (figure[0][1][4:5] - wrong.clamp(-1, 1)).abs().max() > 1e-3
    with pytest.raises(ConfigError, match="batch size must be >= 1"):
        round_trip_rows(network, schedule, x0, cases, 90, echo=said.append, batch_size=0)


def test_invert_command_on_a_trained_run(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "ddpm"
    assert (
        main(
            [
                "run",
                "mnist-ddpm",
                f"run_dir={run_dir}",
                "data.source=digits",
                "progress=false",
                "train.steps=300",
                "train.lr=2e-3",
                "train.batch_size=64",
                "unet.base_channels=16",
                "schedule.num_timesteps=100",
                "metrics.n_samples=20",
                "metrics.n_ddpm=4",
                "metrics.ddim_steps=10",
                "metrics.batch_size=20",
            ]
        )
        == 0
    )
    assert main(["invert", str(run_dir), "--steps", "5", "50", "--n", "32", "--fixed-point", "1"]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and f"report: {run_dir / 'report.md'}" in printed
    # the size of the work first: 5 and 50 steps there and back (10 + 100 NFE), and refined by one fixed-point
    # iteration per inversion step (15 + 150)
    assert "[invert] 32 item(s), 4 round trip(s) to t = " in printed
    assert ": 275 network calls on each of 1 batch(es) of at most 256" in printed
    rows = json.loads((run_dir / "inversion.json").read_text())["rows"]
    report = (run_dir / "report.md").read_text()  # rewritten with the round trips, each row's numbers in it
    assert "## DDIM round trips (difflab invert)" in report and "figures/inversion.png" in report
    assert all(f"{r['psnr_db']:.2f}" in report for r in rows)
    assert all(r["psnr_db_mean_per_image"] >= r["psnr_db"] - 1e-9 for r in rows)  # the mean of logs, Jensen
    plain, refined = rows[:2], rows[2:]
    assert [r["fixed_point_iterations"] for r in rows] == [0, 0, 1, 1]
    assert [r["nfe"] for r in rows] == [10, 100, 15, 150]
    assert plain[1]["psnr_db"] > plain[0]["psnr_db"] and plain[1]["psnr_db"] > 20
    assert all(r["psnr_db"] > p["psnr_db"] for r, p in zip(refined, plain))
    assert (run_dir / "figures" / "inversion.png").is_file()
    # both spacings in one table; the log-SNR one round-trips too, and better with more steps
    assert main(["invert", str(run_dir), "--steps", "5", "50", "--n", "32", "--spacing", "uniform", "logsnr"]) == 0
    assert "logsnr" in capsys.readouterr().out
    rows = json.loads((run_dir / "inversion.json").read_text())["rows"]
    assert [r["spacing"] for r in rows] == ["uniform", "uniform", "logsnr", "logsnr"]
    assert rows[3]["psnr_db"] > rows[2]["psnr_db"] and rows[3]["psnr_db"] > 20
    assert main(["invert", str(run_dir), "--spacing", "karras"]) == 2
    assert "--spacing must be among uniform, logsnr, got karras" in capsys.readouterr().err
    # the second-order flow beside DDIM at the same NFE; fixed-point rows refine the DDIM steps only
    assert main(["invert", str(run_dir), "--steps", "20", "--n", "32", "--order", "1", "2", "--fixed-point", "1"]) == 0
    rows = json.loads((run_dir / "inversion.json").read_text())["rows"]
    assert [(r["order"], r["fixed_point_iterations"], r["nfe"]) for r in rows] == [(1, 0, 40), (1, 1, 60), (2, 0, 40)]
    assert rows[2]["psnr_db"] > rows[0]["psnr_db"] + 1.5, rows  # 31.9 vs 28.8 dB here
    assert main(["invert", str(run_dir), "--order", "3"]) == 2
    assert "--order must be among 1, 2, got 3" in capsys.readouterr().err
    assert main(["invert", str(run_dir), "--t-end", "100"]) == 2  # T = 100 here
    assert "--t-end must be in [0, 99], got 100" in capsys.readouterr().err
    # More steps than timesteps below --t-end are refused, before anything is written (they once fell back to the
    # default spacing up to t = 38 while inversion.json said t_end = 5).
    before = (run_dir / "inversion.json").read_bytes()
    assert main(["invert", str(run_dir), "--steps", "20", "--t-end", "5"]) == 2
    assert "--steps 20 do not fit between t = 0 and --t-end 5: use at most 5" in capsys.readouterr().err
    assert (run_dir / "inversion.json").read_bytes() == before
    # A `difflab train` run (complete, nothing scored, no report) is inverted without a report to rewrite.
    trained = tmp_path / "trained"
    shutil.copytree(run_dir, trained)
    for name in ("metrics.json", "report.md", "report.html"):
        (trained / name).unlink()
    capsys.readouterr()
    assert main(["invert", str(trained), "--steps", "5", "--n", "100000"]) == 0
    assert (trained / "inversion.json").is_file() and not (trained / "report.md").exists()
    held = json.loads((trained / "inversion.json").read_text())["rows"][0]["n"]  # all held-out digits, said so
    assert f"(--n 100000: the run holds {held} held-out items, all round-tripped)" in capsys.readouterr().out
