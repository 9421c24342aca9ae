"""Small PNG charts drawn with Pillow, so that no plotting library is a dependency."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from hinge_cli.files import atomic_path

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_chart(path: Path, series: Mapping[str, Sequence[float]], title: str, xlabel: str = "epoch",
               size: tuple[int, int] = (640, 400)) -> Path:
    """One line per series against 1..n, with axes, ticks and a legend."""
    width, height = size
    left, right, top, bottom = 70, 20, 35, 45
    values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad
    n = max((len(ys) for ys in series.values()), default=1)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)

    def x_of(i: float) -> float:
        return left + (i - 1) / max(n - 1, 1) * (width - left - right)

    def y_of(v: float) -> float:
        return top + (hi - v) / (hi - lo) * (height - top - bottom)

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for v in _ticks(lo, hi):
        y = y_of(v)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((5, y - 6), f"{v:.4g}", fill="black")
    for i in _ticks(1, n) if n > 1 else [1]:
        x = x_of(i)
        draw.line((x, height - bottom, x, height - bottom + 4), fill="black")
        draw.text((x - 8, height - bottom + 6), f"{i:g}", fill="black")
    draw.text((width / 2 - 20, height - 18), xlabel, fill="black")
    draw.text((left, 10), title, fill="black")
    for k, (name, ys) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [(x_of(i + 1), y_of(v)) for i, v in enumerate(ys) if v is not None and math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.line((width - right - 120, top + 12 + 16 * k, width - right - 100, top + 12 + 16 * k), fill=colour, width=2)
        draw.text((width - right - 95, top + 6 + 16 * k), name, fill="black")
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


# ----------------------------------------------------------------------------- expression maps (hinge eval)

CMAPS = {
    # anchor colours, evenly spaced from low to high, linearly interpolated
    "viridis": [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
    "diverging": [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)],
}
NAN_COLOUR = (160, 160, 160)


class MapPanel(NamedTuple):
    """One panel of a spot map: per-spot values drawn with `cmap` between lo and hi."""

    title: str
    values: np.ndarray
    lo: float
    hi: float
    cmap: str = "viridis"


def colourise(values: np.ndarray, lo: float, hi: float, cmap: str = "viridis") -> np.ndarray:
    """RGB uint8 colours for values (any shape) on [lo, hi]; non-finite values are grey."""
    anchors = np.asarray(CMAPS[cmap], dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    frac = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    frac = np.where(np.isfinite(frac), frac, 0.0)
    pos = frac * (len(anchors) - 1)
    i = np.minimum(pos.astype(int), len(anchors) - 2)
    w = (pos - i)[..., None]
    rgb = anchors[i] * (1 - w) + anchors[i + 1] * w
    rgb[~np.isfinite(v)] = NAN_COLOUR
    return np.round(rgb).astype(np.uint8)


def _colour_bar(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, lo: float, hi: float, cmap: str) -> None:
    ramp = colourise(np.linspace(lo, hi, width), lo, hi, cmap)
    for k, colour in enumerate(ramp):
        draw.line((x + k, y, x + k, y + 8), fill=tuple(int(c) for c in colour))
    draw.text((x, y + 10), f"{lo:.3g}", fill="black")
    draw.text((x + width - 6 * len(f"{hi:.3g}"), y + 10), f"{hi:.3g}", fill="black")


def _save(image: Image.Image, path: Path) -> Path:
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def spot_map(path: Path, coords: np.ndarray, panels: Sequence[MapPanel], spot_diameter: float, title: str = "",
             image: np.ndarray | None = None, scale: float = 1.0, panel_px: int = 320) -> Path:
    """Panels side by side, each spot a disc coloured by its value, on the H&E when `image` is given.

    `coords` are level-0 pixels (x, y); `scale` maps them onto `image` (e.g.
    tissue_hires_scalef). Without an image the spots are drawn on white.
    """
    xy = np.asarray(coords, dtype=np.float64)[:, :2] * scale
    radius = spot_diameter * scale / 2
    lo_xy, hi_xy = xy.min(0) - radius * 2, xy.max(0) + radius * 2
    if image is not None:
        h, w = image.shape[:2]
        lo_xy = np.maximum(np.floor(lo_xy), 0).astype(int)
        hi_xy = np.minimum(np.ceil(hi_xy), [w, h]).astype(int)
        background = Image.fromarray(np.ascontiguousarray(image[lo_xy[1]:hi_xy[1], lo_xy[0]:hi_xy[0], :3]).astype(np.uint8))
    span = np.maximum(hi_xy - lo_xy, 1.0)
    fit = panel_px / span.max()
    pw, ph = (int(round(s)) for s in np.maximum(span * fit, 1))
    if image is None:
        background = Image.new("RGB", (pw, ph), "white")
    background = background.convert("RGB").resize((pw, ph), Image.BILINEAR)
    top, gap, bottom = 34, 12, 34
    canvas = Image.new("RGB", (len(panels) * (pw + gap) + gap, ph + top + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black")
    r = max(radius * fit, 1.5)
    centres = (xy - lo_xy) * fit
    for n, panel in enumerate(panels):
        x0 = gap + n * (pw + gap)
        canvas.paste(background, (x0, top))
        colours = colourise(panel.values, panel.lo, panel.hi, panel.cmap)
        for (cx, cy), colour in zip(centres, colours):
            draw.ellipse((x0 + cx - r, top + cy - r, x0 + cx + r, top + cy + r), fill=tuple(int(c) for c in colour))
        draw.text((x0, top - 14), panel.title, fill="black")
        _colour_bar(draw, x0, top + ph + 6, min(pw, 160), panel.lo, panel.hi, panel.cmap)
    return _save(canvas, path)


def heatmaps(path: Path, matrices: Sequence[tuple[str, np.ndarray]], labels: Sequence[str] = (), title: str = "",
             lo: float = -1.0, hi: float = 1.0, panel_px: int = 320) -> Path:
    """Square matrices side by side on one diverging scale; row labels when cells are tall enough to read."""
    size = len(matrices[0][1])
    side = panel_px
    cell = side / max(size, 1)
    label_w = 60 if labels and cell >= 10 else 0
    top, gap, bottom = 34, 12, 34
    canvas = Image.new("RGB", (len(matrices) * (side + gap + label_w) + gap, side + top + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black")
    for n, (name, matrix) in enumerate(matrices):
        x0 = gap + label_w + n * (side + gap + label_w)
        tile = Image.fromarray(colourise(matrix, lo, hi, "diverging")).resize((side, side), Image.NEAREST)
        canvas.paste(tile, (x0, top))
        draw.text((x0, top - 14), name, fill="black")
        if label_w:
            for k, label in enumerate(labels):
                draw.text((x0 - label_w, top + k * cell + (cell - 10) / 2), str(label)[:9], fill="black")
    _colour_bar(draw, gap + label_w, top + side + 6, min(side, 160), lo, hi, "diverging")
    return _save(canvas, path)


def scatter(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
            ylabel: str, size: tuple[int, int] = (640, 420)) -> Path:
    """Points of each (x, y) series in its own colour, with axes, ticks and a legend; non-finite points are skipped."""
    width, height = size
    left, right, top, bottom = 70, 20, 35, 45
    pairs = {name: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
             for name, (xs, ys) in series.items()}
    everything = [p for pts in pairs.values() for p in pts] or [(0.0, 0.0)]

    def limits(values: list[float]) -> tuple[float, float]:
        lo, hi = min(values), max(values)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = (hi - lo) * 0.05
        return lo - pad, hi + pad

    (xlo, xhi), (ylo, yhi) = limits([p[0] for p in everything]), limits([p[1] for p in everything])

    def x_of(v: float) -> float:
        return left + (v - xlo) / (xhi - xlo) * (width - left - right)

    def y_of(v: float) -> float:
        return top + (yhi - v) / (yhi - ylo) * (height - top - bottom)

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for v in _ticks(ylo, yhi):
        draw.line((left - 4, y_of(v), left, y_of(v)), fill="black")
        draw.text((5, y_of(v) - 6), f"{v:.3g}", fill="black")
    for v in _ticks(xlo, xhi):
        draw.line((x_of(v), height - bottom, x_of(v), height - bottom + 4), fill="black")
        draw.text((x_of(v) - 8, height - bottom + 6), f"{v:.3g}", fill="black")
    draw.text((width / 2 - 3 * len(xlabel), height - 18), xlabel, fill="black")
    draw.text((left, 10), f"{title}   (y: {ylabel})", fill="black")
    for k, (name, points) in enumerate(pairs.items()):
        colour = COLOURS[k % len(COLOURS)]
        for x, y in points:
            draw.ellipse((x_of(x) - 3, y_of(y) - 3, x_of(x) + 3, y_of(y) + 3), outline=colour, fill=colour)
        draw.ellipse((width - right - 120, top + 8 + 16 * k, width - right - 112, top + 16 + 16 * k), fill=colour)
        draw.text((width - right - 105, top + 6 + 16 * k), name, fill="black")
    return _save(image, path)



def tissue_maps(path: Path, image: np.ndarray, xy: np.ndarray, spot_diameter: float, panels: Sequence[MapPanel],
                title: str = "", panel_px: int = 480) -> Path:
    """The whole tissue image, then one panel per map with the spots coloured over the faded image.

    `xy` and `spot_diameter` are in `image` pixels. Unlike `spot_map`, the H&E is shown on its own
    first, so the eye can compare morphology and prediction side by side.
    """
    base = Image.fromarray(np.ascontiguousarray(np.asarray(image)[..., :3], dtype=np.uint8))
    fit = min(1.0, panel_px / max(base.size))
    base = base.resize((max(1, round(base.width * fit)), max(1, round(base.height * fit))), Image.BOX)
    faded = Image.blend(base, Image.new("RGB", base.size, "white"), 0.6)
    centres, r = np.asarray(xy, np.float64)[:, :2] * fit, max(spot_diameter * fit / 2, 1.5)
    top, gap, bottom = 34, 12, 34
    canvas = Image.new("RGB", ((len(panels) + 1) * (base.width + gap) + gap, base.height + top + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black")
    canvas.paste(base, (gap, top))
    draw.text((gap, top - 14), "H&E", fill="black")
    for n, panel in enumerate(panels, start=1):
        x0 = gap + n * (base.width + gap)
        canvas.paste(faded, (x0, top))
        for (cx, cy), colour in zip(centres, colourise(panel.values, panel.lo, panel.hi, panel.cmap)):
            draw.ellipse((x0 + cx - r, top + cy - r, x0 + cx + r, top + cy + r), fill=tuple(int(c) for c in colour))
        draw.text((x0, top - 14), panel.title, fill="black")
        _colour_bar(draw, x0, top + base.height + 6, min(base.width, 160), panel.lo, panel.hi, panel.cmap)
    return _save(canvas, path)
