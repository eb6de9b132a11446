"""Reports of the MNIST recipes, built from run folders alone (``config.yaml``, ``metrics.json``,
``metrics.jsonl``, ``figures/``), so ``difflab report RUN`` rebuilds them at any time.

- :func:`build_ddpm_report`: ``mnist-ddpm``'s report (style ``default``): grids, timings, FID/IS beside the
  evaluator's calibration rows, the determinism check, the forward process and the loss by timestep,
  targets, training, time, config, environment.
- :func:`build_cfg_report`: ``mnist-cfg``'s report (style ``default``): the digit grid, FID/IS/accuracy at w
  beside real data, the guidance sweep, targets, the denoising panel and progress grids, training, ...
- :func:`build_ddpm_vs_ddim_report`: the five-section "DDPM vs DDIM" write-up of a ``mnist-ddpm`` run (style
  ``ddpm-vs-ddim``): data tables only, no images, under :data:`MAX_CHARACTERS`; every number in it is a
  :class:`~difflab.report.document.Value` read from the ``metrics.json`` of the main run (source ``key``),
  of the ablation trained without t (source ``ablation:key``) or of the 2-D run whose forward panels it
  describes (``forward:key``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from difflab.config import to_dict
from difflab.errors import ConfigError, DifflabError
from difflab.experiments.mnist import MnistCFGConfig, MnistDDPMConfig
from difflab.experiments.runs import config_differences
from difflab.report import sections
from difflab.report.document import (
    Block,
    MetricRow,
    MetricTable,
    Paragraph,
    Report,
    Table,
    Value,
    lookup,
    metric,
    prose,
)
from difflab.report.rundata import RunContents, is_run_folder, load_run

MAX_CHARACTERS = 7500
FORWARD_RECIPES = ("swissroll", "states", "spiral", "moons")  # runs with figures/forward_process.png
IGNORED_KEYS = ("run_dir", "progress", "device")  # config keys that do not change what a run measures
TIME_INPUT = {
    "add": "is added to the features of every residual block",
    "film": "scales and shifts the normalised features of every residual block (FiLM)",
    "none": "is absent: this model is the ablation without t",
}


def _value(run: RunContents | None, key: str, digits: int = 3, percent: bool = False, role: str = "") -> Value:
    """The value at ``key`` of ``run``'s metrics.json; ``role`` prefixes its source (``ablation:ddim.fid``)."""
    if run is None:
        return Value(None)
    value = metric(run.metrics, key, digits, percent)
    return replace(value, source=f"{role}:{key}") if role else value


def _has(run: RunContents | None, key: str) -> bool:
    return run is not None and isinstance(lookup(run.metrics, key), (int, float))


def _number(run: RunContents, key: str) -> float | None:
    value = lookup(run.metrics, key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _data_name(config: Any) -> str:
    """What the run trained on, for titles: MNIST, sklearn's digits or the image folder."""
    data = config.data
    return {"mnist": "MNIST", "digits": "8 x 8 digits"}.get(data.source, f"Images of {data.path}")


def _class_word(config: Any) -> str:
    return "digit" if config.data.source in ("mnist", "digits") else "class"


def _floor_name(metrics: dict[str, Any]) -> str:
    """The calibration's floor row: real images outside the reference set (MNIST: held-out digits)."""
    return lookup(metrics, "evaluator.floor") or "real held-out"


def _features(metrics: dict[str, Any]) -> str:
    """Whose features and softmax the scores use."""
    return "InceptionV3" if lookup(metrics, "evaluator.classes_are_labels") is False else "the reference CNN"


MNIST_EVALUATOR = (
    "The project's MNIST evaluator: FID and IS in the feature space of its reference digit CNN against the "
    "10k test digits; the `floor:` rows score real held-out digits (and degraded copies) at the same n, so "
    "a sample set is read against what real data gets with as many images."
)


def _calibration_index(metrics: dict[str, Any], n: Any, name: str | None = None) -> int | None:
    rows = lookup(metrics, f"calibration.{n}")
    if not isinstance(rows, list):
        return None
    name = name or _floor_name(metrics)
    return next((i for i, row in enumerate(rows) if row.get("name") == name), None)


def _floor(run: RunContents, n: Any, field: str, digits: int = 2, percent: bool = False) -> Value | None:
    """What the floor's real images score for ``field`` at the same count ``n`` (the calibration's first row)."""
    index = _calibration_index(run.metrics, n)
    return None if index is None else _value(run, f"calibration.{n}.{index}.{field}", digits, percent)


def _calibration_rows(run: RunContents, n: Any, accuracy: bool = False) -> list[tuple[Any, ...]]:
    """The evaluator's calibration rows at count ``n``, as table rows ``(name, n, FID, IS[, accuracy], -)``."""
    rows = lookup(run.metrics, f"calibration.{n}") or []
    out = []
    for i, row in enumerate(rows):
        cells: list[Any] = [
            f"floor: {row.get('name', '')}",
            _value(run, f"calibration.{n}.{i}.n"),
            _value(run, f"calibration.{n}.{i}.fid", 2),
            _value(run, f"calibration.{n}.{i}.inception_score", 2),
        ]
        if accuracy:
            cells.append(_value(run, f"calibration.{n}.{i}.accuracy", 1, percent=True))
        cells.append(None)
        out.append(tuple(cells))
    return out


def _targets(run: RunContents) -> Table | None:
    rows = run.metrics.get("targets") or []
    if not rows:
        return None
    return Table(
        ("target", "measured", "met"),
        tuple((row["target"], _value(run, f"targets.{k}.value"), row["met"]) for k, row in enumerate(rows)),
    )


def _training_paragraph(run: RunContents, batch_size: int) -> Paragraph:
    return prose(
        "Trained ",
        _value(run, "training.step"),
        f" steps of batch {batch_size:,} in ",
        _value(run, "training.seconds", 0),
        " s (",
        _value(run, "training.images_per_second", 1),
        " images/s); final training loss ",
        _value(run, "training.final_train_loss", 4),
        ", validation eps-MSE ",
        _value(run, "training.validation.loss", 4),
        " (EMA weights, 10 timesteps, fixed noise).",
    )


def _no_scores(run: RunContents) -> Paragraph | None:
    if _has(run, "ddim.fid") or _has(run, "main.fid"):
        return None
    source = lookup(run.metrics, "data.source") or "non-MNIST"
    reason = lookup(run.metrics, "evaluator.none") or "the built-in evaluator judges MNIST digits only"
    return Paragraph(f"No FID or IS: this run trained on `{source}` data, and {reason}.")


def determinism_table(run: RunContents, role: str = "") -> Table:
    """Two samplings from the same x_T with different noise generators: are the images the same?"""

    def row(label: str, key: str) -> tuple[Any, ...]:
        return (
            label,
            _value(run, f"determinism.{key}.identical", role=role),
            _value(run, f"determinism.{key}.max_abs_diff", 4, role=role),
            _value(run, f"determinism.{key}.mean_abs_diff", 4, role=role),
        )

    ddim, ddpm = _value(run, "determinism.ddim_steps", role=role), _value(run, "determinism.ddpm_steps", role=role)
    return Table(
        ("sampler, same x_T twice", "identical", "max abs difference", "mean abs difference"),
        (
            row(f"DDIM-{ddim.text()}, eta 0", "ddim"),
            row(f"DDPM-{ddpm.text()}", "ddpm"),
            ("different x_T (scale)", None, None, _value(run, "determinism.different_x_T.mean_abs_diff", 4, role=role)),
        ),
        caption="Pixel differences of the final images (pixels in `[-1, 1]`).",
    )


def forward_table(run: RunContents) -> Table:
    rows = lookup(run.metrics, "forward.rows") or []
    return Table(
        ("t", "alpha_bar_t", "log10 SNR", "mean of x_t", "std of x_t", "closed-form std", "corr(x_t, x_0)"),
        tuple(
            (
                _value(run, f"forward.rows.{k}.t"),
                _value(run, f"forward.rows.{k}.alpha_bar", 4),
                _value(run, f"forward.rows.{k}.log10_snr", 2),
                _value(run, f"forward.rows.{k}.x_t_mean", 3),
                _value(run, f"forward.rows.{k}.x_t_std", 3),
                _value(run, f"forward.rows.{k}.closed_form_std", 3),
                _value(run, f"forward.rows.{k}.correlation_with_x0", 3),
            )
            for k in range(len(rows))
        ),
    )


def objective_table(run: RunContents) -> Table:
    rows = lookup(run.metrics, "objective.rows") or []
    return Table(
        ("t", "beta_t", "log10 SNR", "ELBO weight", "eps-MSE", "x0-MSE", "eps-MSE / SNR"),
        tuple(
            (
                _value(run, f"objective.rows.{k}.t"),
                _value(run, f"objective.rows.{k}.beta", 4),
                _value(run, f"objective.rows.{k}.log10_snr", 2),
                _value(run, f"objective.rows.{k}.elbo_weight", 4),
                _value(run, f"objective.rows.{k}.eps_mse", 4),
                _value(run, f"objective.rows.{k}.x0_mse", 4),
                _value(run, f"objective.rows.{k}.eps_mse_over_snr", 4),
            )
            for k in range(len(rows))
        ),
    )


# ---------------------------------------------------------------------------------------------------- mnist-ddpm


def build_ddpm_report(contents: RunContents) -> Report:
    """``mnist-ddpm``'s report, from the run folder alone."""
    config = contents.typed_config(MnistDDPMConfig())
    m, ev = contents.metrics, config.metrics
    steps = config.schedule.num_timesteps
    report = Report(f"{_data_name(config)}: DDPM vs DDIM with a time-conditioned U-Net")
    report.add(sections.run_summary(contents))
    report.add(
        Paragraph(
            f"{lookup(m, 'model.description') or 'U-Net'}; the sinusoidal time embedding "
            f"{TIME_INPUT[config.unet.time_conditioning]}; {config.schedule.kind} schedule, T = {steps:,}; "
            f"eps-prediction (the simple loss); AdamW lr {config.train.lr}, EMA {config.train.ema_decay}. "
            "The same network is sampled by DDPM (all T ancestral steps) and by DDIM (eta = 0, few steps). "
            "`difflab report RUN --style ddpm-vs-ddim` writes the five-section comparison."
        ),
        _training_paragraph(contents, config.train.batch_size),
    )
    report.section("Data", sections.data_table(contents))
    grid_rows = tuple(
        (
            f"{name.upper()}",
            _value(contents, f"grids.{name}.images"),
            _value(contents, f"grids.{name}.steps"),
            _value(contents, f"grids.{name}.network_evaluations"),
            _value(contents, f"grids.{name}.seconds", 2),
        )
        for name in ("ddpm", "ddim")
        if name in m.get("grids", {})
    )
    report.section(
        "Sample grids",
        sections.figure_if(contents, "figures/grid_ddpm.png", f"4 x 4 grid, DDPM with all {steps:,} steps"),
        sections.figure_if(contents, "figures/grid_ddim.png", f"4 x 4 grid, DDIM (eta = 0) with {ev.ddim_steps} steps"),
        Table(("grid", "images", "steps", "network evaluations", "wall time (s)"), grid_rows) if grid_rows else None,
        sections.trajectory_note(contents),
    )
    quality_rows: list[tuple[Any, ...]] = []
    for key, label in (
        ("ddpm", f"DDPM-{steps}"),
        ("ddim_at_ddpm_count", f"DDIM-{ev.ddim_steps}, its first {ev.n_ddpm:,} (the DDPM count)"),
        ("ddim", f"DDIM-{ev.ddim_steps}"),
    ):
        if key in m:
            speed_key = "ddim" if key == "ddim_at_ddpm_count" else key
            quality_rows.append(
                (
                    label,
                    _value(contents, f"{key}.n"),
                    _value(contents, f"{key}.fid", 2),
                    _value(contents, f"{key}.inception_score", 2),
                    _value(contents, f"{speed_key}.seconds_per_1000", 1),
                )
            )
    for n in m.get("calibration", {}):
        quality_rows += _calibration_rows(contents, n)
    n_main = lookup(m, "ddim.n")
    headline = (
        MetricTable(
            (
                MetricRow(
                    f"FID, DDIM-{ev.ddim_steps}",
                    _value(contents, "ddim.fid", 2),
                    _floor(contents, n_main, "fid"),
                    description=f"Frechet distance in {_features(m)}'s feature space (lower is better)",
                ),
                MetricRow(
                    f"IS, DDIM-{ev.ddim_steps}",
                    _value(contents, "ddim.inception_score", 2),
                    _floor(contents, n_main, "inception_score"),
                    description=f"exp E KL(p(y|x) || p(y)) of {_features(m)} (higher is better)",
                ),
            ),
            value_header="samples",
            floor_header=f"{_floor_name(m)}, same n (floor)",
        )
        if _has(contents, "ddim.fid")
        else None
    )
    report.section(
        "Quality and speed",
        _no_scores(contents),
        Paragraph(lookup(m, "evaluator.description") or MNIST_EVALUATOR) if _has(contents, "ddim.fid") else None,
        headline,
        Table(("samples", "n", "FID", "IS", "ms per image"), tuple(quality_rows)) if quality_rows else None,
    )
    report.section(
        "Deterministic or stochastic",
        Paragraph(
            "The same starting noise x_T sampled twice with different generators for everything after x_T: "
            "DDIM with eta = 0 adds no noise, so it should map x_T to one image; DDPM adds fresh noise at every step."
        ),
        determinism_table(contents) if "determinism" in m else None,
    )
    report.section(
        "Forward process and objective",
        prose(
            "The forward process `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps` measured on ",
            _value(contents, "forward.n"),
            " training images (pixel std ",
            _value(contents, "forward.x0_std"),
            "):",
        )
        if "forward" in m
        else None,
        forward_table(contents) if "forward" in m else None,
        prose(
            "The trained model's losses on ",
            _value(contents, "objective.n"),
            " held-out images; the ELBO weight is `beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t))` with "
            "`sigma_t^2 = beta_t`, which the simple loss replaces by one:",
        )
        if "objective" in m
        else None,
        objective_table(contents) if "objective" in m else None,
    )
    report.section("Targets", _targets(contents))
    report.section(
        "Training",
        sections.curves_table(contents),
        sections.figure_if(contents, "figures/loss.png", "Training and validation loss (eps-prediction MSE)"),
    )
    for title, blocks in sections.closing_sections(contents):
        report.section(title, *blocks)
    return report


# ---------------------------------------------------------------------------------------------------- mnist-cfg


def build_cfg_report(contents: RunContents) -> Report:
    """``mnist-cfg``'s report, from the run folder alone."""
    config = contents.typed_config(MnistCFGConfig())
    m, ev, guidance = contents.metrics, config.metrics, config.guidance
    report = Report(f"{_data_name(config)}: class-conditional diffusion with classifier-free guidance")
    report.add(sections.run_summary(contents))
    report.add(
        Paragraph(
            f"{lookup(m, 'model.description') or 'U-Net'}; the time embedding "
            f"{TIME_INPUT[config.unet.time_conditioning]}; a class embedding of {config.unet.num_classes} "
            f"{'digits' if _class_word(config) == 'digit' else 'classes'} and a learned null label, label dropout "
            f"{guidance.label_dropout}; "
            f"{config.schedule.kind} schedule, T = {config.schedule.num_timesteps:,}; AdamW lr {config.train.lr}, "
            f"weight decay {config.train.weight_decay}, clip {config.train.grad_clip}, EMA {config.train.ema_decay}. "
            "Guidance: `eps_hat = eps_u + w (eps_c - eps_u)` (w = 0 unconditional, w = 1 conditional, w > 1 guided)."
        ),
        _training_paragraph(contents, config.train.batch_size),
    )
    report.section("Data", sections.data_table(contents))
    n_main = lookup(m, "main.n")
    scored = _has(contents, "main.fid")
    histogram = lookup(m, "main.class_histogram") or []
    report.section(
        f"Samples at w = {guidance.w:g}",
        sections.figure_if(
            contents,
            "figures/digits_grid.png",
            f"One row per {_class_word(config)}, w = {guidance.w:g}, DDIM {ev.ddim_steps} steps (EMA weights)",
        ),
        _no_scores(contents),
        Paragraph(
            f"Scored samples: {guidance.sampler}, {guidance.steps} steps, balanced labels, fixed seeds; the floor is "
            f"what {_floor_name(m)} score with the same evaluator at the same n."
        ),
        Paragraph(lookup(m, "evaluator.description")) if _features(m) == "InceptionV3" and scored else None,
        MetricTable(
            (
                MetricRow(
                    "FID",
                    _value(contents, "main.fid", 2),
                    _floor(contents, n_main, "fid"),
                    description=f"Frechet distance in {_features(m)}'s feature space (lower is better)",
                ),
                MetricRow(
                    "IS",
                    _value(contents, "main.inception_score", 2),
                    _floor(contents, n_main, "inception_score"),
                    description=f"exp E KL(p(y|x) || p(y)) of {_features(m)} (higher is better)",
                ),
                *(
                    [
                        MetricRow(
                            "accuracy of the intended digit",
                            _value(contents, "main.accuracy", 1, percent=True),
                            _floor(contents, n_main, "accuracy", 1, percent=True),
                            description="share of samples the reference CNN reads as the digit asked for",
                        )
                    ]
                    if _has(contents, "main.accuracy")
                    else []
                ),
                MetricRow("ms per image", _value(contents, "main.seconds_per_1000", 1), description="sampling time"),
            ),
            value_header=f"samples (n = {n_main:,})" if isinstance(n_main, int) else "samples",
            floor_header=f"{_floor_name(m)}, same n (floor)",
        )
        if scored
        else None,
        prose(
            "Share classified as each digit: ",
            *[
                piece
                for k in range(len(histogram))
                for piece in ((", " if k else "") + f"{k}: ", _value(contents, f"main.class_histogram.{k}", 1, True))
            ],
            ".",
        )
        if histogram
        else None,
        sections.trajectory_note(contents),
    )
    sweep = m.get("sweep") or []
    sweep_rows: list[tuple[Any, ...]] = [
        (
            f"w = {row.get('w', 0):g}",
            _value(contents, f"sweep.{k}.n"),
            _value(contents, f"sweep.{k}.fid", 2),
            _value(contents, f"sweep.{k}.inception_score", 2),
            _value(contents, f"sweep.{k}.accuracy", 1, percent=True),
            _value(contents, f"sweep.{k}.seconds_per_1000", 1),
        )
        for k, row in enumerate(sweep)
    ]
    n_sweep = sweep[0].get("n") if sweep else None
    if n_sweep is not None and str(n_sweep) in m.get("calibration", {}):
        sweep_rows += _calibration_rows(contents, n_sweep, accuracy=True)
    report.section(
        "Guidance sweep",
        Paragraph(
            "The same labels and noise at every w. Larger w trades diversity (FID) for class fidelity (accuracy, "
            f"IS); the `floor:` rows are {_floor_name(m)} and degraded copies at the same n."
        ),
        Table(("samples", "n", "FID", "IS", "accuracy", "ms per image"), tuple(sweep_rows)) if sweep_rows else None,
    )
    report.section("Targets", _targets(contents))
    report.section(
        "How the samples form",
        sections.figure_if(contents, "figures/denoising_panel.png", "x_t and the predicted x_0 along DDIM"),
        sections.figure_if(contents, "figures/progress.png", "Fixed-noise samples after every epoch (DDIM)"),
    )
    report.section(
        "Training",
        sections.curves_table(contents),
        sections.figure_if(contents, "figures/loss.png", "Training and validation loss (eps-prediction MSE)"),
    )
    for title, blocks in sections.closing_sections(contents):
        report.section(title, *blocks)
    return report


# ---------------------------------------------------------------------------------------------------- ddpm-vs-ddim


def _peek(path: Path) -> tuple[str, dict[str, Any]] | None:
    """``(recipe, config)`` of a completed run folder with metrics, else ``None`` (read cheaply: no logs)."""
    try:
        record = json.loads((path / "run.json").read_text())
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(record, dict) or record.get("status") != "complete" or not (path / "metrics.json").is_file():
        return None
    return str(record.get("recipe", "")), config if isinstance(config, dict) else {}


def config_gap(main: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """The keys in which two ``mnist-ddpm`` runs' configs differ, beyond where they live and how they print (a key
    one of them predates is no difference while the other holds its default)."""
    defaults = to_dict(MnistDDPMConfig())
    return [k for k in config_differences(main, other, defaults) if k.split(".")[0] not in IGNORED_KEYS]


def find_companions(contents: RunContents) -> dict[str, Path]:
    """Runs beside ``contents`` (same parent folder, completed) that the five-section report can use:
    ``ablation``, a ``mnist-ddpm`` run differing only in ``unet.time_conditioning=none``; ``forward``, a 2-D
    run with forward-process panels (swissroll first, then states, spiral, moons)."""
    here = contents.path.resolve()
    siblings = sorted(p for p in contents.path.parent.iterdir() if p.is_dir() and p.resolve() != here)
    runs = {p: peeked for p in siblings if is_run_folder(p) and (peeked := _peek(p)) is not None}
    found: dict[str, Path] = {}
    for path, (recipe, config) in runs.items():
        if (
            recipe == "mnist-ddpm"
            and lookup(config, "unet.time_conditioning") == "none"
            and config_gap(contents.config, config) == ["unet.time_conditioning"]
        ):
            found["ablation"] = path
            break
    for wanted in FORWARD_RECIPES:
        match = [
            p for p, (recipe, _) in runs.items() if recipe == wanted and (p / "figures/forward_process.png").is_file()
        ]
        if match:
            found["forward"] = match[0]
            break
    return found


def _predates(what: str, key: str) -> Paragraph:
    return Paragraph(
        f"This run predates the {what} (`metrics.json` has no `{key}`); rerun it with this difflab to measure it."
    )


def _ms(run: RunContents, sampler: str) -> Value:
    """Milliseconds per image of ``sampler`` (``ddim`` or ``ddpm``): the comparison's, else the scored set's."""
    if _has(run, f"comparison.{sampler}_ms_per_image"):
        return _value(run, f"comparison.{sampler}_ms_per_image", 1)
    return _value(run, f"{sampler}.seconds_per_1000", 1)  # seconds per 1,000 images = ms per image


def _speed(run: RunContents, ddpm: str) -> list[Any]:
    """ "12.3x faster than DDPM-1000", or the two times when the run has no comparison entry."""
    if _has(run, "comparison.ddim_speedup"):
        return [_value(run, "comparison.ddim_speedup", 1), f"x faster than {ddpm}"]
    return [f"faster than {ddpm} (", _ms(run, "ddim"), " against ", _ms(run, "ddpm"), " ms per image)"]


def _verdict(ratio: float | None) -> str:
    """FID of DDIM over DDPM's, in words (within 15% counts as comparable)."""
    if ratio is None:
        return "unmeasured"
    return "comparable" if abs(ratio - 1) <= 0.15 else ("better" if ratio < 1 else "worse")


def _executive_summary(main: RunContents, ablation: RunContents | None) -> list[Block | None]:
    k, steps = _value(main, "grids.ddim.steps"), _value(main, "grids.ddpm.steps")
    ddim, ddpm = f"DDIM-{k.text()}", f"DDPM-{steps.text()}"
    if _has(main, "ddpm.fid"):
        verdict = _verdict(_number(main, "comparison.fid_ddim_over_ddpm"))
        takeaway = prose(
            f"**Takeaway: {ddim} sampled digits ",
            *_speed(main, ddpm),
            f" at {verdict} quality (FID ",
            _value(main, "ddim_at_ddpm_count.fid", 2),
            " against ",
            _value(main, "ddpm.fid", 2),
            ", n = ",
            _value(main, "ddpm.n"),
            ").**",
        )
    else:
        why = (
            f"{ddpm} drew no scored samples (metrics.n_ddpm = 0), so the two samplers' FIDs cannot be compared"
            if _has(main, "ddim.fid")
            else "this run has no FID (its data is not MNIST, which the evaluator needs)"
        )
        takeaway = prose(f"**Takeaway: {ddim} sampled ", *_speed(main, ddpm), f"; {why}.**")
    ddim_same = lookup(main.metrics, "determinism.ddim.identical")
    parts: list[Any] = [
        "A U-Net of ",
        _value(main, "model.parameters"),
        " parameters trained ",
        _value(main, "training.step"),
        " steps in ",
        _value(main, "training.seconds", 0),
        " s",
        *((" on ", _value(main, "data.training_images"), " images") if _has(main, "data.training_images") else ()),
        "; both samplers run this one network, since DDIM changes only the reverse process. Timed on the ",
        str(lookup(main.metrics, "comparison.timed_on") or "scored samples"),
        f", {ddim} took ",
        _ms(main, "ddim"),
        f" ms per image and {ddpm} ",
        _ms(main, "ddpm"),
        " ms.",
    ]
    if "determinism" in main.metrics:
        parts.append(
            " From the same x_T, two DDIM runs gave "
            + ("identical images" if ddim_same else "images differing by at most ")
        )
        if not ddim_same:
            parts.append(_value(main, "determinism.ddim.max_abs_diff", 4))
        parts += [
            ", two DDPM runs images differing by ",
            _value(main, "determinism.ddpm.mean_abs_diff", 4),
            " per pixel.",
        ]
    if ablation is not None:
        parts += [
            " Without t, the U-Net's validation eps-MSE was ",
            _value(ablation, "training.validation.loss", 4, role="ablation"),
            " against ",
            _value(main, "training.validation.loss", 4),
        ]
        if _has(ablation, "ddim.fid") and _has(main, "ddim.fid"):
            parts += [
                f" and its {ddim} FID ",
                _value(ablation, "ddim.fid", 2, role="ablation"),
                " against ",
                _value(main, "ddim.fid", 2),
            ]
        parts.append(".")
    return [takeaway, prose(*parts)]


def _forward_section(main: RunContents, forward: RunContents | None, kind: str) -> list[Block | None]:
    rows = lookup(main.metrics, "forward.rows") or []
    last = len(rows) - 1
    closed_form = (
        "No simulation is needed: `q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)` with "
        "`alpha_bar_t = prod_s (1 - beta_s)`, so training draws any `x_t = sqrt(alpha_bar_t) x_0 + "
        "sqrt(1 - alpha_bar_t) eps` in one step."
    )
    if not rows:
        return [
            Paragraph(closed_form),
            _predates("forward-process statistics", "forward"),
            _forward_panels(forward),
            Paragraph(f"{VARIANCE_PRESERVING}{VARIANCE_PRESERVING_END}"),
        ]
    blocks: list[Block | None] = [
        prose(
            f"{closed_form} The run's {kind} schedule (T = ",
            _value(main, "forward.num_timesteps"),
            "), measured on ",
            _value(main, "forward.n"),
            " training images (pixel mean ",
            _value(main, "forward.x0_mean"),
            ", std ",
            _value(main, "forward.x0_std"),
            "):",
        ),
        forward_table(main),
    ]
    if forward is not None:
        blocks.append(_forward_panels(forward))
    else:
        blocks.append(
            prose(
                "No point-cloud run with forward panels was given (`--forward RUN`); in pixels the table tells the "
                "same story: "
                "the pixel mean drifts from ",
                _value(main, "forward.rows.0.x_t_mean"),
                " to ",
                _value(main, f"forward.rows.{last}.x_t_mean"),
                " and the correlation of x_t with x_0 falls from ",
                _value(main, "forward.rows.0.correlation_with_x0"),
                " to ",
                _value(main, f"forward.rows.{last}.correlation_with_x0"),
                ": at `t = T - 1` nothing of the digit is left.",
            )
        )
    blocks.append(
        prose(
            f"{VARIANCE_PRESERVING} (measured between ",
            _value(main, "forward.x_t_std_min"),
            " and ",
            _value(main, "forward.x_t_std_max"),
            f", as the closed form says){VARIANCE_PRESERVING_END}",
        )
    )
    return blocks


VARIANCE_PRESERVING = (
    "Why variance-preserving: the coefficients satisfy `alpha_bar_t + (1 - alpha_bar_t) = 1`, so the std of x_t "
    "moves from the data's to one and never beyond"
)
VARIANCE_PRESERVING_END = (
    ". The network sees inputs of one scale at every t, and x_T is `N(0, I)`, exactly where sampling starts. A "
    "variance-exploding process, `x_t = x_0 + sigma_t eps`, needs `sigma_max` far above the data's scale, so its "
    "inputs span orders of magnitude."
)


def _forward_panels(forward: RunContents | None) -> Paragraph | None:
    if forward is None:
        return None
    return Paragraph(
        f"The point-cloud panels of `{forward.path / 'figures' / 'forward_process.png'}` (recipe "
        f"`{forward.recipe}`) show the same process on points: first the data; as t grows, `sqrt(alpha_bar_t)` "
        "shrinks the shape towards the origin while the noise blurs it, and the last panel is an isotropic "
        "Gaussian blob with no trace of the data."
    )


def _architecture_section(
    main: RunContents, ablation: RunContents | None, conditioning: str, gap: list[str]
) -> list[Block | None]:
    blocks: list[Block | None] = [
        prose(
            "The point-cloud walkthroughs use an MLP on `[x_t, t]`: a point has no spatial structure. Pixels do, "
            "so this run's network is a ",
            str(lookup(main.metrics, "model.description") or "U-Net"),
            ": convolutions share weights across positions, the down-sampling path sees the whole digit at low "
            "resolution and skip connections return the detail. The sinusoidal time embedding, through an MLP, "
            f"{TIME_INPUT[conditioning]}, so one network serves every noise level.",
        )
    ]
    if ablation is None:
        blocks.append(
            Paragraph(
                "No ablation run was given. Train the same config without t, "
                "`difflab run mnist-ddpm unet.time_conditioning=none run_dir=RUN-no-t`, and pass it with "
                "`--with RUN-no-t` (a completed sibling folder is found by itself)."
            )
        )
        return blocks
    blocks.append(
        Paragraph(
            f"Ablation `{ablation.path}`: the same config with `unet.time_conditioning=none`, no time embedding at "
            "all, so the network must read the noise level from x_t alone"
            + (f" (the runs also differ in {', '.join(f'`{k}`' for k in gap)})." if gap else ".")
        )
    )
    rows: list[tuple[Any, ...]] = [
        ("parameters", _value(main, "model.parameters"), _value(ablation, "model.parameters", role="ablation")),
        (
            "final training loss",
            _value(main, "training.final_train_loss", 4),
            _value(ablation, "training.final_train_loss", 4, role="ablation"),
        ),
        (
            "validation eps-MSE",
            _value(main, "training.validation.loss", 4),
            _value(ablation, "training.validation.loss", 4, role="ablation"),
        ),
    ]
    main_rows = lookup(main.metrics, "objective.rows") or []
    ablation_rows = lookup(ablation.metrics, "objective.rows") or []
    worst: tuple[float, Any] | None = None
    for k in range(min(len(main_rows), len(ablation_rows))):
        t = main_rows[k].get("t")
        if t != ablation_rows[k].get("t") or k in (0, len(main_rows) - 1):
            continue
        rows.append(
            (
                f"eps-MSE at t = {t}",
                _value(main, f"objective.rows.{k}.eps_mse", 4),
                _value(ablation, f"objective.rows.{k}.eps_mse", 4, role="ablation"),
            )
        )
        ratio = ablation_rows[k]["eps_mse"] / max(main_rows[k]["eps_mse"], 1e-12)
        if worst is None or ratio > worst[0]:
            worst = (ratio, _value(main, f"objective.rows.{k}.t"))
    for key, label in (("ddim", "DDIM"), ("ddpm", "DDPM")):
        if _has(main, f"{key}.fid") or _has(ablation, f"{key}.fid"):
            steps = _value(main, f"grids.{key}.steps").text()
            rows.append(
                (
                    f"FID, {label}-{steps}",
                    _value(main, f"{key}.fid", 2),
                    _value(ablation, f"{key}.fid", 2, role="ablation"),
                )
            )
    blocks.append(Table(("", "with t", "without t"), tuple(rows)))
    main_loss = _number(main, "training.validation.loss")
    ablation_loss = _number(ablation, "training.validation.loss")
    if main_loss is not None and ablation_loss is not None and worst is not None:
        if ablation_loss > 1.5 * main_loss:
            verdict = "higher by far: time conditioning pays clearly."
        elif ablation_loss > main_loss:
            verdict = (
                "higher, though not by far: in many dimensions the norm of x_t already reveals much of its noise level."
            )
        else:
            verdict = "not higher: at this size the network reads the noise level from x_t (its norm carries it)."
        blocks.append(
            prose(f"Without t the validation loss is {verdict} The relative gap is largest at t = ", worst[1], ".")
        )
    return blocks


def _objective_section(main: RunContents) -> list[Block | None]:
    rows = lookup(main.metrics, "objective.rows") or []
    last = len(rows) - 1
    elbo = (
        "Ho et al.'s ELBO term `L_{t-1}` is the eps-MSE weighted by `beta_t^2 / (2 sigma_t^2 alpha_t "
        "(1 - alpha_bar_t))` (here `sigma_t^2 = beta_t`)"
    )
    simple = "the simple loss this run trains sets the weights to one, which gave Ho et al. better samples"
    if not rows:
        return [
            Paragraph(IDENTITY),
            Paragraph(f"{elbo}; {simple} at a slightly worse likelihood."),
            _predates("loss-by-timestep", "objective"),
        ]
    return [
        Paragraph(IDENTITY),
        prose(
            f"{elbo}. Across these t the weights span a factor of ",
            _value(main, "objective.elbo_weight_max_over_min", 1),
            f"; {simple} at a slightly worse likelihood. Measured with the trained network on ",
            _value(main, "objective.n"),
            " held-out images:",
        ),
        objective_table(main),
        prose(
            "The last two columns agree: the identity, measured. In eps terms an x_0-loss weights step t by "
            "`1 / SNR(t)`: the x_0 error grows from ",
            _value(main, "objective.rows.0.x0_mse", 4),
            " to ",
            _value(main, f"objective.rows.{last}.x0_mse", 4),
            " as SNR falls, so the noisiest steps would dominate it and the fine detail of the low-noise steps "
            "would be neglected; the eps-loss weights every step alike.",
        ),
    ]


IDENTITY = (
    "With `x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`, a prediction of eps fixes one of x_0, "
    "`x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)`, and `||x_0 - x0_hat||^2 = "
    "||eps - eps_hat||^2 / SNR(t)` with `SNR(t) = alpha_bar_t / (1 - alpha_bar_t)`. Both losses have the "
    "same minimiser (the posterior mean E[x_0 | x_t]); they differ only in how they weight timesteps."
)


def _sampling_section(main: RunContents) -> list[Block | None]:
    m = main.metrics
    k, steps = _value(main, "grids.ddim.steps"), _value(main, "grids.ddpm.steps")
    ddim, ddpm = f"DDIM-{k.text()}", f"DDPM-{steps.text()}"
    rows: list[tuple[Any, ...]] = [
        (ddpm, steps, _ms(main, "ddpm"), *_scores(main, "ddpm")),
    ]
    if "ddim_at_ddpm_count" in m:
        rows.append(
            (
                f"{ddim}, first n",
                k,
                _ms(main, "ddim"),
                *_scores(main, "ddim_at_ddpm_count"),
            )
        )
    rows.append((ddim, k, _ms(main, "ddim"), *_scores(main, "ddim")))
    for n in dict.fromkeys((lookup(m, "ddpm.n"), lookup(m, "ddim.n"))):
        index = _calibration_index(m, n)
        if index is not None:
            key = f"calibration.{n}.{index}"
            rows.append((f"{_floor_name(m)} (floor)", None, None, *_scores(main, key)))
    blocks: list[Block | None] = [
        Table(("sampler", "steps", "ms per image", "n", "FID", "IS"), tuple(rows)),
        prose(
            f"{ddim} makes ",
            k,
            " network evaluations per image instead of ",
            steps,
            *(
                (
                    " (",
                    _value(main, "comparison.step_ratio", 1),
                    "x fewer); measured, it was ",
                    *_speed(main, ddpm),
                    ". ",
                )
                if _has(main, "comparison.ddim_speedup")
                else (". ",)
            ),
            *(
                (
                    "At equal n its FID is ",
                    _value(main, "ddim_at_ddpm_count.fid", 2),
                    " against ",
                    _value(main, "ddpm.fid", 2),
                    f" ({_verdict(_number(main, 'comparison.fid_ddim_over_ddpm'))}).",
                )
                if _has(main, "ddpm.fid") and _has(main, "ddim_at_ddpm_count.fid")
                else (
                    (f"{ddpm} drew no scored samples (metrics.n_ddpm = 0): no FID to compare.",)
                    if _has(main, "ddim.fid")
                    else ("No FID was measured.",)
                )
            ),
        ),
        Paragraph(
            "DDPM's step `x_{t-1} = mu_theta(x_t, t) + sigma_t z` draws a fresh z every step, so x_T only seeds a "
            "random path. DDIM with `eta = 0` has no noise term: it moves along the model's `x0_hat` and `eps_hat`, "
            "a discretised probability-flow ODE, so x_T fixes the image. DDIM's non-Markovian process has DDPM's "
            "marginals `q(x_t | x_0)`, so the network trained for DDPM serves it unchanged, and the smooth "
            "deterministic path tolerates large steps."
        ),
    ]
    if "determinism" not in m:
        blocks.append(Paragraph("This run predates the determinism measurement (`metrics.json` has no `determinism`)."))
        return blocks
    same = lookup(m, "determinism.ddim.identical")
    blocks += [
        prose("Measured from the same ", _value(main, "determinism.n"), " x_T, each sampled twice with other noise:"),
        determinism_table(main),
        prose(
            f"{ddim} {'reproduced every image exactly' if same else 'repeated its images up to float round-off'}; "
            f"{ddpm}'s repeats differed by ",
            _value(main, "determinism.ddpm.mean_abs_diff", 4),
            " per pixel, against ",
            _value(main, "determinism.different_x_T.mean_abs_diff", 4),
            " between images of different x_T.",
        ),
    ]
    return blocks


def _scores(run: RunContents, key: str) -> tuple[Value, Value, Value]:
    return _value(run, f"{key}.n"), _value(run, f"{key}.fid", 2), _value(run, f"{key}.inception_score", 2)


def build_ddpm_vs_ddim_report(
    contents: RunContents, ablation: RunContents | None = None, forward: RunContents | None = None
) -> Report:
    """The five-section "DDPM vs DDIM" write-up of a ``mnist-ddpm`` run: executive summary, forward process,
    architecture and time conditioning (with the ablation without t), the training objective, sampling.

    ``ablation`` (a ``mnist-ddpm`` run with ``unet.time_conditioning=none``) and ``forward`` (a 2-D run with
    forward panels) default to completed runs found beside ``contents`` (:func:`find_companions`).
    """
    if contents.recipe != "mnist-ddpm":
        raise ConfigError(f"the ddpm-vs-ddim report needs a mnist-ddpm run, got recipe {contents.recipe!r}")
    found = find_companions(contents) if ablation is None or forward is None else {}
    unreadable: list[str] = []

    def companion(role: str) -> RunContents | None:
        """The run found beside ``contents`` for ``role``; one that cannot be read (a damaged file) is left out and
        named in the report, as the user did not ask for it."""
        if role not in found:
            return None
        try:
            return load_run(found[role])
        except DifflabError as exc:
            unreadable.append(f"`{found[role]}` ({exc})")
            return None

    ablation = ablation or companion("ablation")
    forward = forward or companion("forward")
    if ablation is not None and ablation.recipe != "mnist-ddpm":
        raise ConfigError(f"--with needs a mnist-ddpm run trained without t, got recipe {ablation.recipe!r}")
    if ablation is not None and lookup(ablation.config, "unet.time_conditioning") != "none":
        raise ConfigError(f"--with {ablation.path} is not an ablation without t (unet.time_conditioning != none)")
    if forward is not None and forward.recipe not in FORWARD_RECIPES:
        raise ConfigError(f"--forward needs a {', '.join(FORWARD_RECIPES)} run, got recipe {forward.recipe!r}")
    config = contents.typed_config(MnistDDPMConfig())
    gap = [k for k in config_gap(contents.config, ablation.config) if k != "unet.time_conditioning"] if ablation else []

    report = Report("DDPM vs DDIM on MNIST")
    used = [f"main `{contents.path}`"]
    if ablation is not None:
        used.append(f"ablation without t `{ablation.path}`")
    if forward is not None:
        used.append(f"forward panels `{forward.path}`")
    report.add(
        Paragraph(
            "Runs: " + ", ".join(used) + ". Every number is read from their `metrics.json` (in the HTML, "
            "`data-source` names the key)."
            + (f" Left out, as they could not be read: {'; '.join(unreadable)}." if unreadable else "")
        )
    )
    report.section("1 Executive summary", *_executive_summary(contents, ablation))
    report.section("2 Forward process dynamics", *_forward_section(contents, forward, config.schedule.kind))
    report.section(
        "3 Architecture and time conditioning",
        *_architecture_section(contents, ablation, config.unet.time_conditioning, gap),
    )
    report.section("4 The training objective", *_objective_section(contents))
    report.section("5 Sampling and inference", *_sampling_section(contents))
    return report
