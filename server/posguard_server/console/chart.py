"""The customer page's chart: amounts and risk scores over time, as inline SVG drawn on the server.

No script and no chart library: the page shows the chart with JavaScript off, and the figure holds only
numbers and the labels made here (escaped all the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 64, 48, 16, 32


@dataclass(frozen=True, slots=True)
class Point:
    at: datetime
    amount: float  # in the currency's major unit
    score: float  # risk score in [0, 1]
    flagged: bool  # decided REVIEW or DECLINE


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def amounts_and_scores(points: Sequence[Point], currency: str) -> Markup:
    """An SVG figure: amounts as bars (left axis), scores as a line (right axis, 0 to 1)."""
    if not points:
        return Markup('<p class="muted">No transactions to chart yet.</p>')
    ordered = sorted(points, key=lambda p: p.at)
    start, end = ordered[0].at.timestamp(), ordered[-1].at.timestamp()
    span = max(end - start, 1.0)
    top_amount = max(max(p.amount for p in ordered), 1e-9)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    bar_w = max(2.0, min(16.0, plot_w / (len(ordered) * 1.5)))

    def x(point: Point) -> float:
        if len(ordered) == 1:
            return LEFT + plot_w / 2
        return LEFT + (point.at.timestamp() - start) / span * plot_w

    def y_amount(value: float) -> float:
        return TOP + plot_h - value / top_amount * plot_h

    def y_score(value: float) -> float:
        return TOP + plot_h - min(max(value, 0.0), 1.0) * plot_h

    parts = [
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(f'Amounts ({currency}) and risk scores of the last {len(ordered)} transactions')}"
        "</title>",
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#888"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}" stroke="#888"/>',
        f'<line x1="{LEFT + plot_w}" y1="{TOP}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#888"/>',
        f'<text x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end" font-size="11">{escape(f"{top_amount:,.2f}")}'
        "</text>",
        f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{LEFT + plot_w + 6}" y="{TOP + 4}" font-size="11">1.0</text>',
        f'<text x="{LEFT + plot_w + 6}" y="{TOP + plot_h}" font-size="11">0</text>',
        f'<text x="{LEFT}" y="{HEIGHT - 8}" font-size="11">{escape(ordered[0].at.strftime("%Y-%m-%d %H:%M"))}'
        "</text>",
        f'<text x="{LEFT + plot_w}" y="{HEIGHT - 8}" text-anchor="end" font-size="11">'
        f"{escape(ordered[-1].at.strftime('%Y-%m-%d %H:%M'))}</text>",
        f'<text x="{LEFT - 56}" y="{TOP + plot_h / 2}" font-size="11">{escape(currency)}</text>',
        f'<text x="{WIDTH - 30}" y="{TOP + plot_h / 2}" font-size="11">score</text>',
    ]
    for point in ordered:
        top = y_amount(point.amount)
        fill = "#c0392b" if point.flagged else "#7f8fa6"
        parts.append(
            f'<rect x="{_fmt(x(point) - bar_w / 2)}" y="{_fmt(top)}" width="{_fmt(bar_w)}" '
            f'height="{_fmt(TOP + plot_h - top)}" fill="{fill}" opacity="0.7"/>'
        )
    line = " ".join(f"{_fmt(x(p))},{_fmt(y_score(p.score))}" for p in ordered)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#1f6feb" stroke-width="2"/>')
    for point in ordered:
        parts.append(
            f'<circle cx="{_fmt(x(point))}" cy="{_fmt(y_score(point.score))}" r="3" fill="#1f6feb"/>'
        )
    parts.append("</svg>")
    # Every part is markup made here from numbers, or text passed through escape() above.
    return Markup("".join(parts))  # noqa: S704
