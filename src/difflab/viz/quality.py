"""Sample quality against the number of network evaluations (NFE), one panel per metric."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def quality_vs_nfe(
    series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    path: Path,
    title: str,
    references: Mapping[str, float] | None = None,
) -> Path:
    """``series[metric][sampler] = [(nfe, value), ...]``; ``references[metric]`` is drawn as a dashed line
    (e.g. the score real held-out data gets). Log-scaled NFE axis; lower values are better."""
    metrics = list(series)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        every = [v for points in series[metric].values() for _, v in points if np.isfinite(v)]
        if references and metric in references:
            every.append(references[metric])
        # a diverged few-step sampler must not flatten the rest: clip the axis, mark clipped points
        top = None
        if every:
            low, q75 = min(every), float(np.percentile(every, 75))
            top = min(max(every), low + 4 * (q75 - low) + 0.5)
        for sampler, points in series[metric].items():
            if points:
                nfe, values = zip(*sorted(points), strict=True)
                shown = [min(v, top) if top is not None else v for v in values]
                (line,) = ax.plot(nfe, shown, marker="o", markersize=3, label=sampler)
                clipped = [(n, top) for n, v in zip(nfe, values, strict=True) if top is not None and v > top]
                if clipped:
                    ax.plot(
                        *zip(*clipped, strict=True), marker="^", markersize=8, linestyle="none", color=line.get_color()
                    )
        if references and metric in references:
            ax.axhline(references[metric], color="black", linestyle="--", linewidth=1, label="real held-out data")
        if top is not None:
            ax.set_ylim(top=top + 0.02 * (top - min(every)) + 1e-9)
        ax.set_xscale("log")
        ax.set(
            xlabel="network evaluations (NFE)", ylabel=f"{metric} (lower is better)", title=f"{metric} (▲: off scale)"
        )
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
