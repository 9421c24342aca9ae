"""PNG figures drawn with matplotlib: spot maps, heatmaps, scatter plots, loss curves and the slide thumbnail.

matplotlib is imported inside each drawing function, so `import hinge_cli` stays
light. Figures are built on `matplotlib.figure.Figure` directly (the Agg canvas):
no pyplot state and no global backend switch in the caller's session.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hinge_cli.core.files import atomic_path

DPI = 110
FONT = 10  # points, at the saved size
NAN_COLOUR = "0.65"
PATCH_COLOUR = "#1f5eff"
OUTLINE_COLOUR = "#00b300"


@dataclass(frozen=True)
class MapPanel:
    """One panel of a spot map: values on their own colour scale, or on a diverging one centred at 0."""

    title: str
    values: np.ndarray
    unit: str
    diverging: bool = False


def _figure(width: float, height: float, constrained: bool = True) -> Any:
    """A figure on the Agg canvas. Constrained layout solves margins for us but costs seconds on figures with
    many artists; the map and heatmap grids place their axes themselves (`_grid`) instead."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)


def _grid(fig: Any, n: int, left: float, right: float, top: float, bottom: float, gap: float) -> list[Any]:
    """`n` axes side by side with margins and gaps in inches, for figures drawn without a layout engine."""
    width, height = fig.get_size_inches()
    panel = (width - left - right - gap * (n - 1)) / n
    return [fig.add_axes(((left + k * (panel + gap)) / width, bottom / height, panel / width,
                          (height - top - bottom) / height)) for k in range(n)]


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white", pil_kwargs={"compress_level": 3})  # zlib 3: much faster than 6, files a little larger
    return path


def _colour_scale(values: np.ndarray, diverging: bool) -> tuple[Any, Any]:
    """A colour map and norm: the 1st-99th percentile of the finite values, or ± their 99th |percentile|."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if diverging:
        bound = float(np.percentile(np.abs(finite), 99)) if len(finite) else 1.0
        bound = bound if bound > 0 else 1.0
        return colormaps["RdBu_r"].with_extremes(bad=NAN_COLOUR), Normalize(-bound, bound)
    lo, hi = np.percentile(finite, [1, 99]) if len(finite) else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return colormaps["viridis"].with_extremes(bad=NAN_COLOUR), Normalize(float(lo), float(hi))


def _spots(ax: Any, xy: np.ndarray, diameter: float, values: np.ndarray, cmap: Any, norm: Any) -> Any:
    """Discs of `diameter` data units (image pixels), so spots keep their true size at any zoom."""
    from matplotlib.collections import EllipseCollection

    discs = EllipseCollection(diameter, diameter, 0.0, units="xy", offsets=xy, offset_transform=ax.transData,
                              cmap=cmap, norm=norm, linewidths=0)
    discs.set_array(np.asarray(values, np.float64))
    ax.add_collection(discs)
    return discs


def _backdrop(ax: Any, image: np.ndarray, lo: np.ndarray, hi: np.ndarray, max_px: int, alpha: float) -> None:
    """The part of `image` the panel shows, downsampled to about the panel's own pixels (resampling a whole
    hires image per panel is what made maps slow), placed in the full image's pixel coordinates."""
    from PIL import Image

    height, width = image.shape[:2]
    x0, y0 = (int(max(np.floor(v), 0)) for v in lo)
    x1, y1 = int(min(np.ceil(hi[0]), width)), int(min(np.ceil(hi[1]), height))
    crop = np.ascontiguousarray(image[y0:y1, x0:x1, :3])
    if crop.size == 0:
        return
    scale = min(1.0, max_px / max(crop.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
        crop = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BOX))
    ax.imshow(crop, extent=(x0, x1, y1, y0), interpolation="antialiased", alpha=alpha)


def spot_maps(path: Path, xy: np.ndarray, diameter: float, panels: Sequence[MapPanel], title: str,
              image: np.ndarray | None = None, image_panel: bool = False) -> Path:
    """Panels side by side, each spot a disc coloured on the panel's own scale, with a labelled colour bar.

    `xy` and `diameter` are in `image` pixels (or any pixels without an image). With
    `image_panel`, the H&E comes first on its own and the other panels dim it so the
    colours stand out; otherwise each panel shows it at full strength.
    """
    xy = np.asarray(xy, np.float64)[:, :2]
    lo, hi = xy.min(0) - diameter, xy.max(0) + diameter
    span = np.maximum(hi - lo, 1.0)
    width = 4.2
    height = float(np.clip(width * span[1] / span[0], 2.5, 7.0))
    n = len(panels) + int(image_panel and image is not None)
    bar_room = 1.05  # inches right of each panel for its colour bar and label
    fig = _figure(n * (width + bar_room) + 0.2, height + 0.9, constrained=False)
    axes = _grid(fig, n, 0.1, bar_room, 0.75, 0.15, bar_room)
    fig.suptitle(title, fontsize=FONT + 2)
    panel_px = int(max(width, height) * DPI)  # the panel's own pixels: as sharp as it can show, and cheap to draw
    if image_panel and image is not None:
        _backdrop(axes[0], image, lo, hi, panel_px, 1.0)
        axes[0].set_title("H&E", fontsize=FONT + 1)
    for ax, panel in zip(axes[n - len(panels):], panels, strict=True):
        if image is not None:
            _backdrop(ax, image, lo, hi, panel_px, 0.45 if image_panel else 1.0)
        cmap, norm = _colour_scale(panel.values, panel.diverging)
        box = ax.get_position()
        bar_axes = fig.add_axes((box.x1 + 0.08 / fig.get_figwidth(), box.y0 + box.height * 0.1,
                                 0.16 / fig.get_figwidth(), box.height * 0.8))
        bar = fig.colorbar(_spots(ax, xy, diameter, panel.values, cmap, norm), cax=bar_axes)
        bar.set_label(panel.unit, fontsize=FONT)
        bar.ax.tick_params(labelsize=FONT - 1)
        ax.set_title(panel.title, fontsize=FONT + 1)
    for ax in axes:
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(hi[1], lo[1])  # image rows grow downwards
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def heatmaps(path: Path, matrices: Sequence[tuple[str, np.ndarray]], labels: Sequence[str], title: str,
             unit: str = "gene-gene Pearson r") -> Path:
    """Square matrices side by side on one diverging scale (-1..1), gene labels on both axes.

    Cells are at least 0.12 inch, so a 60-gene panel keeps ~7 pt labels; smaller panels get 9 pt.
    """
    n = max(len(labels), 1)
    cell = max(4.0 / n, 0.12)
    font = min(9.0, cell * 72 * 0.8)
    margin = 0.1 + max((len(str(g)) for g in labels), default=1) * font / 72 * 0.62
    side = n * cell
    fig = _figure(len(matrices) * (side + margin + 0.2) + 1.1, side + margin + 0.8, constrained=False)
    axes = _grid(fig, len(matrices), margin + 0.1, 1.1, 0.6, margin + 0.1, margin + 0.2)
    fig.suptitle(title, fontsize=FONT + 1)
    for k, (ax, (name, matrix)) in enumerate(zip(axes, matrices, strict=True)):
        shown = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(len(labels)), labels if k == 0 else [], fontsize=font)  # rows are the same genes in every panel
        ax.tick_params(length=2, pad=1)
        ax.set_title(name, fontsize=FONT + 1)
    box = axes[-1].get_position()
    bar_axes = fig.add_axes((box.x1 + 0.15 / fig.get_figwidth(), box.y0 + box.height * 0.15, 0.18 / fig.get_figwidth(),
                             box.height * 0.7))
    bar = fig.colorbar(shown, cax=bar_axes)
    bar.set_label(unit, fontsize=FONT)
    bar.ax.tick_params(labelsize=FONT - 1)
    return _save(fig, path)


def scatter(path: Path, series: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str) -> Path:
    """Points of each (x, y) series in its own colour, with a legend; non-finite points are left out."""
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        ok = np.isfinite(xs) & np.isfinite(ys)
        ax.scatter(xs[ok], ys[ok], s=20, alpha=0.75, label=f"{name} ({ok.sum()} genes)")
    ax.axhline(0, color="0.6", linewidth=0.8, zorder=0)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT - 1)
    ax.legend(fontsize=FONT - 1)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def histogram(path: Path, fractions: Sequence[float], title: str, xlabel: str, reference: float | None = None,
              note: str = "") -> Path:
    """Bars of `fractions` over equal bins of [0, 1], a dashed line at `reference` (e.g. the height of a flat histogram)
    and a `note` under the title."""
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    heights = np.asarray(fractions, np.float64)
    edges = np.linspace(0.0, 1.0, len(heights) + 1)
    ax.bar(edges[:-1], heights, width=np.diff(edges), align="edge", color=PATCH_COLOUR, alpha=0.8, edgecolor="white")
    if reference is not None:
        ax.axhline(reference, color="0.3", linestyle="--", linewidth=1.0, label=f"flat ({reference:.2g})")
        ax.legend(fontsize=FONT - 1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(float(heights.max(initial=0.0)), reference or 0.0) * 1.15 or 1.0)
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel("fraction", fontsize=FONT)
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT - 1)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _epoch_lines(ax: Any, series: Mapping[str, Sequence[float | None]], ylabel: str, title: str) -> None:
    """One line per series against epochs 1..n (integer ticks); series with no finite value are left out."""
    from matplotlib.ticker import MaxNLocator

    for name, values in series.items():
        ys = np.array([math.nan if v is None else v for v in values], np.float64)
        if np.isfinite(ys).any():
            ax.plot(np.arange(1, len(ys) + 1), ys, marker="o", markersize=3, linewidth=1.5, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1)
    ax.tick_params(labelsize=FONT - 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=FONT - 1)
    ax.grid(alpha=0.3)


def loss_curves(path: Path, series: Mapping[str, Sequence[float | None]], title: str, ylabel: str = "masked loss",
                second: tuple[str, Sequence[float | None]] | None = None) -> Path:
    """The loss curves; with `second` (label, values per epoch), a panel beside them for the selection figure."""
    fig = _figure(12.4 if second else 6.4, 4.0)
    axes = fig.subplots(1, 2 if second else 1, squeeze=False)[0]
    _epoch_lines(axes[0], series, ylabel, title)
    if second is not None:
        label, values = second
        _epoch_lines(axes[1], {label: values}, "depth-partial Pearson", "model selection (higher is better)")
    return _save(fig, path)


def _scale_bar_um(width_um: float) -> float:
    """A round length (1, 2 or 5 × 10^k µm) near a fifth of the image width."""
    target = max(width_um / 5, 1e-9)
    step = 10 ** math.floor(math.log10(target))
    return max(m * step for m in (1, 2, 5) if m * step <= target)


def slide_thumbnail(path: Path, image: np.ndarray, tissue: np.ndarray, tissue_scale: float, centres: np.ndarray,
                    radius: float, um_per_px: float) -> Path:
    """The slide with the tissue outline, the patch footprints, a legend and a scale bar.

    `centres` and `radius` are in thumbnail pixels; `tissue` is a boolean mask with
    `tissue_scale` thumbnail pixels per mask pixel; `um_per_px` is the thumbnail's resolution.
    """
    from matplotlib.collections import EllipseCollection
    from matplotlib.lines import Line2D
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    height, width = image.shape[:2]
    fig = _figure(8.0, float(np.clip(8.0 * height / width, 3.0, 10.0)) + 0.6)
    ax = fig.subplots()
    ax.imshow(image, interpolation="antialiased")
    handles = []
    if tissue.any() and not tissue.all():
        rows, cols = tissue.shape
        ax.contour((np.arange(cols) + 0.5) * tissue_scale, (np.arange(rows) + 0.5) * tissue_scale, tissue.astype(float),
                   levels=[0.5], colors=OUTLINE_COLOUR, linewidths=1.2)
        handles.append(Line2D([], [], color=OUTLINE_COLOUR, linewidth=1.5, label="tissue outline"))
    diameter = 2 * max(radius, 1.0)
    ax.add_collection(EllipseCollection(diameter, diameter, 0.0, units="xy", offsets=np.asarray(centres, np.float64),
                                        offset_transform=ax.transData, facecolors="none", edgecolors=PATCH_COLOUR,
                                        linewidths=0.8))
    handles.append(Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor=PATCH_COLOUR, linestyle="",
                          label=f"patches ({len(centres)})"))
    ax.legend(handles=handles, loc="upper right", fontsize=FONT - 1, framealpha=0.85)
    length_um = _scale_bar_um(width * um_per_px)
    label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
    ax.add_artist(AnchoredSizeBar(ax.transData, length_um / um_per_px, label, "lower right", pad=0.4, color="black",
                                  frameon=True, size_vertical=max(height / 200, 1.0), fontproperties={"size": FONT}))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{width} × {height} px thumbnail, {um_per_px:.3g} µm/px", fontsize=FONT)
    return _save(fig, path)
