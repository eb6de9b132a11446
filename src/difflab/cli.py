"""The ``difflab`` command line.

    difflab run RECIPE [key=value ...] [--config FILE] [--fresh] [--table]
    difflab run CONFIG.yaml [key=value ...]
    difflab train RECIPE|CONFIG.yaml [key=value ...]   only the training stages + exported weights
    difflab config RECIPE            print a recipe's default config as YAML
    difflab recipes                  list the recipes
    difflab sample RUN --sampler NAME --steps N [--eta E] [--option KEY=VALUE] [--n 5000] [--seed S] [--out FILE]
                       [--digit D] [--guidance W]   (an NCSN run: annealed Langevin, --steps per level, --option c=C)
    difflab evaluate RUN [--inception-weights FILE]   FID / IS / accuracy of an MNIST image run's samples
    difflab invert RUN [--steps 10 20 50 100] [--order 1 2] [--spacing uniform logsnr]   DDIM round trips
    difflab compare-samplers RUN [--samplers a,b] [--nfe 5 10 ...] [--n 5000] [--seed S] [--full ddpm | --no-full]
                                 [--option KEY=VALUE]
    difflab likelihood RUN [--n 1000]  exact model NLL of held-out points (probability-flow ODE)
    difflab report RUN [--style S]   rebuild RUN/report.md and RUN/report.html from the run folder
    difflab report RUN --style ddpm-vs-ddim [--with RUN_NO_T] [--forward RUN_2D]   the five-section write-up
    difflab serve [RUNS_DIR] [--port 8765] [--host 127.0.0.1]   browse run folders in a web browser

``run`` and ``train`` also work under ``torchrun --nproc_per_node=N -m difflab ...`` (data-parallel; rank 0
writes everything). Errors a user can cause are printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

from difflab.errors import ConfigError, DifflabError


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line (``difflab sample: error: ...``) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _finite(text: str) -> float:
    """An argparse type: a finite float (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _seed(text: str) -> int:
    """An argparse type: a seed, an integer within +-2^63 as a run's ``seed=`` (larger ones would wrap around)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed is an integer within +-2^63, got {value}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0 picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0 picks a free one), got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from difflab import __version__

    parser = _Parser(
        prog="difflab", description="Diffusion models you can train, sample, evaluate and explain on a laptop."
    )
    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe end to end into a run folder")
    run.add_argument(
        "recipe",
        nargs="?",
        help="a recipe name (see `difflab recipes`) or a YAML config file with a recipe key (left out: --config's)",
    )
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. denoiser_train.steps=2000 device=cpu")
    run.add_argument("--config", help="a YAML file whose values replace the recipe's defaults")
    run.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    evaluate = commands.add_parser(
        "evaluate",
        help="score an image run's samples (mnist-ddpm, mnist-cfg, mnist-ncsn, mnist-ldm) with the built-in evaluator",
    )
    evaluate.add_argument("run_dir")
    evaluate.add_argument(
        "--inception-weights",
        default="",
        help="local InceptionV3 weights: standard FID/IS (the only scores of an image folder)",
    )
    evaluate.add_argument("--device", default="auto")
    train = commands.add_parser(
        "train", help="run only the training stages of a recipe and export the weights (no sampling or report)"
    )
    train.add_argument(
        "recipe", nargs="?", help="a recipe name or a YAML config file with a recipe key (left out: --config's)"
    )
    train.add_argument("overrides", nargs="*", help="config overrides, e.g. denoiser_train.precision=bf16")
    train.add_argument("--config", help="a YAML file whose values replace the recipe's defaults")
    train.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    invert = commands.add_parser(
        "invert", help="DDIM inversion round trips of real images (or latents) with a run's eps model"
    )
    invert.add_argument(
        "run_dir",
        help="a finished mnist-ddpm, mnist-cfg or mnist-ldm run, or an rgb2ir run with inversion.enabled=true",
    )
    invert.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100], help="DDIM step counts")
    invert.add_argument("--n", type=int, default=64, help="held-out images to invert (default 64)")
    invert.add_argument(
        "--t-end", type=int, default=None, help="timestep to invert to (default: the last with alpha_bar >= 1e-3)"
    )
    invert.add_argument(
        "--fixed-point",
        type=int,
        default=0,
        metavar="K",
        help="also refine every inversion step by K fixed-point iterations (K more network calls per step)",
    )
    invert.add_argument(
        "--spacing",
        nargs="+",
        default=["uniform"],
        help="timestep spacing of the round trips: uniform (in t, the default) and/or logsnr (evenly in log-SNR "
        "between the same end points); several give one set of rows each",
    )
    invert.add_argument(
        "--order",
        type=int,
        nargs="+",
        default=[1],
        help="integrator of both directions: 1 (DDIM, the default) and/or 2 (second-order Adams-Bashforth on the "
        "same timesteps, same NFE); several give one set of rows each",
    )
    invert.add_argument("--seed", type=_seed, default=0)
    invert.add_argument("--device", default="auto")
    run.add_argument(
        "--table", action="store_true", help="run the recipe's comparison table (sets table=true; mnist-ldm)"
    )
    show = commands.add_parser("config", help="print a recipe's default config as YAML")
    show.add_argument("recipe")
    commands.add_parser("recipes", help="list the recipes")
    _add_sampling_commands(commands)
    report = commands.add_parser("report", help="(re)write a completed run's report.md and report.html")
    report.add_argument("run_dir", help="a completed run folder")
    report.add_argument(
        "--style", default="default", help="report style (default: default); others write RUN/report-STYLE.md/.html"
    )
    report.add_argument(
        "--with",
        dest="with_run",
        help="ddpm-vs-ddim: the ablation run trained without t (unet.time_conditioning=none); default: a sibling",
    )
    report.add_argument(
        "--forward", help="ddpm-vs-ddim: a swissroll/states run whose forward-process panels it describes"
    )
    serve = commands.add_parser("serve", help="browse run folders: metrics, configs, figures, trajectories")
    serve.add_argument("runs_dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    serve.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    return parser


def _add_sampling_commands(commands: argparse._SubParsersAction) -> None:
    from difflab.sampling.solvers import SAMPLERS

    sample = commands.add_parser("sample", help="draw samples from a finished run with any sampler")
    sample.add_argument("run", help="a finished run folder")
    sample.add_argument(
        "--sampler",
        default=None,
        help=f"one of {', '.join(SAMPLERS)} (default: dpmpp-2m for 2-D runs, ddim for image runs); NCSN runs "
        "(mnist-ncsn, states-ncsn, swissroll-ncsn) sample by annealed Langevin dynamics (langevin, their only one)",
    )
    sample.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default 20 for 2-D, 50 for images); for NCSN runs the Langevin steps per noise level "
        "(default: the run's langevin.steps_per_level)",
    )
    sample.add_argument(
        "--eta",
        type=_finite,
        default=None,
        help="eta of ddim (0 the deterministic ODE, the default; 1 DDPM's posterior variance) or of an SDE sampler "
        "(dpmpp-*-sde, dpmpp-2m-ode-sde: the scale of its noise, 1 the default, 0 its ODE)",
    )
    sample.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option of the sampler's function, e.g. spacing=karras or eta=0.5 (repeatable); for NCSN "
        "runs c=C, the Langevin step size alpha_i = C sigma_i^2 (default: the run's langevin.c)",
    )
    sample.add_argument("--n", type=int, default=None, help="number of samples (default 5000 for 2-D, 16 for images)")
    sample.add_argument(
        "--digit",
        "--class",
        dest="digit",
        default=None,
        help="class label (an index, or an image folder's class name), for a class-conditional image run",
    )
    sample.add_argument(
        "--guidance",
        type=_finite,
        default=None,
        help="classifier-free guidance w in eps_u + w (eps_c - eps_u): 0 unconditional, "
        "1 conditional (the default for mnist-cfg runs; a mnist-ldm run's default is its guidance.w), > 1 guided; "
        "without --digit every class in turn",
    )
    sample.add_argument(
        "--precision",
        default="fp32",
        help="fp32 (default) or bf16: the network under bf16 autocast, the sampler in fp32 (image runs; about 1.6x "
        "faster on CPUs with avx512_bf16)",
    )
    sample.add_argument("--seed", type=_seed, default=0)
    sample.add_argument("--out", help="output file (default under RUN/samples/)")
    sample.add_argument("--device", default="auto")
    compare = commands.add_parser("compare-samplers", help="sample quality against NFE for many samplers")
    compare.add_argument("run", help="a finished run folder")
    compare.add_argument("--samplers", help="comma-separated sampler names (default: all)")
    compare.add_argument(
        "--nfe", type=int, nargs="+", help="NFE budgets (default 5 10 20 50 100 1000, plus T unless --no-full)"
    )
    compare.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword option given to every compared sampler, e.g. spacing=karras with --samplers dpmpp-2m,dpmpp-3m "
        "(repeatable; each sampler must take it)",
    )
    compare.add_argument("--n", type=int, default=5000, help="samples per sampler and budget (default 5000)")
    compare.add_argument("--seed", type=_seed, default=0)
    compare.add_argument(
        "--no-full", action="store_true", help="leave out the budget T (every sampler at T steps: costly on images)"
    )
    compare.add_argument(
        "--full", metavar="SAMPLERS", help="comma-separated samplers that get the budget T (default: every sampler)"
    )
    compare.add_argument("--device", default="auto")
    likelihood = commands.add_parser("likelihood", help="exact model NLL of held-out data (probability-flow ODE)")
    likelihood.add_argument("run", help="a finished run folder")
    likelihood.add_argument("--n", type=int, default=1000, help="held-out points to score (default 1000)")
    likelihood.add_argument("--batch-size", type=int, default=1000)
    likelihood.add_argument("--rtol", type=_finite, default=1e-5)
    likelihood.add_argument("--atol", type=_finite, default=1e-5)
    likelihood.add_argument("--t-min", type=_finite, default=1e-5, help="start of the ODE in continuous time")
    likelihood.add_argument("--probe", default="rademacher", help="Hutchinson probes: rademacher or gaussian")
    likelihood.add_argument("--seed", type=_seed, default=0)
    likelihood.add_argument("--device", default="auto")


def _recipe(name: str):
    from difflab.experiments import recipes

    known = recipes()
    if name not in known:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(known)}")
    return known[name]


def _resolve_run_target(
    target: str | None, config_file: str | None, overrides: list[str]
) -> tuple[str, str | None, list[str]]:
    """``difflab run X``: X is a recipe name, or a YAML file naming its recipe; without X (or when X is an override,
    as argparse reads ``difflab run --config my.yaml run_dir=R``) the ``--config`` file names it. Returns the recipe,
    the config file and the overrides."""
    if target is not None and "=" in target:
        target, overrides = None, [target, *overrides]
    if target is None:
        if not config_file:
            raise ConfigError("name a recipe (see `difflab recipes`) or give --config FILE, a file naming its recipe")
        from difflab.config import read_yaml

        recipe = read_yaml(config_file).get("recipe")
        if not isinstance(recipe, str):
            example = f"`difflab run states --config {config_file}`"
            raise ConfigError(f"{config_file} names no recipe: name one on the command line, e.g. {example}")
        return recipe, config_file, overrides
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from difflab.config import read_yaml

        data = read_yaml(target)
        recipe = data.get("recipe")
        if not isinstance(recipe, str):
            raise ConfigError(f"{target} must name its recipe (recipe: states, swissroll, ...)")
        if config_file:
            raise ConfigError("give either a config file as the target or --config, not both")
        return recipe, target, overrides
    return target, config_file, overrides


def _named_recipe(config_file: str | None, overrides: list[str]) -> str | None:
    """The recipe a config file's ``recipe:`` or a ``recipe=`` override names (the override wins), None if neither
    does; a file that cannot be read names none (the config loader says why it cannot be read)."""
    named = None
    if config_file:
        import yaml

        try:
            data = yaml.safe_load(Path(config_file).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None
        if isinstance(data, dict) and isinstance(data.get("recipe"), str):
            named = data["recipe"]
    for override in overrides:
        key, _, value = override.partition("=")
        if key.strip() == "recipe":
            named = value.strip()
    return named


def _refuse_other_recipe(named: str | None, recipe_name: str) -> None:
    if named is not None and named != recipe_name:
        raise ConfigError(f"the config names recipe {named!r} but the command asked for {recipe_name!r}: name one")


def recipe_config(recipe_name: str, config_file: str | None, overrides: list[str]) -> Any:
    """The typed config of ``difflab run|train RECIPE``: the recipe's defaults, the config file, the overrides;
    refused when it names another recipe or an empty ``run_dir``, or asks a model for labels it cannot have."""
    from difflab.config import config_from
    from difflab.experiments.images import check_label_context

    try:
        config = config_from(_recipe(recipe_name).config_class(), config_file, overrides)
    except ConfigError:  # another recipe's config fails on its keys first: name the recipes instead
        _refuse_other_recipe(_named_recipe(config_file, overrides), recipe_name)
        raise
    _refuse_other_recipe(getattr(config, "recipe", recipe_name), recipe_name)
    if getattr(config, "run_dir", None) == "":
        raise ConfigError(f"run_dir is empty: name a folder (the default is runs/{recipe_name})")
    check_label_context(config)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    recipe_name, config_file, overrides = _resolve_run_target(args.recipe, args.config, list(args.overrides))
    recipe = _recipe(recipe_name)
    if args.table:
        if not hasattr(recipe.config_class(), "table"):
            raise ConfigError(f"--table is for recipes with a comparison table (mnist-ldm), not {recipe_name!r}")
        overrides.append("table=true")
    config = recipe_config(recipe_name, config_file, overrides)
    run = recipe.run(config, fresh=args.fresh)
    if run.main:
        print(f"report: {run.path / 'report.md'}")
        print(f"report: {run.path / 'report.html'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    recipe_name, config_file, overrides = _resolve_run_target(args.recipe, args.config, list(args.overrides))
    recipe = _recipe(recipe_name)
    config = recipe_config(recipe_name, config_file, overrides)
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks stay quiet, as in the recipes
        print(f"[{recipe_name}] training into run folder {config.run_dir} (the training stages only)")
    run = recipe.train(config, fresh=args.fresh)
    if run.main:
        print(f"weights: {run.path / 'checkpoints'}")
    return 0


IMAGE_RECIPES = ("mnist-ddpm", "mnist-cfg")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from difflab.experiments.mnist import evaluate_run
    from difflab.report.markdown import table

    results = evaluate_run(args.run_dir, args.inception_weights, args.device)
    rows = [[name, r["n"], r["fid"], r["inception_score"], r.get("accuracy")] for name, r in results["samples"].items()]
    for calibration in results["calibration"].values():
        rows += [
            [f"(calibration) {c['name']}", c["n"], c["fid"], c["inception_score"], c.get("accuracy")]
            for c in calibration
        ]
    floor = results["real_vs_real"]
    rows.append([f"(floor) {floor['name']}", floor["n"], floor["fid"], floor["inception_score"], floor.get("accuracy")])
    print(table(["samples", "n", "FID", "IS", "accuracy"], rows))
    for name, reason in results.get("skipped", {}).items():
        print(f"not scored: {name} ({reason})")
    print(f"written: {args.run_dir}/evaluation.json")
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    from difflab.experiments.inversion import invert_run
    from difflab.report.markdown import table
    from difflab.report.sections import inversion_table

    result = invert_run(
        args.run_dir,
        tuple(args.steps),
        args.n,
        args.t_end,
        args.seed,
        args.device,
        fixed_point=args.fixed_point,
        spacings=tuple(args.spacing),
        orders=tuple(args.order),
    )
    header, values = inversion_table(result["rows"])
    print(table(list(header), [list(row) for row in values], digits=4))
    if result["rows"] and result["rows"][0]["n"] < args.n:
        print(f"(--n {args.n}: the run holds {result['rows'][0]['n']} held-out items, all round-tripped)")
    print(f"written: {args.run_dir}/inversion.json, {args.run_dir}/figures/inversion.png")
    _refresh_report(args.run_dir)
    return 0


def _refresh_report(run_dir: str | Path) -> None:
    """Rebuild a completed run's report, which gains the section of the command that just wrote beside it
    (``invert``, ``compare-samplers``, ``likelihood``); a `difflab train` run has no report yet."""
    from difflab.experiments import recipes, report_run
    from difflab.experiments.runs import read_run

    record = read_run(run_dir)
    recipe = recipes().get(record.get("recipe"))
    if record.get("status") == "complete" and recipe is not None and (Path(run_dir) / "metrics.json").is_file():
        md_path, _ = report_run(run_dir)
        print(f"report: {md_path}")


def cmd_config(args: argparse.Namespace) -> int:
    from difflab.config import dump_yaml

    print(dump_yaml(_recipe(args.recipe).config_class()), end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from difflab.experiments import recipes

    for recipe in recipes().values():
        print(f"{recipe.name:15s} {recipe.summary}")
    return 0


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["spacing=karras", "eta=0.5"]`` -> ``{"spacing": "karras", "eta": 0.5}``: an integer, a float (``1e-3``
    too), true / false, or else the word itself."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key or not text:
            raise ConfigError(f"--option takes KEY=VALUE, got {pair!r}")
        value: Any = text
        if text.lower() in ("true", "false"):
            value = text.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--option {key} must be a finite number, got {text!r}")
        options[key] = value
    return options


def _not_scored(record: dict[str, Any]) -> str:
    """The printed note of a ``difflab sample`` record whose samples were too few to score, else nothing."""
    return f"  (not scored: {record['not_scored']})" if "not_scored" in record else ""


def cmd_sample_score(args: argparse.Namespace) -> int:
    """``difflab sample`` on an NCSN run: annealed Langevin dynamics with the run's settings, ``--steps`` steps per
    level and ``--option c=C`` overriding them."""
    from difflab.experiments.score_runs import sample_score_run as sample

    if args.sampler not in (None, "langevin"):
        raise ConfigError(f"{args.run} is a score-based run: it samples by annealed Langevin dynamics (langevin)")
    refused = [
        flag
        for flag, given in [
            ("--eta", args.eta is not None),
            ("--digit", args.digit is not None),
            ("--guidance", args.guidance is not None),
            ("--precision", args.precision != "fp32"),
        ]
        if given
    ]
    if refused:
        verb = "does" if len(refused) == 1 else "do"
        raise ConfigError(
            f"{' and '.join(refused)} {verb} not apply to annealed Langevin sampling of a score-based run"
        )
    options = parse_options(args.option)
    unknown = sorted(set(options) - {"c"})
    if unknown or not isinstance(options.get("c", 1.0), int | float) or isinstance(options.get("c"), bool):
        raise ConfigError(f"annealed Langevin takes the one option c=C (a number > 0), got {args.option}")
    record = sample(
        args.run, args.n, args.seed, args.steps, options.get("c"), args.out, args.device, show_progress=True
    )
    scores = "  ".join(f"{k} {record[k]:.3f}" for k in ("nll_course", "nll_reverse") if k in record)
    scores += _not_scored(record)
    print(
        f"annealed Langevin: c = {record['c']:g}, {record['steps_per_level']} steps per level, "
        f"{record['network_evaluations_per_sample']} network evaluations per sample, {record['seconds']:.1f} s"
        + (f"  {scores}" if scores else "")
    )
    print(f"samples: {record['samples']}  figure: {record['figure']}")
    return 0


# Folders of a run folder that the run writes itself; `difflab sample --out` may not write into them.
RUN_OWNED_FOLDERS = ("checkpoints", "figures", "tensorboard", "latents", "compare_samplers")


def check_sample_out(out: str, run: str) -> None:
    """``difflab sample --out FILE`` writes FILE's ``.pt`` (the samples) and ``.png`` (their figure): refuse another
    suffix, a folder, and, inside the run folder, its top level and the folders the run writes itself
    (:data:`RUN_OWNED_FOLDERS`), where the two files could overwrite the run's own (its checkpoints, figures), and
    any file that exists there already (the recipe's samples in ``samples/``)."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a folder: give a file name (e.g. {path / 'samples.png'})")
    if path.suffix not in (".pt", ".png"):
        raise ConfigError(f"--out {out}: give a .pt or .png file name (both are written: the samples and their figure)")
    for written in (path.with_suffix(".pt"), path.with_suffix(".png")):
        if written.is_dir():  # checked before sampling, so neither file is written
            raise ConfigError(f"--out {out} would write {written}, which is a folder: choose another file name")
    existing = next(parent for parent in path.absolute().parents if parent.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a folder")
    run_dir = Path(run).resolve()
    for written in (path.with_suffix(".pt"), path.with_suffix(".png")):
        resolved = written.resolve()
        if not resolved.is_relative_to(run_dir):
            continue
        parts = resolved.relative_to(run_dir).parts
        if len(parts) == 1 or parts[0] in RUN_OWNED_FOLDERS:
            raise ConfigError(
                f"--out {out} would write {written} among the run's own files: write under "
                f"{Path(run) / 'samples'}, a new subfolder of the run, or outside it"
            )
        if resolved.exists():  # e.g. samples/ddim.pt, which metrics.json and `difflab evaluate` describe
            raise ConfigError(
                f"--out {out} would overwrite {written} inside the run folder (the recipe's own samples live "
                "there): choose a new file name"
            )


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.experiments.runs import read_run

    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    if args.out:
        check_sample_out(args.out, args.run)
    from difflab.experiments.score_runs import SCORE_RECIPES
    from difflab.sampling.solvers import get_sampler

    recipe = read_run(args.run).get("recipe")
    if recipe in SCORE_RECIPES:
        return cmd_sample_score(args)
    image_run = recipe in IMAGE_RECIPES
    sampler = args.sampler or ("ddim" if image_run else "dpmpp-2m")
    extra = parse_options(args.option)
    if image_run:  # the image recipes run their own ddpm and ddim, which take no options
        from difflab.experiments.images import checked_sampler

        spec = checked_sampler(sampler, extra)
    else:
        spec = get_sampler(sampler)
        spec.check_options(extra)
    if args.eta is not None:
        if "eta" not in spec.option_names():
            raise ConfigError(f"--eta: sampler {sampler} takes no eta (ddim and the SDE samplers do)")
        from difflab.sampling.common import check_eta

        check_eta(args.eta, "--eta")
    if args.eta is not None and "eta" in extra:
        raise ConfigError("give eta once: --eta or --option eta=..., not both")
    eta_option = {"eta": args.eta} if args.eta is not None else {}
    if image_run:
        from difflab.experiments.mnist import sample_from_run

        path = sample_from_run(
            args.run,
            n=args.n or 16,
            digit=args.digit,
            guidance=1.0 if args.guidance is None else args.guidance,
            sampler=sampler,
            steps=args.steps or 50,
            eta=(args.eta or 0.0) if sampler == "ddim" else 0.0,  # the recipe's DDIM takes eta on its own
            seed=args.seed,
            device=args.device,
            out=args.out,
            options={**({} if sampler == "ddim" else eta_option), **extra},
            precision=args.precision,
        )
        print(f"samples: {path} (tensors in {path.with_suffix('.pt')})")
        return 0
    if args.precision != "fp32":
        raise ConfigError("--precision applies to mnist-ddpm and mnist-cfg runs; this run samples in fp32")
    from difflab.experiments.samplers import sample_run

    record = sample_run(
        args.run,
        sampler,
        args.steps or 20,
        args.n or (16 if recipe == "mnist-ldm" else 5000),  # a latent model's images: a grid, not a point cloud
        args.seed,
        args.out,
        args.device,
        {**eta_option, **extra} or None,
        digit=args.digit,
        guidance=args.guidance,
    )
    scores = "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("nll") or k == "fid")
    scores += _not_scored(record)
    print(f"{sampler}: {record['steps']} steps, {record['nfe']} NFE, {record['seconds']:.1f} s  {scores}")
    print(f"samples: {record['samples']}" + (f"  figure: {record['figure']}" if "figure" in record else ""))
    return 0


def cmd_compare_samplers(args: argparse.Namespace) -> int:
    from difflab.experiments import samplers as experiment

    names = [n.strip() for n in args.samplers.split(",") if n.strip()] if args.samplers else experiment.DEFAULT_COMPARED
    nfes = tuple(args.nfe) if args.nfe else experiment.DEFAULT_NFES
    if min(nfes) < 1 or args.n < 1:
        raise ConfigError(f"--nfe budgets and --n must be >= 1, got --nfe {' '.join(map(str, nfes))} --n {args.n}")
    if args.full and args.no_full:
        raise ConfigError("--full names samplers to give the T-step budget and --no-full gives it to none: pass one")
    full_for = [n.strip() for n in args.full.split(",") if n.strip()] if args.full else None
    stray = [name for name in full_for or [] if name not in names]
    if stray:
        raise ConfigError(f"--full {', '.join(stray)}: not among the compared samplers ({', '.join(names)})")
    target = experiment.load_target(args.run, args.device)  # the arguments first: loading a run takes seconds
    print(f"[compare-samplers] {target.recipe} run {target.path}: {len(names)} samplers, NFE {list(nfes)}, n={args.n}")
    options = parse_options(args.option)
    rows = experiment.compare_samplers(
        target,
        names,
        nfes,
        args.n,
        args.seed,
        include_full=not args.no_full,
        echo=print,
        full_for=full_for,
        options=options or None,
    )
    paths = experiment.write_comparison(target, rows, args.n, args.seed)
    print(experiment.comparison_table(rows, list(target.metrics), target.schedule.num_timesteps))
    print(f"written: {paths['table']}, {paths['results']}, {paths['figure']}")
    _refresh_report(target.path)
    return 0


def cmd_likelihood(args: argparse.Namespace) -> int:
    from difflab.experiments.samplers import heldout_likelihood, load_target
    from difflab.sampling.likelihood import LikelihoodSettings

    settings = LikelihoodSettings(t_min=args.t_min, rtol=args.rtol, atol=args.atol, probe=args.probe)
    target = load_target(args.run, args.device)
    record = heldout_likelihood(target, args.n, settings, args.batch_size, args.seed)
    model = record["model"]
    print(
        f"exact model NLL of {model['n']} held-out points: {model['nll_nats']:.3f} nats "
        f"({model['nll_nats_per_dim']:.3f} per dim; {model['divergence']} divergence, {model['method']} "
        f"rtol {model['rtol']:g} atol {model['atol']:g}, {model['nfe']} ODE evaluations, {model['seconds']:.0f} s; "
        f"density of the data convolved with N(0, {model['noise_floor_sigma_vp']:.3g}^2), t_min {model['t_min']:g})"
    )
    if model["n"] < args.n:
        print(f"  (--n {args.n}: the run holds {model['n']} held-out points, all scored)")
    if "bits_per_dim" in model:
        print(f"  {model['bits_per_dim']:.3f} bits/dim ({model['dequantization']})")
    if "vlb" in record:
        bound = record["vlb"]
        print(f"  variational bound of the same points: {bound['bits_per_dim']:.3f} bits/dim ({bound['description']})")
    for name, value in record.get("kde", {}).items():
        if value is not None:
            print(f"  KDE, {name.replace('_', ' ')}: {value:.3f} nats")
    print(f"written: {target.path / 'likelihood.json'}")
    _refresh_report(target.path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from difflab.experiments import report_run

    companions = {"ablation": args.with_run, "forward": args.forward}
    md_path, html_path = report_run(args.run_dir, args.style, companions=companions)
    print(f"report: {md_path}")
    print(f"report: {html_path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from difflab.report.serve import serve_forever

    serve_forever(args.runs_dir, args.host, args.port)
    return 0


def os_error_message(exc: OSError) -> str:
    """``exc`` in one line, naming the file the user asked for rather than an atomic writer's ``.NAME.tmp-PID``."""
    if not exc.filename or not exc.strerror:
        return str(exc)
    path = Path(os.fsdecode(exc.filename))
    match = re.fullmatch(r"\.(.+)\.tmp-\d+", path.name)
    return f"{exc.strerror}: {path.with_name(match.group(1)) if match else path}"


def out_of_memory_message(exc: BaseException) -> str | None:
    """One line for an allocation that failed (a ``MemoryError``, torch's CPU allocator's or CUDA's out-of-memory
    ``RuntimeError``), or None for any other error."""
    text = str(exc)
    if not (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in text
        or "out of memory" in text.lower()
    ):
        return None
    match = re.search(r"allocate (\d+) bytes", text) or re.search(r"allocate ([\d.]+ [KMGTPE]i?B)", text)
    if match is None:
        size = ""
    elif match.group(1).isdigit():
        size = f" ({int(match.group(1)) / 2**30:.2f} GiB in one allocation)"
    else:
        size = f" ({match.group(1)} in one allocation)"
    return (
        f"out of memory{size}: lower the sizes asked for (batch sizes, sample or point counts, image size, "
        "model width) or free memory"
    )


def _close_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error gets a line of its own: in a terminal the bars
    clear their line; in a log file their last state stays, so a newline ends it."""
    tqdm = sys.modules.get("tqdm")
    bars = list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()))
    for bar in bars:
        bar.close()
    if bars and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        print(file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # one line at a time also into a file or pipe (`difflab run ... > log`): a killed run keeps every line it printed
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):
            pass
    parser = _parser()
    # Overrides may follow a flag (`difflab run mnist-ldm --table seed=1`): argparse leaves them over as extras.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command not in ("run", "train") or any(e.startswith("-") for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = list(args.overrides) + extras
    handlers = {
        "run": cmd_run,
        "train": cmd_train,
        "sample": cmd_sample,
        "evaluate": cmd_evaluate,
        "invert": cmd_invert,
        "config": cmd_config,
        "recipes": cmd_recipes,
        "compare-samplers": cmd_compare_samplers,
        "likelihood": cmd_likelihood,
        "report": cmd_report,
        "serve": cmd_serve,
    }
    succeeded = False
    try:
        code = handlers[args.command](args)
        succeeded = True
        return code
    except DifflabError as exc:
        _close_progress_bars()
        print(f"difflab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's doing (a full disk, a permission), not a bug: one line too
        _close_progress_bars()
        print(f"difflab: error: {os_error_message(exc)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory_message(exc)
        if message is None:
            raise
        _close_progress_bars()
        print(f"difflab: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130
    finally:
        if "difflab.training.distributed" in sys.modules:
            sys.modules["difflab.training.distributed"].shutdown(succeeded)


if __name__ == "__main__":
    raise SystemExit(main())
