"""Inline SVG line charts of logged series (no JavaScript, no external files)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (steps of 1, 2 or 5 times a power of ten) within ``[low, high]``."""
    if high <= low:
        return [low]
    raw = (high - low) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    ticks, k = [], 0
    while first + k * step <= high + step * 1e-9:
        ticks.append(first + k * step)
        k += 1
    return ticks


def _label(value: float, log: bool) -> str:
    shown = 10**value if log else value
    if shown == 0:
        return "0"
    if abs(shown) >= 1000 or abs(shown) < 0.01:
        return f"{shown:.1e}"
    return f"{shown:.3g}"


def line_chart(
    series: dict[str, tuple[Sequence[int], Sequence[float]]],
    title: str = "",
    width: int = 560,
    height: int = 280,
    log_y: bool | None = None,
) -> str:
    """An ``<svg>`` plotting each named ``(steps, values)`` series; ``log_y=None`` uses a log axis when every
    value is positive and they span more than a factor of 20. Non-finite values are skipped."""
    clean = {
        name: [(float(s), float(v)) for s, v in zip(steps, values) if math.isfinite(float(v))]
        for name, (steps, values) in series.items()
    }
    clean = {k: v for k, v in clean.items() if v}
    esc = html.escape
    if not clean:
        return f'<svg class="chart" width="{width}" height="40"><text x="8" y="24">{esc(title)}: no data</text></svg>'
    ys = [v for pts in clean.values() for _, v in pts]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) > 20
    if log_y and min(ys) <= 0:
        log_y = False

    def ty(v: float) -> float:
        return math.log10(v) if log_y else v

    xs = [s for pts in clean.values() for s, _ in pts]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ty(v) for v in ys), max(ty(v) for v in ys)
    if x_high == x_low:
        x_high = x_low + 1
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    pad = (y_high - y_low) * 0.05
    y_low, y_high = y_low - pad, y_high + pad
    left, right, top, bottom = 62, 12, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(s: float) -> float:
        return left + (s - x_low) / (x_high - x_low) * plot_w

    def py(v: float) -> float:
        return top + (1 - (ty(v) - y_low) / (y_high - y_low)) * plot_h

    out = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="16" font-weight="bold">{esc(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
    ]
    for tick in _ticks(y_low, y_high):
        y = top + (1 - (tick - y_low) / (y_high - y_low)) * plot_h
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_label(tick, log_y)}</text>')
    for tick in _ticks(x_low, x_high):
        x = px(tick)
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" text-anchor="middle">{tick:,.6g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    for k, (name, points) in enumerate(clean.items()):
        colour = PALETTE[k % len(PALETTE)]
        path = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in points)
        if len(points) == 1:
            s, v = points[0]
            out.append(f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="3" fill="{colour}"/>')
        else:
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        out.append(
            f'<text x="{left + plot_w - 6}" y="{top + 14 + 13 * k}" text-anchor="end" fill="{colour}">'
            f"{esc(name)}</text>"
        )
    if log_y:
        out.append(f'<text x="{left + 4}" y="{top + plot_h - 4}" fill="#999">log scale</text>')
    out.append("</svg>")
    return "\n".join(out)
