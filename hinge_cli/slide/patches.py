"""Where patches go (spots or a lattice over tissue) and how they are cut.

A patch is `patch_px` square at `target_mpp`, centred on a level-0 point, read
from the coarsest pyramid level that is still fine enough and resampled with an
anti-aliasing filter, so every slide yields patches at the same physical scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hinge_cli.slide.reader import Slide, require_mpp
from hinge_cli.slide.tissue import TissueMask

LATTICES = ("hex", "square")


@dataclass(frozen=True)
class PatchGeometry:
    """How a slide's level-0 pixels map onto target patches."""

    level: int
    downsample: float  # level-0 px per pixel of `level`
    side0: float  # patch side in level-0 px
    patch_px: int

    @classmethod
    def plan(cls, slide: Slide, target_mpp: float, patch_px: int) -> PatchGeometry:
        mpp = require_mpp(slide)
        level = slide.best_level(target_mpp / mpp)
        return cls(level, slide.level_downsamples[level], patch_px * target_mpp / mpp, patch_px)


def read_patch(slide: Slide, geom: PatchGeometry, cx: float, cy: float) -> np.ndarray:
    """One (P, P, 3) uint8 patch centred on level-0 (cx, cy)."""
    d = geom.downsample
    side = geom.side0 / d
    lx, ly = (cx - geom.side0 / 2) / d, (cy - geom.side0 / 2) / d
    if abs(side - geom.patch_px) < 1e-6:  # same scale: a plain crop, off by at most half a pixel
        ix, iy = round(lx), round(ly)
        return slide.read(int(ix * d), int(iy * d), geom.level, geom.patch_px, geom.patch_px)
    ix, iy = math.floor(lx) - 1, math.floor(ly) - 1
    size = math.ceil(side) + 3
    region = Image.fromarray(slide.read(int(ix * d), int(iy * d), geom.level, size, size))
    box = (lx - ix, ly - iy, lx - ix + side, ly - iy + side)
    return np.asarray(region.resize((geom.patch_px, geom.patch_px), Image.Resampling.BILINEAR, box=box))


def iter_patch_batches(
    slide: Slide,
    centres: np.ndarray,
    target_mpp: float,
    patch_px: int,
    batch_size: int = 32,
    workers: int = 2,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first index, (B, P, P, 3) patches) in order; `workers` threads read ahead.

    Threads rather than processes: OpenSlide and Pillow release the GIL while
    decoding and resampling, and a plain image stays decoded once in memory.
    """
    geom = PatchGeometry.plan(slide, target_mpp, patch_px)
    starts = range(0, len(centres), batch_size)

    def load(start: int) -> np.ndarray:
        chunk = centres[start : start + batch_size]
        return np.stack([read_patch(slide, geom, float(x), float(y)) for x, y in chunk])

    if workers <= 1:
        for start in starts:
            yield start, load(start)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for start in starts:
            pending.append((start, pool.submit(load, start)))
            if len(pending) > 2 * workers:
                first, future = pending.pop(0)
                yield first, future.result()
        for first, future in pending:
            yield first, future.result()


def lattice(
    mask: TissueMask,
    dimensions: tuple[int, int],
    mpp: float,
    pitch_um: float,
    kind: str = "hex",
) -> tuple[np.ndarray, list[str]]:
    """Lattice points over the tissue's bounding box, anchored at the slide origin.

    Anchoring at (0, 0) rather than at the tissue makes ids (`hex-<row>-<col>`)
    stable: the same slide always yields the same id for the same place.
    """
    pitch = pitch_um / mpp
    dy = pitch * math.sqrt(3) / 2 if kind == "hex" else pitch
    ys, xs = np.nonzero(mask.mask)
    if len(ys) == 0:
        return np.zeros((0, 2)), []
    x_lo, x_hi = xs.min() * mask.downsample, (xs.max() + 1) * mask.downsample
    y_lo, y_hi = ys.min() * mask.downsample, (ys.max() + 1) * mask.downsample
    rows = np.arange(max(0, math.floor(y_lo / dy)), min(math.ceil(y_hi / dy), math.ceil(dimensions[1] / dy)) + 1)
    cols = np.arange(max(0, math.floor(x_lo / pitch) - 1), min(math.ceil(x_hi / pitch), math.ceil(dimensions[0] / pitch)) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    shift = (rr % 2) * 0.5 if kind == "hex" else np.zeros_like(rr, dtype=float)
    x = (cc + shift) * pitch
    y = rr * dy
    inside = (x < dimensions[0]) & (y < dimensions[1])
    centres = np.stack([x[inside], y[inside]], axis=1)
    ids = [f"{kind}-{r}-{c}" for r, c in zip(rr[inside], cc[inside], strict=True)]
    return centres, ids

