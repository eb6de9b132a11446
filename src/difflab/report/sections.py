"""Sections every recipe's report shares, built from a run folder: the run itself, data summary,
logged training curves, where the time went, the resolved config and the environment."""

from __future__ import annotations

import json
import math
from typing import Any

from difflab.report.document import Block, BulletList, Code, Figure, Paragraph, Report, Table, Value, metric
from difflab.report.render import report_from_markdown
from difflab.report.rundata import TRAJECTORY_FILE, RunContents


def run_summary(contents: RunContents) -> Paragraph:
    """One paragraph: run folder, recipe, command, status and where the numbers live."""
    record = contents.record
    command = record.get("command") or ""
    parts = [f"Run folder `{contents.path}`, recipe `{contents.recipe}`"]
    if command:
        parts.append(f"made by `{command}`")
    return Paragraph(
        ", ".join(parts) + ". The resolved config is in `config.yaml`; every number in the tables below is in "
        "`metrics.json` (logged curves in `metrics.jsonl`)."
    )


def data_table(contents: RunContents, labels: dict[str, str] | None = None) -> Table | Paragraph:
    """``metrics.json``'s ``data`` entry (what the run trained and scored on) as a table."""
    data = contents.metrics.get("data")
    if not isinstance(data, dict) or not data:
        return Paragraph("This run did not record a data summary (it predates `metrics.json`'s `data` entry).")
    labels = labels or {}
    rows = []
    for key, value in data.items():
        label = labels.get(key, key.replace("_", " "))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            rows.append((label, metric(contents.metrics, f"data.{key}")))
        elif isinstance(value, dict):
            rows.append(
                (label, ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in value.items()))
            )
        elif isinstance(value, (list, tuple)):
            rows.append((label, ", ".join(str(v) for v in value)))
        else:
            rows.append((label, str(value)))
    return Table(("item", "value"), tuple(rows))


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def curves_table(contents: RunContents, skip: tuple[str, ...] = ("/lr",)) -> Table | None:
    """Every logged series of ``metrics.jsonl``: points, first, last, best and its step."""
    rows = []
    for tag, (steps, values) in contents.series.items():
        if any(tag.endswith(s) for s in skip) or not values:
            continue
        finite = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
        maximise = "accuracy" in tag
        best = (max if maximise else min)(finite, key=lambda sv: sv[1]) if finite else (None, None)
        rows.append(
            (
                f"`{tag}`",
                len(values),
                Value(values[0], f"metrics.jsonl:{tag}", 4),
                Value(values[-1], f"metrics.jsonl:{tag}", 4),
                Value(best[1], f"metrics.jsonl:{tag}", 4),
                best[0],
            )
        )
    if not rows:
        return None
    return Table(
        ("series", "points", "first", "last", "best", "best at step"),
        tuple(rows),
        caption="From `metrics.jsonl` (also in `tensorboard/`); best is the highest accuracy or the lowest loss.",
    )


def timings_table(contents: RunContents) -> Table | Paragraph:
    timings = contents.metrics.get("timings_seconds")
    if not isinstance(timings, dict):
        return Paragraph("No timings were recorded.")
    names = {"total": "total (wall time, stages included)"}
    rows = tuple((names.get(k, k), metric(contents.metrics, f"timings_seconds.{k}", 1)) for k in timings)
    return Table(("stage (this session)", "seconds"), rows)


def config_block(contents: RunContents) -> Code:
    return Code(contents.config_text or "(config.yaml is missing)", "yaml", "Resolved config (config.yaml)")


def environment_table(contents: RunContents) -> Table | Paragraph:
    """The machine that made the run (from ``run.json``): versions, device, threads."""
    env = contents.environment
    if not env:
        return Paragraph("`run.json` records no environment.")
    rows = [("device used", str(contents.metrics["device"]))] if "device" in contents.metrics else []
    return Table(("item", "value"), tuple(rows + sorted(env.items())))


def trajectory_note(contents: RunContents) -> Paragraph | None:
    if not contents.has(TRAJECTORY_FILE):
        return None
    return Paragraph(
        f"The denoising trajectory of a few samples (x_t and the predicted x_0 at about 20 timesteps) is in "
        f"`{TRAJECTORY_FILE}`; `difflab serve` shows it with a slider over the timesteps."
    )


def figure_if(contents: RunContents, path: str, caption: str) -> Figure | None:
    """A figure block when the file exists in the run folder, else ``None``."""
    return Figure(path, caption) if contents.has(path) else None


def inversion_blocks(contents: RunContents) -> list[Block | None]:
    """The round trips ``difflab invert`` wrote to ``inversion.json`` (and its figure), or nothing."""
    if not contents.has("inversion.json"):
        return []
    try:
        inverted = json.loads((contents.path / "inversion.json").read_text())
        rows = [row for row in inverted["rows"] if isinstance(row, dict)]
        t_end, alpha_bar = int(inverted["t_end"]), float(inverted["alpha_bar_t_end"])
    except (OSError, ValueError, KeyError, TypeError):
        return [Paragraph("`inversion.json` is damaged; rerun `difflab invert` on this run.")]
    about = [str(inverted[key]) for key in ("images", "model") if inverted.get(key)]
    header, values = inversion_table(rows)
    digits = (5, 2, 2, 4, 1)  # MSE, pooled PSNR, mean PSNR per image, SSIM, seconds
    return [
        Paragraph(
            f"`difflab invert` on this run: DDIM inversion (or the second-order flow, order 2) to t = {t_end} "
            f"(alpha_bar = {alpha_bar:.4g}) and back with the same steps"
            + (f"; {'; '.join(about)}" if about else "")
            + ". NFE counts both directions (from `inversion.json`)."
        ),
        Table(
            header,
            tuple(row[:-5] + tuple(Value(v, "inversion.json", d) for v, d in zip(row[-5:], digits)) for row in values),
        ),
        figure_if(contents, "figures/inversion.png", "Round trips: the originals, then each setting's reconstruction"),
    ]


def _side_file(contents: RunContents, name: str) -> dict[str, Any] | None | str:
    """The JSON a sampling command wrote beside the run (``name``, relative to the run folder): its content, None when
    it is absent, or the string "damaged"."""
    if not contents.has(name):
        return None
    try:
        data = json.loads((contents.path / name).read_text())
    except (OSError, ValueError):
        return "damaged"
    return data if isinstance(data, dict) else "damaged"


def _sentence(text: str) -> str:
    """``text`` as a sentence: its first letter capitalised (the rest as it is), a full stop at the end."""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def likelihood_blocks(contents: RunContents) -> list[Block | None]:
    """The exact likelihood ``difflab likelihood`` wrote to ``likelihood.json``, or nothing."""
    record = _side_file(contents, "likelihood.json")
    if record is None:
        return []
    model = record.get("model") if isinstance(record, dict) else None
    if not isinstance(model, dict):
        return [Paragraph("`likelihood.json` is damaged; rerun `difflab likelihood` on this run.")]
    source = "likelihood.json"
    rows: list[tuple[Any, ...]] = [
        (
            "probability-flow ODE (exact, up to the solver's tolerance)",
            Value(model.get("n"), source, 0),
            Value(model.get("nll_nats"), source, 2),
            Value(model.get("nll_nats_per_dim"), source, 4),
            Value(model.get("bits_per_dim"), source, 4),
            Value(model.get("nfe"), source, 0),
            Value(model.get("seconds"), source, 1),
        )
    ]
    vlb = record.get("vlb")
    if isinstance(vlb, dict):
        rows.append(
            (
                f"variational bound ({vlb.get('description', 'all T terms')})",
                Value(vlb.get("n"), source, 0),
                None,
                None,
                Value(vlb.get("bits_per_dim"), source, 4),
                None,
                Value(vlb.get("seconds"), source, 1),
            )
        )
    blocks: list[Block | None] = [
        Paragraph(
            f"`difflab likelihood` on this run: the negative log-likelihood of held-out data by the probability-flow "
            f"ODE ({model.get('method', 'RK45')}, rtol {model.get('rtol')}, t_min {model.get('t_min')}, divergence by "
            f"{model.get('divergence', 'Hutchinson')}). "
            + (_sentence(str(model["dequantization"])) if model.get("dequantization") else "")
        ),
        Table(("estimate", "n", "NLL (nats)", "NLL per dimension (nats)", "bits/dim", "NFE", "seconds"), tuple(rows)),
    ]
    kde = record.get("kde")
    if isinstance(kde, dict) and kde:
        blocks.append(
            Table(
                ("the same points under", "mean NLL (nats)"),
                tuple((key.replace("_", " "), Value(value, source, 3)) for key, value in kde.items()),
            )
        )
    return blocks


METRIC_NAMES = {"fid": "FID"}  # how the comparison's metric keys are shown


def comparison_blocks(contents: RunContents) -> list[Block | None]:
    """The latest sampler comparison ``difflab compare-samplers`` wrote to ``compare_samplers/``, or nothing."""
    record = _side_file(contents, "compare_samplers/results.json")
    if record is None:
        return []
    rows = record.get("rows") if isinstance(record, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        return [Paragraph("`compare_samplers/results.json` is damaged; rerun `difflab compare-samplers` on this run.")]
    source = "compare_samplers/results.json"
    references = record.get("references") if isinstance(record.get("references"), dict) else {}
    metrics = list(references) or [k for k in rows[0] if k not in ("sampler", "budget", "nfe", "steps", "seconds")]
    metrics = [m for m in metrics if any(isinstance(row.get(m), (int, float)) for row in rows)]
    table_rows = tuple(
        (
            f"`{row.get('sampler')}`",
            Value(row.get("budget"), source, 0),
            Value(row.get("nfe"), source, 0),
            *(Value(row.get(m), source, 3) for m in metrics),
            Value(row.get("seconds"), source, 1),
        )
        for row in rows
    )
    reference_row = (
        "real held-out data",
        None,
        None,
        *(Value(references.get(m), source, 3) for m in metrics),
        None,
    )
    return [
        Paragraph(
            f"`difflab compare-samplers` on this run (the latest call; earlier ones are kept under "
            f"`compare_samplers/earlier/`): {record.get('n')} samples per sampler and budget, seed "
            f"{record.get('seed')} (the same starting noise for every sampler); lower is better for every score."
        ),
        Table(
            ("sampler", "NFE budget", "NFE spent", *(METRIC_NAMES.get(m, m) for m in metrics), "seconds"),
            (*table_rows, reference_row),
        ),
        figure_if(contents, "compare_samplers/quality_vs_nfe.png", "Quality against the number of network calls"),
    ]


def inversion_table(rows: list[dict[str, Any]]) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """Header and rows of ``inversion.json``'s round trips (``difflab invert`` prints them, reports show them);
    the last five columns are MSE (of latents, for latent runs; of [-1, 1] pixels otherwise), the PSNR of the MSE
    pooled over the items, the mean of the items' own PSNRs (both on [0, 1] pixels), SSIM and seconds."""
    latent = any("latent_mse" in row for row in rows)
    header = ("images", "spacing", "order", "steps", "fixed-point iterations", "NFE", "n")
    header += (
        "latent MSE" if latent else "MSE (pixels in [-1, 1])",
        "PSNR of the pooled MSE (dB)",
        "mean PSNR per image (dB)",
        "SSIM",
        "seconds",
    )
    values = [
        (
            str(row.get("side", "pixels")),
            row.get("spacing", "uniform"),
            row.get("order", 1),
            row.get("steps"),
            row.get("fixed_point_iterations", 0),
            row.get("nfe"),
            row.get("n"),
            row.get("latent_mse", row.get("mse")),
            row.get("psnr_db"),
            row.get("psnr_db_mean_per_image"),
            row.get("ssim"),
            row.get("seconds"),
        )
        for row in rows
    ]
    return header, values


def closing_sections(contents: RunContents) -> list[tuple[str, list[Block | None]]]:
    """The sections every report ends with: what the sampling commands measured on the run (``compare-samplers``,
    ``likelihood``, ``invert``, each when it ran), time, config, environment."""
    commands = [
        ("Sampler comparison (difflab compare-samplers)", comparison_blocks(contents)),
        ("Exact likelihood (difflab likelihood)", likelihood_blocks(contents)),
        ("DDIM round trips (difflab invert)", inversion_blocks(contents)),
    ]
    return [(title, blocks) for title, blocks in commands if blocks] + [
        ("Where the time goes", [timings_table(contents)]),
        ("Configuration", [config_block(contents)]),
        (
            "Environment",
            [
                Paragraph("The machine that made the run (from `run.json`; the device from `metrics.json`)."),
                environment_table(contents),
            ],
        ),
    ]


def markdown_report(contents: RunContents, body: str) -> Report:
    """A report whose body a recipe writes as Markdown text (title, sections, tables, figures), read back as a
    :class:`Report` and ended by :func:`closing_sections`, as every built report is."""
    report = report_from_markdown(body)
    for title, blocks in closing_sections(contents):
        report.section(title, *blocks)
    return report


def bullet(items: list[str]) -> BulletList:
    return BulletList(tuple(items))


def share_text(shares: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.1%}" for k, v in shares.items() if isinstance(v, (int, float)))
