"""The console's charts, drawn on the server as inline SVG from ``core.history``.

SVG rather than a charting library in the browser: nothing to vendor and keep patched, the strict
Content-Security-Policy stays as it is (no script builds the charts), a chart reads without JavaScript,
and the page's existing 3-second refresh of a fragment keeps it live. Colours come from console.css.
"""

from __future__ import annotations

import dataclasses

from markupsafe import Markup, escape

from ..core.history import History

WIDTH, HEIGHT, LEFT, TOP, BOTTOM = 600, 160, 60, 10, 26  # viewBox units: plot area is the rest
PLOT_W, PLOT_H = WIDTH - LEFT - 4, HEIGHT - TOP - BOTTOM
LEAST_SPAN = 600.0  # seconds: the shortest time a chart covers


@dataclasses.dataclass(frozen=True)
class Line:
    label: str
    metric: str
    scale: float = 1.0  # the metric is divided by this (bytes/s -> MB/s)


@dataclasses.dataclass(frozen=True)
class Spec:
    title: str
    unit: str
    lines: tuple[Line, ...]
    peak: bool = False  # a gauge: each bucket's maximum, not its mean
    drops: bool = False  # one line per drop reason seen (metrics "drops:<reason>")


HANDLER = (
    Spec("Messages/s", "msg/s", (Line("in", "msgs_in"), Line("out", "msgs_out"))),
    Spec("MB/s", "MB/s", (Line("in", "bytes_in", 1e6), Line("out", "bytes_out", 1e6))),
    Spec("Drops/s by reason", "msg/s", (), drops=True),
    Spec("Queued MB (peak)", "MB", (Line("queued", "queued_bytes", 1e6),), peak=True),
)
SUBRECEIVER = (
    Spec("Messages/s out", "msg/s", (Line("out", "msgs_out"),)),
    Spec("Drops/s by reason", "msg/s", (), drops=True),
    Spec("Queued MB (peak)", "MB", (Line("queued", "queued_bytes", 1e6),), peak=True),
)


def _number(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def _ceiling(v: float) -> float:
    """The axis top: 1, 2 or 5 times a power of ten at or above v."""
    step = 10 ** len(str(int(v))) / 10 if v >= 1 else 1.0
    return next(m * step for m in (1, 2, 5, 10) if m * step >= v) if v > 0 else 1.0


def _path(values: list[float | None], top: float) -> tuple[str, list[tuple[float, float]]]:
    """The SVG path of one line, broken where a bucket has no sample; and the points that stand alone
    (a bucket between two gaps), which a path alone would not show."""
    n = len(values)
    pts = [None if v is None else (LEFT + PLOT_W * i / max(n - 1, 1), TOP + PLOT_H * (1 - v / top))
           for i, v in enumerate(values)]
    parts, lone = [], []
    for i, p in enumerate(pts):
        if p is None:
            continue
        before = i > 0 and pts[i - 1] is not None
        after = i + 1 < n and pts[i + 1] is not None
        parts.append(f"{'L' if before else 'M'}{p[0]:.1f} {p[1]:.1f}")
        if not before and not after:
            lone.append(p)
    return " ".join(parts), lone


def render(history: History, key: str, spec: Spec, now: float, caption: str = "") -> Markup:
    """One chart of key's last hour: a figure with its title, the plot (with the subject's state as a band
    under it), and a legend saying each line's latest value. ``caption`` goes before the spec's title."""
    lines = tuple(Line(m.split(":", 1)[1], m) for m in history.metrics(key, "drops:")) if spec.drops else spec.lines
    chart = history.chart(key, now, [ln.metric for ln in lines], peak=spec.peak,
                          span=history.span(key, now, LEAST_SPAN))
    series = [[None if v is None else v / ln.scale for v in chart.lines.get(ln.metric, [])] for ln in lines]
    top = _ceiling(max((v for s in series for v in s if v is not None), default=0.0))
    title = f"{caption}: {spec.title}" if caption else spec.title
    out = [f'<figure class="chart"><figcaption>{escape(title)}</figcaption>',
           f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(_summary(spec, lines, series))}">',
           f'<line class="axis" x1="{LEFT}" y1="{TOP + PLOT_H}" x2="{LEFT + PLOT_W}" y2="{TOP + PLOT_H}"/>',
           f'<line class="grid" x1="{LEFT}" y1="{TOP}" x2="{LEFT + PLOT_W}" y2="{TOP}"/>',
           f'<text class="tick" x="{LEFT - 4}" y="{TOP + 12}" text-anchor="end">{_number(top)}</text>',
           f'<text class="tick" x="{LEFT - 4}" y="{TOP + PLOT_H}" text-anchor="end">0</text>']
    minutes = (chart.times[-1] - chart.times[0] + history.step) / 60
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        label = "now" if frac == 1.0 else f"-{minutes * (1 - frac):.0f} min"
        out.append(f'<text class="tick" x="{LEFT + PLOT_W * frac:.0f}" y="{HEIGHT - 4}" '
                   f'text-anchor="{anchor}">{label}</text>')
    for i, (ln, values) in enumerate(zip(lines, series)):
        d, lone = _path(values, top)
        count = sum(v is not None for v in values)
        out.append(f'<path class="line s{i % 6}" data-metric="{escape(ln.metric)}" data-points="{count}" d="{d}"/>')
        out.extend(f'<circle class="dot s{i % 6}" cx="{x:.1f}" cy="{y:.1f}" r="2"/>' for x, y in lone)
    width = PLOT_W / len(chart.states)
    for state, first, count in _runs(chart.states):  # the subject's state as a band under the plot
        out.append(f'<rect class="state st-{escape(state)}" x="{LEFT + width * first:.1f}" y="{TOP + PLOT_H + 1}" '
                   f'width="{width * count:.1f}" height="4"><title>{escape(state)}</title></rect>')
    out.append("</svg>")
    legend = "".join(f'<li><span class="key s{i % 6}"></span>{escape(ln.label)}: {_latest(values)} {spec.unit}</li>'
                     for i, (ln, values) in enumerate(zip(lines, series)))
    out.append(f'<ul class="legend">{legend or "<li>none</li>"}</ul></figure>')
    return Markup("".join(out))


def _runs(states: list[str | None]) -> list[tuple[str, int, int]]:
    """(state, first bucket, bucket count) of each run of one state; buckets without a sample left out."""
    runs: list[list] = []
    for i, state in enumerate(states):
        if runs and runs[-1][0] == state and runs[-1][1] + runs[-1][2] == i:
            runs[-1][2] += 1
        elif state is not None:
            runs.append([state, i, 1])
    return [tuple(r) for r in runs]


def _latest(values: list[float | None]) -> str:
    return next((_number(v) for v in reversed(values) if v is not None), "-")


def _summary(spec: Spec, lines: tuple[Line, ...], series: list[list[float | None]]) -> str:
    """The chart in words, for a screen reader."""
    parts = [f"{ln.label} now {_latest(values)}, highest "
             f"{_number(max((v for v in values if v is not None), default=0.0))}"
             for ln, values in zip(lines, series)]
    return f"{spec.title}: " + ("; ".join(parts) if parts else "none")


def charts(history: History, key: str, specs: tuple[Spec, ...], now: float) -> list[Markup]:
    return [render(history, key, s, now) for s in specs]
