"""A tiled and embedded slide's statistics for the shift report (`hinge_cli.data.shift`): read once per slide."""

from __future__ import annotations

import numpy as np

from hinge_cli.data.features import SlideShift
from hinge_cli.data.shift import SlideStats
from hinge_cli.formats.tiles import Tiles
from hinge_cli.slide.reader import hires_image


def slide_stats(tiles: Tiles, moments: SlideShift, image: tuple[np.ndarray, float] | None = None) -> SlideStats:
    """The slide's feature moments over its spots, its tissue colour under them, µm/px and size; `image` is the slide's
    low-resolution image and scale when the caller already has them."""
    picture, scale = image if image is not None else hires_image(tiles.attrs.slide, tiles.attrs.mpp_source)
    return SlideStats.of(moments, picture, tiles.coords * scale, tiles.attrs.mpp_source, tiles.attrs.pitch_um)
