"""Small SVG charts drawn on the server: no script, no external file, every text escaped.

The markup uses classes (styled by static/style.css) and presentation attributes, never
`style=` attributes, which the Content-Security-Policy would block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 14, 20, 24
MAX_LABEL_CHARS = 24


def line_chart(points: Sequence[tuple[str, float | None]], width: int = 480, height: int = 160,
               y_label: str = "") -> str:
    """An SVG line chart of (label, value) points in order (None values are skipped), as escaped markup."""
    values = [(str(label), float(v)) for label, v in points
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{int(width)}" height="{int(height)}" '
            f'viewBox="0 0 {int(width)} {int(height)}" role="img" aria-label="{escape(y_label)}">'
            f"<title>{escape(y_label)}</title>")
    if not values:
        body = _text(width / 2, height / 2, "no data yet", "chart-empty", anchor="middle")
        return Markup(head + body + "</svg>")  # noqa: S704 - every piece escaped above
    parts = [head, _axes(width, height), _y_ticks(values, height), _x_ticks(values, width, height),
             _text(MARGIN_LEFT, MARGIN_TOP - 6, y_label, "chart-label")]
    coords = _coords(values, width, height)
    parts.append(f'<polyline class="chart-line" fill="none" stroke="currentColor" points="'
                 f'{" ".join(f"{x:.1f},{y:.1f}" for x, y in coords)}"/>')
    for (label, value), (x, y) in zip(values, coords, strict=True):
        parts.append(f'<circle class="chart-point" cx="{x:.1f}" cy="{y:.1f}" r="3">'
                     f"<title>{escape(label)}: {_fmt(value)}</title></circle>")
    return Markup("".join(parts) + "</svg>")  # noqa: S704 - every piece escaped above


def _bounds(values: list[tuple[str, float]]) -> tuple[float, float]:
    """The y range drawn: the values' range, widened when they are all equal."""
    lo, hi = min(v for _, v in values), max(v for _, v in values)
    if hi == lo:
        pad = abs(hi) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _coords(values: list[tuple[str, float]], width: int, height: int) -> list[tuple[float, float]]:
    lo, hi = _bounds(values)
    plot_w, plot_h = width - MARGIN_LEFT - MARGIN_RIGHT, height - MARGIN_TOP - MARGIN_BOTTOM
    n = len(values)
    xs = [MARGIN_LEFT + (plot_w * i / (n - 1) if n > 1 else plot_w / 2) for i in range(n)]
    return [(x, MARGIN_TOP + plot_h * (1 - (v - lo) / (hi - lo))) for x, (_, v) in zip(xs, values, strict=True)]


def _axes(width: int, height: int) -> str:
    bottom = height - MARGIN_BOTTOM
    return (f'<line class="chart-axis" stroke="currentColor" x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" '
            f'x2="{MARGIN_LEFT}" y2="{bottom}"/>'
            f'<line class="chart-axis" stroke="currentColor" x1="{MARGIN_LEFT}" y1="{bottom}" '
            f'x2="{width - MARGIN_RIGHT}" y2="{bottom}"/>')


def _y_ticks(values: list[tuple[str, float]], height: int) -> str:
    lo, hi = _bounds(values)
    return (_text(MARGIN_LEFT - 4, MARGIN_TOP + 4, _fmt(hi), "chart-tick", anchor="end")
            + _text(MARGIN_LEFT - 4, height - MARGIN_BOTTOM, _fmt(lo), "chart-tick", anchor="end"))


def _x_ticks(values: list[tuple[str, float]], width: int, height: int) -> str:
    y = height - MARGIN_BOTTOM + 16
    first = _text(MARGIN_LEFT, y, values[0][0], "chart-tick", anchor="start")
    if len(values) == 1:
        return first
    return first + _text(width - MARGIN_RIGHT, y, values[-1][0], "chart-tick", anchor="end")


def _text(x: float, y: float, text: str, css: str, anchor: str = "start") -> str:
    shown = text if len(text) <= MAX_LABEL_CHARS else text[:MAX_LABEL_CHARS - 1] + "…"
    return (f'<text class="{escape(css)}" x="{x:.1f}" y="{y:.1f}" text-anchor="{escape(anchor)}">'
            f"{escape(shown)}</text>")


def _fmt(value: float) -> str:
    return f"{value:.4g}"
