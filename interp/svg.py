"""A small SVG chart library for our pages (the training report, the steer audit): line charts,
histograms and bar comparisons as inline SVG strings.

Images that any browser shows offline, kept inside the one HTML file, with no plotting
dependency. Pure string building: no torch, no NumPy. Every text drawn is HTML-escaped. The
classes they draw with are styled by ``CHART_CSS``, which a page puts in its stylesheet.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CHART_CSS", "svg_bar_chart", "svg_histogram", "svg_line_chart"]

CHART_CSS = """
.plots{display:flex;flex-wrap:wrap;gap:10px}svg.plot{background:#fff;border:1px solid #eef0f3}
svg text{font-size:11px;fill:#333}svg .title{font-size:12px;font-weight:600}svg .label{fill:#555}
svg .grid{stroke:#eceff3}svg .frame{fill:none;stroke:#9aa3ad}svg .series{fill:none;stroke:#2a6fdb;stroke-width:1.6}
svg .dot{fill:#2a6fdb}svg .bar{fill:#e07a2f}svg .marker{stroke:#8a1c1c;stroke-dasharray:4 3}
svg .reference{stroke:#5b6470;stroke-dasharray:5 4}svg .zero{stroke:#5b6470}svg .value{fill:#1d232b}svg .inside{fill:#fff}
"""
"""The charts' styles (a page puts them in its stylesheet; ``.plots`` lays charts side by side)."""

Axis = tuple[float, float, list[float]]
"""(lowest value, highest value, tick values) of one axis."""


def _nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))


def _axis(lo: float, hi: float, target: int = 5) -> Axis:
    """A padded range and round tick values covering [lo, hi]."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, target)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [lo + i * step for i in range(int(round((hi - lo) / step)) + 1)]
    return lo, hi, ticks


def _compact(value: float) -> str:
    if value == 0:
        return "0"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


@dataclass(frozen=True)
class _Frame:
    """A plot area inside an SVG of ``width`` x ``height`` pixels, data ranges mapped onto it."""

    width: int = 440
    height: int = 250
    left: int = 64
    right: int = 14
    top: int = 28
    bottom: int = 42

    def x(self, value: float, lo: float, hi: float) -> float:
        return self.left + (value - lo) / (hi - lo) * (self.width - self.left - self.right)

    def y(self, value: float, lo: float, hi: float) -> float:
        return self.height - self.bottom - (value - lo) / (hi - lo) * (self.height - self.top - self.bottom)


def _axes_svg(frame: _Frame, x_axis: Axis, y_axis: Axis, *, title: str, x_label: str, y_label: str,
              y_tick_text: Callable[[float], str] = _compact) -> list[str]:
    """The title, grid, ticks, frame and axis labels of a chart."""
    (x_lo, x_hi, x_ticks), (y_lo, y_hi, y_ticks) = x_axis, y_axis
    e, f = html.escape, frame
    parts = [f'<text class="title" x="{f.left}" y="16">{e(title)}</text>']
    for t in y_ticks:
        y = f.y(t, y_lo, y_hi)
        parts.append(f'<line class="grid" x1="{f.left}" x2="{f.width - f.right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick" x="{f.left - 6}" y="{y + 4:.1f}" text-anchor="end">{e(y_tick_text(t))}</text>')
    for t in x_ticks:
        x = f.x(t, x_lo, x_hi)
        parts.append(f'<text class="tick" x="{x:.1f}" y="{f.height - f.bottom + 16}" text-anchor="middle">{e(_compact(t))}</text>')
    parts.append(f'<rect class="frame" x="{f.left}" y="{f.top}" width="{f.width - f.left - f.right}" '
                 f'height="{f.height - f.top - f.bottom}"/>')
    parts.append(f'<text class="label" x="{(f.left + f.width - f.right) / 2:.1f}" y="{f.height - 6}" '
                 f'text-anchor="middle">{e(x_label)}</text>')
    if y_label:
        middle = (f.top + f.height - f.bottom) / 2
        parts.append(f'<text class="label" transform="translate(12 {middle:.1f}) rotate(-90)" '
                     f'text-anchor="middle">{e(y_label)}</text>')
    return parts


def _svg(frame: _Frame, parts: list[str], label: str) -> str:
    return (f'<svg class="plot" role="img" aria-label="{html.escape(label)}" width="{frame.width}" '
            f'height="{frame.height}" viewBox="0 0 {frame.width} {frame.height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>')


def svg_line_chart(points: list[tuple[float, float]], *, title: str, x_label: str, y_label: str, log_y: bool = False,
                   reference: tuple[float, str] | None = None, x_range: tuple[float, float] | None = None) -> str:
    """A line chart of (x, y) points as an inline SVG; ``log_y`` uses a log axis when every y is
    positive and they span at least a decade; ``reference`` (y, label) draws a dashed horizontal
    line at y (on a linear axis), the axis stretched to show it; the x axis covers ``x_range`` too
    (charts drawn side by side share their x axis)."""
    points = _thin([(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)], 2000)
    frame = _Frame()
    if not points:
        return _svg(frame, [f'<text class="title" x="{frame.left}" y="16">{html.escape(title)}: no finite values</text>'], title)
    if reference is not None and not math.isfinite(reference[0]):
        reference = None
    extra = () if reference is None or log_y else (reference[0],)
    ys, y_axis, tick_text = _y_axis([y for _, y in points], log_y, extra)
    xs = [x for x, _ in points] + list(x_range or ())
    x_axis = _axis(min(xs), max(xs))
    parts = _axes_svg(frame, x_axis, y_axis, title=title, x_label=x_label, y_label=y_label, y_tick_text=tick_text)
    if extra:
        y = frame.y(extra[0], *y_axis[:2])
        parts.append(f'<line class="reference" x1="{frame.left}" x2="{frame.width - frame.right}" y1="{y:.1f}" '
                     f'y2="{y:.1f}"><title>{html.escape(reference[1])}</title></line>')
        parts.append(f'<text class="tick" x="{frame.width - frame.right - 4}" y="{y - 4:.1f}" text-anchor="end">'
                     f"{html.escape(reference[1])}</text>")
    coords = [(frame.x(x, *x_axis[:2]), frame.y(y, *y_axis[:2])) for (x, _), y in zip(points, ys, strict=True)]
    parts.append(f'<polyline class="series" points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in coords)}">'
                 f'<title>{html.escape(title)}</title></polyline>')
    if len(coords) <= 40:  # a few points (or one) stay visible as dots
        parts += [f'<circle class="dot" cx="{a:.1f}" cy="{b:.1f}" r="2.5"/>' for a, b in coords]
    return _svg(frame, parts, title)


def _y_axis(ys: list[float], log_y: bool, extra: tuple[float, ...] = ()) -> tuple[list[float], Axis, Callable[[float], str]]:
    """(the values as plotted, their axis, the tick text): log10 of the values on an axis of whole
    decades when ``log_y`` and every value is positive and they span at least a decade; a linear
    axis covers the ``extra`` values too."""
    if log_y and min(ys) > 0 and max(ys) / min(ys) >= 10:
        logs = [math.log10(y) for y in ys]
        lo, hi = math.floor(min(logs)), math.ceil(max(logs))
        return logs, (lo, hi, [float(t) for t in range(lo, hi + 1)]), _power_of_ten
    return ys, _axis(min(*ys, *extra), max(*ys, *extra)), _compact


def _power_of_ten(exponent: float) -> str:
    return f"{10 ** exponent:g}"


def _thin(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def svg_histogram(edges: list[float], counts: list[float], *, title: str, x_label: str, y_label: str,
                  marker: tuple[float, str] | None = None) -> str:
    """Bars of ``counts`` between consecutive ``edges`` as an inline SVG, with an optional dashed
    vertical ``marker`` (x, label)."""
    frame = _Frame(width=640, height=260)
    x_axis = _axis(edges[0], edges[-1], target=10)
    y_axis = _axis(0.0, max(max(counts), 1.0))
    parts = _axes_svg(frame, x_axis, y_axis, title=title, x_label=x_label, y_label=y_label)
    base = frame.y(0.0, *y_axis[:2])
    for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True):
        if count <= 0:
            continue
        x0, x1 = frame.x(lo, *x_axis[:2]), frame.x(hi, *x_axis[:2])
        y = frame.y(count, *y_axis[:2])
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                     f'height="{base - y:.1f}"><title>[{lo:g}, {hi:g}): {count:,.0f}</title></rect>')
    if marker is not None and x_axis[0] <= marker[0] <= x_axis[1]:
        x = frame.x(marker[0], *x_axis[:2])
        parts.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{frame.top}" y2="{base:.1f}"/>')
        parts.append(f'<text class="tick" x="{x - 4:.1f}" y="{frame.top + 12}" text-anchor="end">'
                     f"{html.escape(marker[1])}</text>")
    return _svg(frame, parts, title)


def svg_bar_chart(bars: list[tuple[str, float]], *, title: str, x_label: str) -> str:
    """Horizontal bars, one per (label, value), from a zero line (a negative value extends left),
    each with its value written beside it: a few figures compared at a glance."""
    bars = [(label, value) for label, value in bars if math.isfinite(value)]
    row = 24
    left = 16 + round(6.2 * max((len(label) for label, _ in bars), default=0))  # room for the labels at 11px
    frame = _Frame(width=300 + left, height=28 + 12 + row * max(len(bars), 1) + 36, left=left, right=56, bottom=36)
    if not bars:
        return _svg(frame, [f'<text class="title" x="{frame.left}" y="16">{html.escape(title)}: no finite values</text>'], title)
    lo, hi, ticks = _axis(min(0.0, *(v for _, v in bars)), max(0.0, *(v for _, v in bars)), target=4)
    e, f = html.escape, frame
    parts = [f'<text class="title" x="8" y="16">{e(title)}</text>']
    for t in ticks:
        x = f.x(t, lo, hi)
        parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{f.top}" y2="{f.height - f.bottom}"/>')
        parts.append(f'<text class="tick" x="{x:.1f}" y="{f.height - f.bottom + 16}" text-anchor="middle">{e(_compact(t))}</text>')
    zero = f.x(0.0, lo, hi)
    for i, (label, value) in enumerate(bars):
        y = f.top + 6 + i * row
        x0, x1 = sorted((zero, f.x(value, lo, hi)))
        parts.append(f'<text class="label" x="{f.left - 8}" y="{y + 13}" text-anchor="end">{e(label)}</text>')
        parts.append(f'<rect class="bar" x="{x0:.2f}" y="{y}" width="{x1 - x0:.2f}" height="{row - 8}" '
                     f'data-value="{value!r}"><title>{e(label)}: {value:.4g}</title></rect>')
        # A negative value's figure goes left of its bar, or inside it where the labels leave no room.
        at, anchor, inside = ((x1 + 4, "start", False) if value >= 0 else (x0 - 4, "end", False) if x0 - 48 > f.left
                              else (x0 + 4, "start", True))
        parts.append(f'<text class="value{" inside" if inside else ""}" x="{at:.1f}" y="{y + 13}" '
                     f'text-anchor="{anchor}">{value:.4g}</text>')
    parts.append(f'<line class="zero" x1="{zero:.1f}" x2="{zero:.1f}" y1="{f.top}" y2="{f.height - f.bottom}"/>')
    parts.append(f'<text class="label" x="{(f.left + f.width - f.right) / 2:.1f}" y="{f.height - 6}" '
                 f'text-anchor="middle">{e(x_label)}</text>')
    return _svg(frame, parts, title)
