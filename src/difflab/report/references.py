"""The reference experiments' own published figures, per recipe, shown beside each run's metrics.

A report prints a metric next to two yardsticks: what real data scores under the same metric (the
floor, measured by the run itself and stored in ``metrics.json``), and, where the reference experiment
published one, its own figure (kept here, since no run measures it). ``HEADLINE_METRICS`` names the
few ``metrics.json`` keys the run browser shows for each recipe in its list of runs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReferenceFigure:
    """A published figure: ``metric`` (the name a report uses), ``label`` (what the figure is), ``value``,
    ``better`` (``lower`` or ``higher``) and where it comes from."""

    metric: str
    label: str
    value: float
    better: str
    source: str

    def text(self) -> str:
        return f"{self.value:g} ({self.label})"


STATES_SOURCE = "CSE 849 (MSU, Spring 2025) diffusion project, grading of nll_course"

REFERENCE_FIGURES: dict[str, tuple[ReferenceFigure, ...]] = {
    "states": (
        ReferenceFigure("nll_course", "pass line", 2.5, "lower", STATES_SOURCE),
        ReferenceFigure("nll_course", "bug-free", 2.3, "lower", STATES_SOURCE),
    ),
    # Recipes still to come; keyed by the recipe names they are expected to have.
    "ncsn": (
        ReferenceFigure("inception_score", "reference NCSN", 1.99, "higher", "the reference's published NCSN result"),
        ReferenceFigure("fid", "reference NCSN", 139.9, "lower", "the reference's published NCSN result"),
    ),
    "rgb2ir": (
        ReferenceFigure("psnr", "reference RGB->IR", 11.5, "higher", "the reference's published RGB->IR result"),
        ReferenceFigure("ssim", "reference RGB->IR", 0.07, "higher", "the reference's published RGB->IR result"),
    ),
}

HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "states": (
        "uncond.nll_course",
        "uncond.nll_reverse",
        "real.nll_course",
        "cond.all.nll_course",
        "timings_seconds.total",
    ),
    "swissroll": ("samples.nll_course", "samples.nll_reverse", "real.nll_course", "timings_seconds.total"),
    "spiral": ("samples.nll_course", "samples.nll_reverse", "real.nll_course", "timings_seconds.total"),
    "moons": ("samples.nll_course", "samples.nll_reverse", "real.nll_course", "timings_seconds.total"),
    "mnist-ddpm": (
        "ddim.fid",
        "ddpm.fid",
        "comparison.ddim_speedup",
        "training.validation.loss",
        "timings_seconds.total",
    ),
    "rgb2ir": (
        "headline.psnr",
        "headline.ssim",
        "scores.denoised.psnr",
        "scores.t_start.psnr",
        "timings_seconds.total",
    ),
    "mnist-cfg": (
        "main.fid",
        "main.accuracy",
        "main.inception_score",
        "training.validation.loss",
        "timings_seconds.total",
    ),
}


def reference_figures(recipe: str, metric: str) -> tuple[ReferenceFigure, ...]:
    """The published figures of ``recipe`` for ``metric`` (empty when there are none)."""
    return tuple(f for f in REFERENCE_FIGURES.get(recipe, ()) if f.metric == metric)


def reference_value(recipe: str, metric: str, label: str) -> float:
    """One published figure, by its label (``reference_value("states", "nll_course", "pass line")``)."""
    for figure in reference_figures(recipe, metric):
        if figure.label == label:
            return figure.value
    raise KeyError(f"no reference figure {label!r} for {recipe}.{metric}")


def reference_text(recipe: str, metric: str) -> str:
    """``"2.5 (pass line) / 2.3 (bug-free)"``, or ``""`` when the reference published nothing for it."""
    return " / ".join(f.text() for f in reference_figures(recipe, metric))
