"""Tissue detection on a thumbnail: stained tissue is saturated, glass is not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hinge_cli.config import TissueConfig


@dataclass
class TissueMask:
    """A boolean mask over the slide at `downsample` level-0 px per mask px."""

    mask: np.ndarray
    downsample: float
    threshold: float

    def fraction_in_discs(self, centres: np.ndarray, radius_px0: float) -> np.ndarray:
        """Tissue fraction inside a disc around each level-0 centre (sampled on the mask grid)."""
        r = max(radius_px0 / self.downsample, 0.5)
        span = int(np.ceil(r))
        dy, dx = np.mgrid[-span : span + 1, -span : span + 1]
        inside = (dx**2 + dy**2) <= r**2 + 1e-9
        offsets_y, offsets_x = dy[inside], dx[inside]
        cy = np.floor(centres[:, 1] / self.downsample).astype(np.int64)[:, None] + offsets_y[None]
        cx = np.floor(centres[:, 0] / self.downsample).astype(np.int64)[:, None] + offsets_x[None]
        h, w = self.mask.shape
        valid = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
        hits = np.zeros(cy.shape, bool)
        hits[valid] = self.mask[cy[valid], cx[valid]]
        return hits.mean(axis=1).astype(np.float32)


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1e-12)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def _disc(radius: float) -> np.ndarray:
    r = max(int(round(radius)), 1)
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return (x**2 + y**2) <= r**2


def detect_tissue(thumb: np.ndarray, downsample: float, mpp: float, params: TissueConfig) -> TissueMask:
    """Mask tissue on an RGB thumbnail taken at `downsample` of a slide with `mpp` µm/px at level 0."""
    rgb = thumb.astype(np.float32) / 255.0
    vmax = rgb.max(axis=2)
    vmin = rgb.min(axis=2)
    saturation = np.where(vmax > 0, (vmax - vmin) / np.maximum(vmax, 1e-6), 0.0)
    if params.threshold is not None:
        threshold = params.threshold
    else:  # glass against everything stained; clipped, so an all-tissue crop is not split in two
        threshold = float(np.clip(otsu(saturation), params.min_saturation, params.max_saturation))
    mask = saturation > threshold
    um_per_px = downsample * mpp
    if params.close_um > 0:
        mask = ndimage.binary_closing(mask, _disc(params.close_um / um_per_px), border_value=0)
    if params.open_um > 0:
        mask = ndimage.binary_opening(mask, _disc(params.open_um / um_per_px))
    if params.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if params.min_area_um2 > 0 and mask.any():
        labels, n = ndimage.label(mask)
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1)) * um_per_px**2
        keep = np.concatenate([[False], areas >= params.min_area_um2])
        mask = keep[labels]
    return TissueMask(mask=mask, downsample=downsample, threshold=float(threshold))
