"""The README's Python examples run as written (with smaller sizes) and do what they say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

# What each example spends, cut to test size: (pattern, replacement), each of which must occur.
SHRINK = [
    (r"steps=3000", "steps=400"),
    (r"\(5000, 2\)", "(400, 2)"),
    (r"\.data\[:1000\]", ".data[:64]"),
]


def readme_python() -> list[str]:
    """The README's ```python blocks, in order, cut to test size by :data:`SHRINK`."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    assert len(blocks) == 3, "the README's Python examples changed: update this test"
    for pattern, replacement in SHRINK:
        found = 0
        for k, block in enumerate(blocks):
            blocks[k], count = re.subn(pattern, replacement, block)
            found += count
        assert found, f"the README no longer holds {pattern!r}: update SHRINK"
    return blocks


def test_the_readmes_python_examples_run_and_learn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from difflab.metrics.points import nll_course

    training, solvers, langevin = readme_python()
    monkeypatch.chdir(tmp_path)  # the examples write runs/notebook/ under the working directory
    namespace: dict = {"__name__": "readme"}
    exec(compile(training, f"{README} (training)", "exec"), namespace)
    data = namespace["data"].data
    noise_score = nll_course(torch.randn(400, 2, generator=torch.Generator().manual_seed(0)), data)
    # 400 steps of the notebook's training already move DDPM's and DDIM's samples onto the outlines
    assert nll_course(namespace["samples"], data) < noise_score - 1.0
    assert nll_course(namespace["fast"], data) < noise_score - 1.0
    assert (tmp_path / "runs" / "notebook" / "checkpoints" / "denoiser.safetensors").is_file()
    exec(compile(solvers, f"{README} (solvers)", "exec"), namespace)  # continues with the trained net
    assert nll_course(namespace["x"], data) < noise_score - 1.0
    nll = namespace["nll"]
    assert nll.shape == (64,) and torch.isfinite(nll).all()
    exec(compile(langevin, f"{README} (Langevin)", "exec"), namespace)  # an untrained score model: shapes only
    assert namespace["x"].shape == (400, 2)
    # the recorded levels, then the final denoising step's output as level K = 10
    recorded = [(level, tuple(x.shape)) for level, _, x in namespace["trajectory"]]
    assert recorded == [(k, (400, 2)) for k in (0, 5, 9, 10)]


def readme_commands() -> list[str]:
    """Every ``difflab ...`` line of the README's ```bash blocks, without its comment, continuation lines joined."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", README.read_text(), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            line = re.sub(r"^torchrun .*?-m difflab", "difflab", line)
            if line.startswith("difflab "):
                commands.append(line)
    return commands


def as_argv(command: str, folder: Path) -> list[str]:
    """A README command as the argv ``main`` takes: placeholders (RUN, DIR, FILE, a `runs/...` folder) become
    ``folder``, an optional ``[...]`` is taken, and of ``a | b`` the first; ``> my.yaml`` is dropped."""
    command = command.split(" > ")[0]
    command = re.sub(r"\[([^\[\]|]*?)\s*\|\s*[^\[\]]*\]", r"\1", command)  # [--full ddpm | --no-full]
    command = re.sub(r"\[(--[^\[\]]*)\]", r"\1", command)  # [--n 5000]
    words = command.split()[1:]
    return [
        str(folder) if word in ("RUN", "DIR", "FILE", "FILE.pt") or word.startswith("runs/") else word for word in words
    ]


def test_every_difflab_command_in_the_readme_parses_and_its_config_loads(tmp_path: Path) -> None:
    """The flags of every documented command exist, and every documented ``run`` / ``train`` config (recipe,
    YAML file and key=value overrides) loads: a renamed key or flag fails here, not in a reader's terminal."""
    from difflab.cli import _parser, _recipe, _resolve_run_target, recipe_config
    from difflab.config import dump_yaml

    my_yaml = tmp_path / "my.yaml"  # what `difflab config states > my.yaml` writes
    dump_yaml(_recipe("states").config_class(), my_yaml)
    commands = readme_commands()
    assert len(commands) > 40, "the README's commands are gone"
    parser = _parser()
    checked_configs = 0
    for command in commands:
        argv = as_argv(command, tmp_path)
        if argv[0] in ("--version",):
            continue
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's command does not parse: {command}")
        if args.command in ("run", "train"):
            root = README.parent
            target = str(root / args.recipe) if args.recipe and args.recipe.endswith(".yaml") else args.recipe
            config = str(my_yaml) if args.config == "my.yaml" else args.config
            overrides = [o.replace("DIR", str(tmp_path)) for o in args.overrides]
            recipe_config(*_resolve_run_target(target, config, overrides))
            checked_configs += 1
    assert checked_configs > 25
