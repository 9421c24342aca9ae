"""A tiled and embedded slide's statistics for the shift report (`hinge_cli.data.shift`): read once per slide."""

from __future__ import annotations

import numpy as np

from hinge_cli.data.features import SlideShift
from hinge_cli.data.shift import SlideStats
from hinge_cli.formats.tiles import Tiles
from hinge_cli.slide.patches import PatchGeometry, read_patch
from hinge_cli.slide.reader import hires_image, open_slide

SHARPNESS_SPOTS = 48  # patches read for the focus measure, spread evenly over the slide's spots


def slide_stats(tiles: Tiles, moments: SlideShift, image: tuple[np.ndarray, float] | None = None) -> SlideStats:
    """The slide's feature moments over its spots, its tissue colour under them, its focus, µm/px and size; `image` is
    the slide's low-resolution image and scale when the caller already has them."""
    picture, scale = image if image is not None else hires_image(tiles.attrs.slide, tiles.attrs.mpp_source)
    return SlideStats.of(moments, picture, tiles.coords * scale, tiles.attrs.mpp_source, tiles.attrs.pitch_um, sharpness(tiles))


def sharpness(tiles: Tiles) -> float:
    """How sharp the tissue is at the spots: the median `focus` of patches read as the encoders read them (the model's
    µm/px and patch size). Blur and lossy compression take away the fine detail it measures; a stain change, which
    scales contrast, hardly moves it."""
    pick = np.unique(np.linspace(0, len(tiles.coords) - 1, min(SHARPNESS_SPOTS, len(tiles.coords))).round().astype(int))
    with open_slide(tiles.attrs.slide, tiles.attrs.mpp_source) as slide:
        geometry = PatchGeometry.plan(slide, tiles.attrs.mpp_target, tiles.attrs.patch_px)
        ratios = [focus(read_patch(slide, geometry, x, y)) for x, y in tiles.coords[pick].astype(np.float64)]
    ratios = [r for r in ratios if np.isfinite(r)]
    return float(np.median(ratios)) if ratios else float("nan")


def focus(rgb: np.ndarray) -> float:
    """One patch's fine detail: the mean square of its grey image's Laplacian over the grey image's variance (NaN for a
    flat patch). Dividing by the variance leaves out contrast, which a stain changes."""
    grey = rgb.astype(np.float64).mean(2)
    laplacian = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(np.mean(laplacian**2) / grey.var()) if grey.var() > 0 else float("nan")
