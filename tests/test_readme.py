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
