"""The report's two plots as inline SVG, drawn here: score against cost (each column's mean
with its interval, at its mean wall seconds per session) and score by iteration (the mean score
of the image each column had kept after k iterations).

Inline SVG, not matplotlib: matplotlib is only a dev dependency (bench/), the plots are a few
points and lines, and the report stays one self-contained HTML file with text that scales.
"""

from __future__ import annotations

import math
from html import escape

W, H = 520, 300
LEFT, RIGHT, TOP, BOTTOM = 58, 130, 16, 42  # the right margin holds the legend
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
GREY = "#7f7f7f"


def colours(names: list[str]) -> dict[str, str]:
    """A colour per column, the baseline grey."""
    others = [n for n in names if n != "baseline"]
    found = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(others)}
    return found | ({"baseline": GREY} if "baseline" in names else {})


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if m * step >= raw)
    ticks = [math.floor(lo / step) * step]
    while ticks[-1] < hi - step * 1e-9:  # the last tick at or above hi: nothing drawn outside
        ticks.append(ticks[-1] + step)
    return [round(t, 12) for t in ticks]


class _Axes:
    def __init__(self, xs: list[float], ys: list[float], x_label: str, y_label: str) -> None:
        self.xt = _ticks(min(xs, default=0.0), max(xs, default=1.0))
        self.yt = _ticks(min(ys, default=0.0), max(ys, default=1.0))
        self.x_label, self.y_label = x_label, y_label
        self.parts: list[str] = []

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return LEFT + (v - lo) / ((hi - lo) or 1.0) * (W - LEFT - RIGHT)

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        return H - BOTTOM - (v - lo) / ((hi - lo) or 1.0) * (H - TOP - BOTTOM)

    def frame(self) -> None:
        p = self.parts
        for t in self.yt:
            y = self.y(t)
            p.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="#eee"/>'
            )
            p.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
        for t in self.xt:
            x = self.x(t)
            p.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{t:g}</text>')
        p.append(
            f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#444"/>'
            f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#444"/>'
        )
        p.append(
            f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">'
            f"{escape(self.x_label)}</text>"
            f'<text transform="translate(14 {(TOP + H - BOTTOM) / 2}) rotate(-90)" '
            f'text-anchor="middle">{escape(self.y_label)}</text>'
        )

    def legend(self, entries: list[tuple[str, str, bool]]) -> None:
        for i, (name, colour, dashed) in enumerate(entries):
            y = TOP + 10 + i * 18
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            self.parts.append(
                f'<line x1="{W - RIGHT + 12}" y1="{y}" x2="{W - RIGHT + 30}" y2="{y}" '
                f'stroke="{colour}" stroke-width="3"{dash}/>'
                f'<text x="{W - RIGHT + 36}" y="{y + 4}">{escape(name)}</text>'
            )

    def svg(self, title: str) -> str:
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" '
            f'height="{H}" font-family="sans-serif" font-size="11" role="img">'
            f"<title>{escape(title)}</title>{''.join(self.parts)}</svg>"
        )


def score_vs_cost(
    points: dict[str, tuple[float, dict]], scorer: str, cost_label: str = "wall s / session"
) -> str:
    """Each column at (its cost, its mean score), the interval as a bar."""
    shown = {n: (x, m) for n, (x, m) in points.items() if x is not None and m["mean"] is not None}
    if not shown:
        return ""
    ys = [v for _, m in shown.values() for v in (m["lo"], m["hi"], m["mean"])]
    axes = _Axes([x for x, _ in shown.values()] + [0.0], ys, cost_label, f"{scorer} (mean, 95% CI)")
    axes.frame()
    palette = colours(list(points))
    for name, (x, m) in shown.items():
        cx, c = axes.x(x), palette[name]
        axes.parts.append(
            f'<line x1="{cx:.1f}" y1="{axes.y(m["lo"]):.1f}" x2="{cx:.1f}" '
            f'y2="{axes.y(m["hi"]):.1f}" stroke="{c}" stroke-width="2"/>'
            f'<circle cx="{cx:.1f}" cy="{axes.y(m["mean"]):.1f}" r="5" fill="{c}"/>'
        )
    axes.legend([(n, palette[n], False) for n in shown])
    return axes.svg(f"{scorer} against cost")


def score_by_iteration(curves: dict[str, list[float | None]], scorer: str) -> str:
    """A line per column over iterations 1..k; a one-iteration column (the baseline) is a
    dashed level across."""
    shown = {n: c for n, c in curves.items() if any(v is not None for v in c)}
    if not shown:
        return ""
    width = max(len(c) for c in shown.values())
    ys = [v for c in shown.values() for v in c if v is not None]
    axes = _Axes([1.0, float(max(width, 2))], ys, "iterations", f"{scorer} of the image kept")
    axes.frame()
    palette = colours(list(curves))
    for name, curve in shown.items():
        c = palette[name]
        if len(curve) == 1:
            y = axes.y(curve[0])  # type: ignore[arg-type]
            axes.parts.append(
                f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" stroke="{c}" '
                f'stroke-width="2" stroke-dasharray="5 3"/>'
            )
            continue
        pts = [(axes.x(k + 1.0), axes.y(v)) for k, v in enumerate(curve) if v is not None]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        axes.parts.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        axes.parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
    axes.legend([(n, palette[n], len(c) == 1) for n, c in shown.items()])
    return axes.svg(f"{scorer} by iteration")
