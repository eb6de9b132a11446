"""difflab: train, sample, evaluate and explain diffusion and score-based generative models.

The most used pieces are importable from the top level (lazily, so the CLI starts fast)::

    from difflab import NoiseSchedule, ddpm_sample, ddim_sample
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NoiseSchedule": "difflab.diffusion.schedule",
    "ddpm_sample": "difflab.sampling.ddpm",
    "ddim_sample": "difflab.sampling.ddim",
    "DiffusionModel": "difflab.sampling.wrappers",
    "SAMPLERS": "difflab.sampling.solvers",
    "sample": "difflab.sampling.solvers",
    "probability_flow_likelihood": "difflab.sampling.likelihood",
    "ClassifierGuidance": "difflab.sampling.guidance",
    "ClassifierFreeGuidance": "difflab.sampling.guidance",
    "Trainer": "difflab.training.trainer",
    "TrainConfig": "difflab.training.trainer",
    "DenoiserMLP": "difflab.models.mlp",
    "NoisyClassifierMLP": "difflab.models.mlp",
    "load_states": "difflab.data.states",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
