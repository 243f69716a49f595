"""Server-side SVG plots. Only numbers are interpolated (no text from a model or a user; the
score strip's links are URLs built by app.urls, escaped too), and the result is marked safe
for the templates.

Each plot is an accessible image: <svg role="img" aria-labelledby=...> names its own <title>
and <desc> (ids from the `ident` argument, unique on a page), and every bar or point carries
a <title> with its values, which browsers show on hover without any script.

Each plot is drawn twice (wide_and_narrow): wide, and narrow (class "narrow", ids ending in
"-narrow") for phones, where the stylesheet shows it instead. Shrunk to a 390 px phone, a wide
plot's 11 px text was under 7 px; the narrow drawing, about the screen's width, keeps it near 11 px."""

from __future__ import annotations

import math
from functools import lru_cache

from markupsafe import Markup, escape

WIDTH, HEIGHT = 560, 170
NARROW_W = 340  # the phone's drawing of the histogram, the clamp curve and the score strip
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 10, 34


def wide_and_narrow(draw):
    """draw(...) + draw(..., narrow=True): both drawings of a plot, for the templates."""
    def both(*args, **kwargs) -> Markup:
        return draw(*args, **kwargs) + draw(*args, narrow=True, **kwargs)
    both.__name__ = draw.__name__
    return both


def _variant(cls: str, ident: str, narrow: bool) -> tuple[str, str]:
    """A drawing's class and its ids' stem: "narrow" ones end in "-narrow" (both are on a page)."""
    return (f"{cls} narrow", f"{ident}-narrow") if narrow else (f"{cls} wide", ident)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _count(n: int) -> str:
    """A count short enough for the histogram's left margin (at most 5 characters: 163,604 ran
    past the plot's edge): 9,999, then 164k, 1.2M, 35M, 1.2G. Its tooltips keep the exact count."""
    if n < 10_000:
        return f"{n:,}"
    # the largest unit it reaches once rounded (999,500 is 1.0M, not 1000k)
    size, unit = (1e9, "G") if n >= 999_500_000 else (1e6, "M") if n >= 999_500 else (1e3, "k")
    value = n / size
    return (f"{value:.1f}" if value < 9.95 else f"{value:.0f}") + unit


def _open(cls: str, ident: str, title: str, desc: str, width: int, height: int) -> str:
    """The opening <svg> of an accessible plot, with its <title> and <desc>."""
    ident = escape(ident)
    return (
        f'<svg class="plot {cls}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-labelledby="{ident}-title {ident}-desc"><title id="{ident}-title">{escape(title)}</title>'
        f'<desc id="{ident}-desc">{escape(desc)}</desc>'
    )


@lru_cache(maxsize=16)
def _histogram_bars(edges: tuple, counts: tuple) -> list[tuple[float, float, str, str]]:
    """(left edge, right edge, class, the rest of its <rect>: height and tooltip) of each non-empty
    bin: the same in the wide and the narrow drawing (only x and width differ), so made once."""
    top = math.log10(1 + max(counts, default=0)) or 1.0
    plot_h = HEIGHT - TOP - BOTTOM
    bars = []
    for a, b, c in zip(edges, edges[1:], counts):
        if c <= 0:
            continue
        y = TOP + plot_h * (1 - math.log10(1 + c) / top)
        bars.append((a, b, "hbar neg" if b <= 0 else "hbar",
                     f' y="{y:.1f}" height="{TOP + plot_h - y:.1f}"><title>[{_fmt(a)}, {_fmt(b)}): {c:,} tokens</title></rect>'))
    return bars


def histogram_svg(stats: dict, ident: str = "histogram", narrow: bool = False) -> Markup:
    """The activation histogram of a neuron: bars on a log count axis, with 0, the threshold
    and the mean marked. Each bar's tooltip gives its range and count."""
    edges = stats["histogram"]["edges"]
    counts = stats["histogram"]["counts"]
    if not counts:
        return Markup("")
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    width = NARROW_W if narrow else WIDTH
    plot_w, plot_h = width - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + plot_w * (v - lo) / span

    desc = (
        f"{sum(counts):,} tokens in {len(counts)} bins of activation from {_fmt(lo)} to {_fmt(hi)}; "
        f"the fullest bin holds {max(counts):,}."
    )
    if stats.get("mean") is not None:
        desc += f" Mean {_fmt(stats['mean'])}."
    if stats.get("threshold") is not None:
        desc += f" Threshold {_fmt(stats['threshold'])}."
    parts = [
        _open(*_variant("histogram", ident, narrow), "Histogram of this neuron's activations (log count)", desc,
              width, HEIGHT),
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
    ]
    for a, b, cls, tail in _histogram_bars(tuple(edges), tuple(counts)):
        x0, x1 = x(a), x(b)
        parts.append(f'<rect class="{cls}" x="{x0:.1f}" width="{max(x1 - x0 - 0.5, 0.8):.1f}"{tail}')

    def marker(value: float | None, cls: str, label: str) -> None:
        if value is None or not (lo <= value <= hi):
            return
        parts.append(
            f'<line class="marker {cls}" x1="{x(value):.1f}" y1="{TOP}" x2="{x(value):.1f}" y2="{TOP + plot_h}">'
            f"<title>{label} {_fmt(value)}</title></line>"
        )

    marker(0.0, "zero", "zero:")
    marker(stats.get("threshold"), "threshold", "threshold:")
    marker(stats.get("mean"), "mean", "mean:")
    base = TOP + plot_h + 14
    parts.append(f'<text x="{LEFT}" y="{base}" text-anchor="start">{_fmt(lo)}</text>')
    parts.append(f'<text x="{LEFT + plot_w}" y="{base}" text-anchor="end">{_fmt(hi)}</text>')
    if lo < 0 < hi:
        parts.append(f'<text x="{x(0.0):.1f}" y="{base}" text-anchor="middle">0</text>')
    parts.append(
        f'<text x="{LEFT + plot_w / 2:.1f}" y="{base + 16}" text-anchor="middle" class="label">activation</text>'
    )
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + 8}" text-anchor="end">{_count(max(counts, default=0))}</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">0</text>')
    parts.append(
        f'<text x="12" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" class="label" '
        f'transform="rotate(-90 12 {TOP + plot_h / 2:.1f})">tokens (log)</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


# The F1 plots (feature pages) draw a line per layer, up to dozens of them: a plot area wider and
# taller than the one-series plots', text a size larger (13px, set on the plot's text, as the
# stylesheet's 11px is for the others), and a legend of every layer, in as many columns as it takes.
# Each is drawn twice: wide, its legend in columns at the right, and narrow (F1_NARROW_W), its
# legend in rows below, for phones (the stylesheet shows one by the screen's width). Shrunk to a
# 390 px phone, the wide one's text was about 6.5 px; the narrow one's stays about 12 px.
F1_PLOT_W, F1_PLOT_H = 560, 260
F1_NARROW_W = 296
F1_LEFT, F1_TOP, F1_BOTTOM = 52, 14, 46
F1_FONT = 13
F1_LEGEND_ROW, F1_LEGEND_COL = 18, 80
# Layers are coloured by depth along this ramp (first layer blue, last red): neighbouring layers
# look alike and a layer's colour says where in the model it is, however many layers there are.
DEPTH_RAMP = ((0x24, 0x57, 0xc5), (0x1c, 0x9a, 0xa8), (0x3f, 0x9b, 0x63), (0xb8, 0xa3, 0x26), (0xe8, 0x91, 0x3a),
              (0xc8, 0x57, 0x4b))


def depth_colour(i: int, n: int) -> str:
    """The colour of the i-th of n layers on DEPTH_RAMP."""
    t = i / (n - 1) if n > 1 else 0.0
    j = min(int(t * (len(DEPTH_RAMP) - 1)), len(DEPTH_RAMP) - 2)
    f = t * (len(DEPTH_RAMP) - 1) - j
    a, b = DEPTH_RAMP[j], DEPTH_RAMP[j + 1]
    return "#" + "".join(f"{round(u + (v - u) * f):02x}" for u, v in zip(a, b))


def f1_curve_svg(layers: list[dict], key: str = "curve", ident: str | None = None, narrow: bool = False) -> Markup:
    """F1 against k (log axis), one line per layer, from each layer's `key` list ("curve": the
    fast sweep, "pruned_curve": the pruning sweep). narrow: the phone's drawing (class "narrow",
    legend below the plot); else class "wide"."""
    ks = sorted({p["k"] for layer in layers for p in layer[key]})
    if not ks:
        return Markup("")
    # (colour by depth, layer, its points with an F1), for the layers with any
    lines = [(depth_colour(i, len(layers)), int(layer["layer"]), [p for p in layer[key] if p.get("f1") is not None])
             for i, layer in enumerate(layers)]
    lines = [line for line in lines if line[2]]
    left, top, plot_h = F1_LEFT, F1_TOP, F1_PLOT_H
    plot_w = F1_NARROW_W if narrow else F1_PLOT_W
    if narrow:  # the legend in rows under the axis label, as many entries a row as fit the plot's width
        columns = max(1, (left + plot_w) // F1_LEGEND_COL)
        rows = max(1, math.ceil(len(lines) / columns))
        width, height = left + plot_w + 16, top + plot_h + F1_BOTTOM + 8 + rows * F1_LEGEND_ROW
    else:
        rows = plot_h // F1_LEGEND_ROW
        columns = max(1, math.ceil(len(lines) / rows))
        width, height = left + plot_w + 16 + columns * F1_LEGEND_COL, top + plot_h + F1_BOTTOM
    axis_label_y = top + plot_h + F1_BOTTOM - 6
    lo, hi = math.log2(ks[0]), math.log2(ks[-1]) or 1.0

    def x(k: int) -> float:
        return left + plot_w * ((math.log2(k) - lo) / ((hi - lo) or 1.0))

    def y(f1: float) -> float:
        return top + plot_h * (1 - f1)

    best = max((p["f1"] for layer in layers for p in layer[key] if p.get("f1") is not None), default=None)
    desc = f"{len(layers)} layers, k from {ks[0]} to {ks[-1]}" + (f"; best F1 {best:.3f}." if best is not None else ".")
    parts = [
        _open(*_variant("curve", ident or f"f1-{key}", narrow), "Test F1 against the number of neurons k, per layer",
              desc, width, height),
        f'<g font-size="{F1_FONT}">',
    ]
    for tick in (0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line class="grid" x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}"/>')
    parts += [
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for k in ks:
        if k in (1, 2, 4, 8, 16, 32, 64, 128, 256) or k == ks[-1]:
            parts.append(f'<line class="tick" x1="{x(k):.1f}" y1="{top + plot_h}" x2="{x(k):.1f}" y2="{top + plot_h + 4}"/>')
            parts.append(f'<text x="{x(k):.1f}" y="{top + plot_h + 18}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_label_y}" text-anchor="middle" class="label">'
                 "k (neurons)</text>")
    parts.append(f'<text x="14" y="{top + plot_h / 2:.1f}" text-anchor="middle" class="label" '
                 f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">test F1</text>')
    for i, (colour, number, points) in enumerate(lines):
        pts = [(x(p["k"]), y(p["f1"])) for p in points]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        parts.append(f'<polyline class="line" fill="none" stroke="{colour}" stroke-width="2" points="{path}">'
                     f'<title>layer {number}</title></polyline>')
        for p, (px, py) in zip(points, pts):
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}">'
                         f'<title>layer {number}, k={int(p["k"])}: F1 {float(p["f1"]):.3f}</title></circle>')
        if narrow:
            lx = 8 + (i % columns) * F1_LEGEND_COL
            ly = top + plot_h + F1_BOTTOM + 8 + F1_LEGEND_ROW * (i // columns) + 12
        else:
            lx = left + plot_w + 16 + (i // rows) * F1_LEGEND_COL
            ly = top + F1_LEGEND_ROW * (i % rows) + 12
        parts.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 16}" y2="{ly - 4}" stroke="{colour}" stroke-width="3"/>')
        parts.append(f'<text x="{lx + 21}" y="{ly}">layer {number}</text>')
    parts.append("</g></svg>")
    return Markup("".join(parts))


def _nice_top(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k at or above value (value > 0)."""
    k = math.floor(math.log10(value))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**k >= value * (1 - 1e-9):
            return m * 10**k
    return 10 ** (k + 1)


def clamp_curve_svg(curve: dict, ident: str | None = None, narrow: bool = False) -> Markup:
    """p(target) against the clamp value: a line with a point per value (its tooltip gives both
    numbers) and the unclamped model marked (a dashed line at its activation, a ring at its
    probability); with curve["observed_range"], a band over the activations the unit takes on the
    examples corpus. The y axis runs from 0 to a round number above the largest probability, which
    is written on it, so small probabilities stay readable."""
    xs, ys = curve["values"], curve["probs"]
    if not xs or not ys:
        return Markup("")
    base = curve.get("baseline") or {}
    lo, hi = min(xs), max(xs)
    span = (hi - lo) or 1.0
    y_top = _nice_top(max(max(ys), base.get("prob") or 0.0, 1e-12))
    width = NARROW_W if narrow else WIDTH
    plot_w, plot_h = width - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(v: float) -> float:
        return LEFT + plot_w * (v - lo) / span

    def y(p: float) -> float:
        return TOP + plot_h * (1 - p / y_top)

    top = max(range(len(ys)), key=lambda i: ys[i])
    desc = (
        f"{len(xs)} clamp values from {_fmt(lo)} to {_fmt(hi)}; p(target) goes from {ys[0]:.4g} to {ys[-1]:.4g}, "
        f"highest {ys[top]:.4g} at {_fmt(xs[top])}."
    )
    if base.get("activation") is not None and base.get("prob") is not None:
        desc += f" Unclamped: activation {_fmt(base['activation'])}, p = {base['prob']:.4g}."
    if ident is None:
        ident = f"clamp-{int(curve['id'])}" if isinstance(curve.get("id"), int) else f"clamp-{abs(hash(tuple(xs))):x}"
    parts = [
        _open(*_variant("clamp-curve", ident, narrow), "p(target) against the clamp value", desc, width, HEIGHT),
        f'<line class="axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{TOP + plot_h}"/>',
        f'<line class="grid" x1="{LEFT}" y1="{y(y_top / 2):.1f}" x2="{LEFT + plot_w}" y2="{y(y_top / 2):.1f}"/>',
    ]
    seen = curve.get("observed_range")
    if seen and seen[0] is not None and seen[1] is not None and seen[0] <= hi and seen[1] >= lo:
        a, b = x(max(seen[0], lo)), x(min(seen[1], hi))
        parts.append(f'<rect class="observed" x="{a:.1f}" y="{TOP}" width="{max(b - a, 1.0):.1f}" height="{plot_h}">'
                     f"<title>the activations it takes on the examples corpus: {_fmt(seen[0])} to {_fmt(seen[1])}</title></rect>")
    if lo < 0 < hi:
        parts.append(f'<line class="marker zero" x1="{x(0):.1f}" y1="{TOP}" x2="{x(0):.1f}" y2="{TOP + plot_h}"/>')
    points = " ".join(f"{x(v):.1f},{y(p):.1f}" for v, p in zip(xs, ys))
    parts.append(f'<polyline class="curve" points="{points}"/>')
    for v, p in zip(xs, ys):
        parts.append(f'<circle class="point" cx="{x(v):.1f}" cy="{y(p):.1f}" r="2.5">'
                     f"<title>clamped at {_fmt(v)}: p = {p:.4g}</title></circle>")
    act, prob = base.get("activation"), base.get("prob")
    if act is not None and prob is not None and lo <= act <= hi:
        parts.append(f'<line class="marker baseline" x1="{x(act):.1f}" y1="{TOP}" x2="{x(act):.1f}" y2="{TOP + plot_h}"/>')
        parts.append(f'<circle class="baseline-point" cx="{x(act):.1f}" cy="{y(prob):.1f}" r="5">'
                     f"<title>unclamped: activation {_fmt(act)}, p = {prob:.4g}</title></circle>")
    axis = TOP + plot_h + 14
    parts.append(f'<text x="{LEFT}" y="{axis}" text-anchor="start">{_fmt(lo)}</text>')
    parts.append(f'<text x="{LEFT + plot_w}" y="{axis}" text-anchor="end">{_fmt(hi)}</text>')
    if lo < 0 < hi:
        parts.append(f'<text x="{x(0):.1f}" y="{axis}" text-anchor="middle">0</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2:.1f}" y="{axis + 16}" text-anchor="middle" class="label">clamp value</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + 8}" text-anchor="end">{y_top:.3g}</text>')
    parts.append(f'<text x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">0</text>')
    parts.append(
        f'<text x="12" y="{TOP + plot_h / 2:.1f}" text-anchor="middle" class="label" '
        f'transform="rotate(-90 12 {TOP + plot_h / 2:.1f})">p(target)</text>'
    )
    parts.append("</svg>")
    return Markup("".join(parts))


STRIP_W, STRIP_H = 560, 210
STRIP_POINTS = 50


def score_strip_svg(strip: dict, ident: str = "score-strip", narrow: bool = False) -> Markup:
    """Where the top neurons for a token sit in the model (Davies 2025, Figure 2): one dot per
    neuron, x its layer, y its normalised score, each dot a link to the neuron's page with
    its numbers in a tooltip. `strip` is the search page's {"n_layers", "points": [{"layer",
    "neuron", "score", "url"}, ...]}, best first; at most STRIP_POINTS are drawn. Dots of one
    layer are spread a little sideways (by rank) so that close scores stay visible, never
    beyond their layer's band, so x stays ordered by layer."""
    n_layers = max(int(strip["n_layers"]), 1)
    points = [p for p in strip["points"][:STRIP_POINTS] if p.get("score") is not None]
    if not points:
        return Markup("")
    left, right, top, bottom = 52, 12, 12, 40
    width = NARROW_W if narrow else STRIP_W
    cls, ident = _variant("score-strip", ident, narrow)
    plot_w, plot_h = width - left - right, STRIP_H - top - bottom
    band = plot_w / n_layers
    hi, lo = max(p["score"] for p in points), min(p["score"] for p in points)
    y_top = _nice_top(max(hi, 1e-12))
    # From 0, unless all the scores sit in the upper part: then from a round number below the
    # lowest, so that close scores do not pile up (the axis's lowest label says where it starts).
    y_low = 0.0
    if lo > 0.5 * hi:
        unit = _nice_top(max(hi - lo, hi * 0.1)) / 5
        y_low = max(0.0, math.floor((lo - unit / 2) / unit) * unit)
        y_top = math.ceil((hi + unit / 2) / unit) * unit
    spread = min(band * 0.11, 10.0)  # |offset| <= 3 * spread < band / 2

    def x(layer: int) -> float:
        return left + band * (layer + 0.5)

    def y(score: float) -> float:
        return top + plot_h * (1 - (max(score, y_low) - y_low) / (y_top - y_low))

    best = points[0]
    layers = sorted({int(p["layer"]) for p in points})
    desc = (
        f"{len(points)} neurons in {len(layers)} of {n_layers} layers (layers {layers[0]} to {layers[-1]}); "
        f"the best, layer {int(best['layer'])} neuron {int(best['neuron'])}, scores {best['score']:.4g}."
    )
    parts = [
        _open(cls, ident, f"Normalised score of the top {len(points)} neurons, by layer", desc, width, STRIP_H),
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}"/>',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}"/>',
    ]
    ticks = [y_low + (y_top - y_low) * f for f in (0.0, 0.5, 1.0)]
    for tick in ticks[1:]:
        parts.append(f'<line class="grid" x1="{left}" y1="{y(tick):.1f}" x2="{left + plot_w}" y2="{y(tick):.1f}"/>')
    for tick in ticks:
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
    step = max(1, math.ceil(n_layers / (10 if narrow else 16)))  # layer labels at least about 28 units apart
    for layer in range(n_layers):
        if layer % step == 0 or layer == n_layers - 1:
            parts.append(f'<line class="tick" x1="{x(layer):.1f}" y1="{top + plot_h}" x2="{x(layer):.1f}" '
                         f'y2="{top + plot_h + 4}"/>')
            parts.append(f'<text x="{x(layer):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{layer}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{STRIP_H - 4}" text-anchor="middle" class="label">layer</text>')
    parts.append(
        f'<text x="12" y="{top + plot_h / 2:.1f}" text-anchor="middle" class="label" '
        f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">normalised score</text>'
    )
    seen: dict[int, int] = {}
    dots = []
    for rank, p in enumerate(points, start=1):
        layer, neuron, score = int(p["layer"]), int(p["neuron"]), float(p["score"])
        k = seen.get(layer, 0)
        seen[layer] = k + 1
        cx = x(layer) + ((k % 7) - 3) * spread if k else x(layer)
        best_attrs = f' class="dot best" id="{escape(ident)}-best"' if rank == 1 else ' class="dot"'
        dots.append(
            f'<a href="{escape(p["url"])}"><circle{best_attrs} cx="{cx:.1f}" cy="{y(score):.1f}" '
            f'r="{5 if rank == 1 else 4}"><title>#{rank}: layer {layer}, neuron {neuron}, '
            f"score {score:.4g}</title></circle></a>"
        )
    # The links in rank order, so that Tab goes from #1 down; the best is then drawn again last, on top
    # of any dot it overlaps, as a picture only (no link, no pointer events, hidden from screen readers).
    parts.extend(dots)
    parts.append(f'<use href="#{escape(ident)}-best" class="on-top" aria-hidden="true" pointer-events="none"/>')
    parts.append("</svg>")
    return Markup("".join(parts))
