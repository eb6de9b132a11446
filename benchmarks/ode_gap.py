"""Where does a model's probability-flow ODE lose to ancestral sampling? Per-step eta hybrids of DDIM.

The DDIM update (Song et al. 2021, eq. 12) with eta = 0 follows the probability-flow ODE; with eta = 1 it is
DDPM's ancestral step respaced to the same timesteps. Switching eta at a timestep ``tau`` shows which noise
levels the ODE's errors come from: ``eta = 1 above tau, 0 below`` keeps the stochastic correction only at high
noise, and the reverse. Every variant starts from the same x_T and draws the same noise; FID by the project's
evaluator (MNIST test as reference, real held-out digits at the same n printed as the floor).

    python benchmarks/ode_gap.py RUN [--n 500] [--steps 50] [--taus 800 500 200] [--temperatures 0.97 0.94]
        [--teleports 920 900] [--mean-start] [--guidance W]

``--temperatures`` adds DDIM (eta = 0) rows from the same x_T scaled by each factor: an ODE that maps typical noise
to over-inked, speckled digits (an eps model whose x_0 predictions at high noise carry amplified errors) scores far
better from a slightly shrunken x_T, a well-behaved one barely changes.

``--teleports`` adds rows that replace the network's steps above each t = tau by the exact probability-flow ODE
of a Gaussian with the training images' mean and covariance (Wang & Vastola 2023's "analytical teleportation"),
then take the DDIM steps at t <= tau: the network's high-noise eps errors, not its flow below tau, decide how much
that recovers.

``--mean-start`` adds a DDIM row whose start is the marginal of its first timestep t_1 (980 for 50 leading steps of
1,000), ``x_{t_1} = sqrt(alpha_bar) mu + sqrt(1 - alpha_bar) x_T`` with mu the mean training image, instead of
x_T ~ N(0, I): DDIM (and diffusers' leading spacing) treats t_1 as pure noise, but alpha_bar_980 = 8.8e-4 of the
cosine schedule leaves a shift of sqrt(alpha_bar) |mu| (0.67 standard deviations for MNIST) along the mean image,
which a deterministic sampler keeps. With ``--teleports`` it also adds rows whose Gaussian flow starts at t = T - 1
(alpha_bar 2e-9), where N(0, I) is the marginal.

RUN is a finished mnist-ddpm or mnist-cfg run. A mnist-cfg run is sampled unconditionally, with its null label, or
with ``--guidance W`` class-conditionally: the ten digits in turn, guided at W (1 = the plain conditional model), so
the same rows show how much of the gap the unconditional flow's split between the digits holds.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from difflab.diffusion.gaussian import GaussianData
from difflab.experiments.images import load_image_data
from difflab.experiments.mnist import BalancedGuidance, NullLabel, image_shape, load_run_model
from difflab.metrics.image_eval import ImageEvaluator
from difflab.sampling.common import randn, timestep_list
from difflab.sampling.ddim import ddim_sample


def hybrid_sample(
    model,
    schedule,
    shape: tuple[int, ...],
    n: int,
    steps: int,
    eta_above: float,
    eta_below: float,
    tau: int,
    seed: int,
    temperature: float = 1.0,
    data_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """(n, *shape) samples of DDIM with ``eta_above`` at t > tau and ``eta_below`` at t <= tau, x_0 clipped, from
    ``temperature * x_T``, or with ``data_mean`` (``shape``) from ``sqrt(alpha_bar) data_mean + sqrt(1 - alpha_bar)
    x_T`` at the first timestep.

    Batches of 500 from one generator: each batch draws its x_T, then its noise step by step."""
    generator = torch.Generator().manual_seed(seed)
    timesteps = timestep_list(schedule.num_timesteps, steps, "leading")
    etas = [eta_above if t > tau else eta_below for t in timesteps]
    first_alpha_bar = schedule.alpha_bar.double()[timesteps[0]]
    parts = []
    for start in range(0, n, 500):
        batch = (min(500, n - start), *shape)
        x_T = temperature * randn(batch, generator, "cpu")
        if data_mean is not None:
            x_T = (first_alpha_bar.sqrt() * data_mean.double() + (1 - first_alpha_bar).sqrt() * x_T.double()).float()
        parts.append(
            ddim_sample(
                model, schedule, batch, timesteps=timesteps, eta=etas, generator=generator, clip_x0=1.0, x_T=x_T
            )
        )
    return torch.cat(parts)


def teleport_sample(
    model,
    schedule,
    shape: tuple[int, ...],
    n: int,
    steps: int,
    tau: int,
    seed: int,
    gaussian: GaussianData,
    from_prior: bool = False,
) -> torch.Tensor:
    """(n, *shape) samples: x_T (the same draws as :func:`hybrid_sample`) carried by the exact flow of ``gaussian``
    from the first of the ``steps`` leading timesteps (``from_prior``: from t = T - 1) to the last one <= tau, then
    DDIM (eta = 0, x_0 clipped) over the rest."""
    generator = torch.Generator().manual_seed(seed)
    timesteps = timestep_list(schedule.num_timesteps, steps, "leading")
    below = [t for t in timesteps if t <= tau]
    alpha_bar = schedule.alpha_bar.double()
    flow_from = float(alpha_bar[schedule.num_timesteps - 1 if from_prior else timesteps[0]])
    parts = []
    for start in range(0, n, 500):
        batch = (min(500, n - start), *shape)
        x_T = randn(batch, generator, "cpu")
        x_tau = gaussian.flow(x_T, flow_from, float(alpha_bar[below[0]]))
        parts.append(ddim_sample(model, schedule, batch, timesteps=below, clip_x0=1.0, x_T=x_tau))
    return torch.cat(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--taus", type=int, nargs="*", default=[800, 500, 200])
    parser.add_argument("--temperatures", type=float, nargs="*", default=[])
    parser.add_argument("--teleports", type=int, nargs="*", default=[])
    parser.add_argument("--seed", type=int, default=4321)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="")
    parser.add_argument("--guidance", type=float, default=None, help="mnist-cfg runs: every digit in turn at this w")
    parser.add_argument("--mean-start", action="store_true", help="DDIM from the first timestep's marginal mean")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, network, schedule = load_run_model(args.run)
    classes = config.unet.num_classes
    if args.guidance is not None and not classes:
        parser.error("--guidance needs a class-conditional (mnist-cfg) run")
    if args.guidance is not None and args.teleports:
        parser.error("--teleports flows a Gaussian of all the digits: leave out --guidance")
    if args.guidance is not None:
        model = BalancedGuidance(network, classes, args.guidance)
    else:
        model = NullLabel(network, classes) if classes else network
    evaluator = ImageEvaluator.for_mnist()
    shape = image_shape(config)

    def hybrid(above: float, below: float, tau: int, temperature: float = 1.0, data_mean=None):
        return lambda: hybrid_sample(
            model, schedule, shape, args.n, args.steps, above, below, tau, args.seed, temperature, data_mean
        )

    variants = [("DDIM (eta 0)", hybrid(0.0, 0.0, -1)), ("DDPM respaced (eta 1)", hybrid(1.0, 1.0, -1))]
    for tau in args.taus:
        variants += [
            (f"eta 1 above t = {tau}, 0 below", hybrid(1.0, 0.0, tau)),
            (f"eta 0 above t = {tau}, 1 below", hybrid(0.0, 1.0, tau)),
        ]
    variants += [(f"DDIM from {s:g} x_T", hybrid(0.0, 0.0, -1, s)) for s in args.temperatures]
    if args.mean_start or args.teleports:
        train_images = load_image_data(config.data, config.seed)[0].images
    if args.mean_start:
        first = timestep_list(schedule.num_timesteps, args.steps, "leading")[0]
        variants.append((f"DDIM from the t = {first} marginal's mean", hybrid(0.0, 0.0, -1, 1.0, train_images.mean(0))))
    if args.teleports:
        gaussian = GaussianData.fit(train_images)
        starts = [False, True] if args.mean_start else [False]
        variants += [
            (
                f"Gaussian flow {'from t = T-1 ' if from_prior else ''}to t = {tau}, then DDIM",
                lambda tau=tau, from_prior=from_prior: teleport_sample(
                    model, schedule, shape, args.n, args.steps, tau, args.seed, gaussian, from_prior
                ),
            )
            for from_prior in starts
            for tau in args.teleports
        ]
    rows = []
    for name, draw in variants:
        start = time.perf_counter()
        samples = draw()
        result = evaluator.evaluate(samples)
        seconds = time.perf_counter() - start
        rows.append({"variant": name, "fid": result["fid"], "fid_std": result.get("fid_std"), "seconds": seconds})
        print(f"{name:48s} FID {result['fid']:7.2f} (sd {result.get('fid_std', float('nan')):.2f})", flush=True)
    floor = evaluator.calibration(args.n)[0]
    print(f"{'real held-out digits':48s} FID {floor['fid']:7.2f}  (n = {args.n}, {args.steps} steps, seed {args.seed})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "run": args.run,
                    "n": args.n,
                    "steps": args.steps,
                    "rows": rows,
                    "floor": floor["fid"],
                    "guidance": args.guidance,
                },
                handle,
            )


if __name__ == "__main__":
    main()
