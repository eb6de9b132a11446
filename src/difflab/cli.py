"""The ``difflab`` command line.

    difflab run RECIPE [key=value ...] [--config FILE] [--fresh]
    difflab run CONFIG.yaml [key=value ...]
    difflab config RECIPE            print a recipe's default config as YAML
    difflab recipes                  list the recipes
    difflab report RUN [--style S]   rebuild RUN/report.md and RUN/report.html from the run folder
    difflab serve [RUNS_DIR] [--port 8765] [--host 127.0.0.1]   browse run folders in a web browser

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
    show = commands.add_parser("config", help="print a recipe's default config as YAML")
    show.add_argument("recipe")
    commands.add_parser("recipes", help="list the recipes")
    report = commands.add_parser("report", help="(re)write a completed run's report.md and report.html")
    report.add_argument("run_dir", help="a completed run folder")
    report.add_argument("--style", default="default", help="report style (default: default)")
    serve = commands.add_parser("serve", help="browse run folders: metrics, configs, figures, trajectories")
    serve.add_argument("runs_dir", nargs="?", default="runs", help="folder holding run folders (default: runs)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
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
    config = config_from(recipe.config_class(), config_file, args.overrides)
    run = recipe.run(config, fresh=args.fresh)
    print(f"report: {run.path / 'report.md'}")
    print(f"report: {run.path / 'report.html'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from difflab.config import dump_yaml

    print(dump_yaml(_recipe(args.recipe).config_class()), end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from difflab.experiments import recipes

    for recipe in recipes().values():
        print(f"{recipe.name:12s} {recipe.summary}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from difflab.experiments import report_run

    md_path, html_path = report_run(args.run_dir, args.style)
    print(f"report: {md_path}")
    print(f"report: {html_path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from difflab.report.serve import serve_forever

    serve_forever(args.runs_dir, args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": cmd_run,
        "config": cmd_config,
        "recipes": cmd_recipes,
        "report": cmd_report,
        "serve": cmd_serve,
    }
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
