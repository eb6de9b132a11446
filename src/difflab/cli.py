"""The ``difflab`` command line.

    difflab run RECIPE [key=value ...] [--config FILE] [--fresh] [--table]
    difflab run CONFIG.yaml [key=value ...]
    difflab config RECIPE            print a recipe's default config as YAML
    difflab recipes                  list the recipes

Errors a user can cause are printed as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from difflab.errors import ConfigError, DifflabError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="difflab", description="Diffusion models you can train, sample, evaluate and explain on a laptop."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe end to end into a run folder")
    run.add_argument("recipe", help="a recipe name (see `difflab recipes`) or a YAML config file with a recipe key")
    run.add_argument("overrides", nargs="*", help="config overrides, e.g. denoiser_train.steps=2000 device=cpu")
    run.add_argument("--config", help="a YAML file whose values replace the recipe's defaults")
    run.add_argument("--fresh", action="store_true", help="delete the run folder first instead of resuming")
    run.add_argument("--table", action="store_true",
                     help="run the recipe's comparison table (sets table=true; mnist-ldm)")
    sample = commands.add_parser("sample", help="draw samples from a finished run")
    sample.add_argument("run_dir", help="a run folder")
    sample.add_argument("--n", type=int, default=16, help="number of samples (default 16)")
    sample.add_argument("--digit", type=int, default=None, help="class label for a class-conditional run")
    sample.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance w in eps_u + w (eps_c - eps_u): 0 unconditional, "
                        "1 conditional (default), > 1 guided")
    sample.add_argument("--sampler", default="ddim", help="ddpm or ddim (default ddim)")
    sample.add_argument("--steps", type=int, default=50, help="sampling steps for DDIM (default 50)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="auto")
    sample.add_argument("--out", default=None, help="output PNG (default RUN/samples/sample_....png)")
    show = commands.add_parser("config", help="print a recipe's default config as YAML")
    show.add_argument("recipe")
    commands.add_parser("recipes", help="list the recipes")
    return parser


def _recipe(name: str):
    from difflab.experiments import recipes

    known = recipes()
    if name not in known:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(known)}")
    return known[name]


def _resolve_run_target(target: str, config_file: str | None) -> tuple[str, str | None]:
    """``difflab run X``: X is a recipe name, or a YAML file naming its recipe."""
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from difflab.config import read_yaml

        data = read_yaml(target)
        recipe = data.get("recipe")
        if not isinstance(recipe, str):
            raise ConfigError(f"{target} must name its recipe (recipe: states, swissroll, ...)")
        if config_file:
            raise ConfigError("give either a config file as the target or --config, not both")
        return recipe, target
    return target, config_file


def cmd_run(args: argparse.Namespace) -> int:
    from difflab.config import config_from

    recipe_name, config_file = _resolve_run_target(args.recipe, args.config)
    recipe = _recipe(recipe_name)
    overrides = list(args.overrides)
    if args.table:
        if not hasattr(recipe.config_class(), "table"):
            raise ConfigError(f"--table is for recipes with a comparison table (mnist-ldm), not {recipe_name!r}")
        overrides.append("table=true")
    config = config_from(recipe.config_class(), config_file, overrides)
    run = recipe.run(config, fresh=args.fresh)
    print(f"report: {run.path / 'report.md'}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.experiments.runs import read_run

    recipe = read_run(args.run_dir).get("recipe")
    if recipe in ("mnist-ddpm", "mnist-cfg"):
        from difflab.experiments.mnist import sample_from_run

        if args.n < 1:
            raise ConfigError(f"--n must be >= 1, got {args.n}")
        path = sample_from_run(args.run_dir, n=args.n, digit=args.digit, guidance=args.guidance,
                               sampler=args.sampler, steps=args.steps, seed=args.seed, device=args.device,
                               out=args.out)
        print(f"samples: {path} (tensors in {path.with_suffix('.pt')})")
        return 0
    raise ConfigError(f"sampling from a {recipe!r} run is not supported")


def cmd_config(args: argparse.Namespace) -> int:
    from difflab.config import dump_yaml

    print(dump_yaml(_recipe(args.recipe).config_class()), end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from difflab.experiments import recipes

    for recipe in recipes().values():
        print(f"{recipe.name:12s} {recipe.summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow a flag (`difflab run mnist-ldm --table seed=1`): argparse leaves them over as extras.
    args, extras = parser.parse_known_args(argv)
    if extras:
        if args.command != "run" or any(e.startswith("-") for e in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = list(args.overrides) + extras
    handlers = {"run": cmd_run, "sample": cmd_sample, "config": cmd_config, "recipes": cmd_recipes}
    try:
        return handlers[args.command](args)
    except DifflabError as exc:
        print(f"difflab: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
