"""The weight-free default encoder: stain, nuclei and texture statistics at several scales.

A first run needs no downloads, yet the features must carry real morphology:
what a pathologist reads (how much haematoxylin, how many and how large the
nuclei, how fibrous or fatty the stroma) is measured directly. The input is a
field larger than the spot; statistics are taken over nested centred regions
(the spot itself, its neighbourhood, a wider context), because expression at a
spot also follows the tissue around it (tumour borders, immune infiltrates).

Neighbouring spots share almost all of their fields, so a slide is encoded in
two steps: the per-pixel maps are computed once per slide tile and reduced to
one value per 16 µm block (`encode`), then each spot's statistics are box sums
over those block maps (integral images, O(1) per region). `forward` is the same
statistic computed from one field alone; it is the reference the slide-level
path is tested against.

Everything is plain tensor arithmetic, so it runs on a GPU as well, and it is
deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Optical-density vectors of haematoxylin, eosin and the residual channel
# (Ruifrok & Johnston, Anal Quant Cytol Histol 2001).
STAIN_OD = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))
HIST_EDGES_H = (0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3)
HIST_EDGES_E = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)
# The block maps, in channel order: each region reports the mean of every one. `blocks` makes them by
# these names, so the channel layout, its counts and the indices below all follow from this one list.
MAPS = (
    "h", "e", "residual",  # stain concentrations
    "tissue",  # soft mask of optical density above the glass
    "nuclear", "nuclear_dense",  # soft masks of H above 0.35 and 0.6
    "dog_fine", "dog_nucleus", "dog_cluster",  # positive band-pass of H: 1-2, 2-4, 4-8 µm
    "dog_fine_abs", "dog_nucleus_abs", "dog_cluster_abs",  # its energy, either sign
    "peaks", "peaks_dense",  # nuclear peaks (one per nucleus) where H blurred at 2 µm exceeds 0.3 and 0.55
    "gradient", "gradient_smooth",  # optical-density gradient magnitude, and it blurred at 4 µm
    "contrast_h", "contrast_e",  # local standard deviation at 2 µm
    "od_r", "od_g", "od_b",  # optical density per colour channel
    *(f"h_bin{i}" for i in range(len(HIST_EDGES_H) + 1)),
    *(f"e_bin{i}" for i in range(len(HIST_EDGES_E) + 1)),
)
# Maps also averaged over tissue pixels only (amounts within tissue, not per area); the signed DoG here.
TISSUE_MAPS = ("h", "e", "nuclear", "dog_nucleus_signed", "peaks", "peaks_dense")
# Block channels: MAPS, then TISSUE_MAPS weighted by tissue, then the tissue weight that divides them.
CHANNELS = (*MAPS, *(f"{name}_in_tissue" for name in TISSUE_MAPS), "tissue_weight")
# Maps whose block-to-block spread (heterogeneity) is reported: H, E, tissue and nuclear-peak density.
SPREAD = ("h", "e", "tissue", "peaks")
SPREAD_MAPS = tuple(MAPS.index(name) for name in SPREAD)
INTEGRAL_CHUNK = 8  # block-map channels summed into one float64 integral image at a time (bounds memory)
# Tiles mapped per call: a few large tensor ops rather than many small ones, whose thread
# synchronisation dominated on a busy CPU; 4 tiles of 576 px hold ~100 MB of maps at once.
TILE_BATCH = 4


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


@dataclass(frozen=True)
class TilePlan:
    """Which tiles of one scale a slide's spots need, and where each spot's regions lie.

    Everything is in that scale's pixels and 16 µm blocks on one global grid
    anchored at the slide origin: tile (ty, tx) holds blocks
    [ty*tile_blocks, (ty+1)*tile_blocks) and is read with `margin` extra pixels
    on each side, so its maps equal those of a whole-slide computation.
    """

    block: int  # pixels per block
    tile_blocks: int  # blocks per tile side
    margin: int  # pixels read beyond each tile side (a multiple of `block`)
    origin: tuple[int, int]  # (y, x) global block index of the block map's first block
    shape: tuple[int, int]  # (height, width) of the block map, in blocks
    tiles: tuple[tuple[int, int], ...]  # (ty, tx) of every tile some spot's widest region touches
    starts: np.ndarray  # (N, 2) float (y, x) of each spot's field origin, in global blocks (fractional)
    layout: tuple[tuple[int, int], ...]  # (offset, width) in blocks of each nested region within the field

    def box(self, tile: tuple[int, int]) -> tuple[int, int, int]:
        """(x0, y0, side) in this scale's pixels: the square a tile is read as, margin included."""
        ty, tx = tile
        step = self.tile_blocks * self.block
        return tx * step - self.margin, ty * step - self.margin, step + 2 * self.margin


class HandcraftedEncoder(nn.Module):
    """RGB in [0, 1] at `mpp` µm/px -> morphology statistics of nested centred regions.

    Per-pixel maps (stain concentrations, tissue and nuclear masks, band-pass
    responses of haematoxylin at nuclear and cluster scales, nuclear peaks,
    gradients, local contrast, stain histograms) are averaged over blocks of
    `block_um`; each nested region reports the mean of every map and the
    block-to-block spread of a few (heterogeneity), square-rooted.
    """

    def __init__(self, mpp: float = 1.0, regions: tuple[float, ...] = (0.25, 0.5, 1.0), block_um: float = 16.0):
        super().__init__()
        self.mpp = float(mpp)
        self.regions = tuple(regions)
        self.block = max(1, round(block_um / mpp))
        od = torch.tensor(STAIN_OD)
        od = od / od.norm(dim=1, keepdim=True)
        self.register_buffer("unmix", torch.linalg.inv(od), persistent=False)
        self.sigmas = (1.0, 2.0, 4.0, 8.0)  # µm: nuclear detail, nucleus, nuclear cluster, gland/nest
        for i, s in enumerate(self.sigmas):
            self.register_buffer(f"g{i}", _gaussian_kernel(s / self.mpp), persistent=False)
        self.register_buffer("h_edges", torch.tensor(HIST_EDGES_H), persistent=False)
        self.register_buffer("e_edges", torch.tensor(HIST_EDGES_E), persistent=False)
        self.n_maps = len(MAPS)
        self.n_tissue = len(TISSUE_MAPS)
        self.n_spread = len(SPREAD_MAPS)
        self.dim = len(self.regions) * (self.n_maps + self.n_tissue + self.n_spread)

    @property
    def peak_radius(self) -> int:
        return max(1, round(3.0 / self.mpp))

    @property
    def margin(self) -> int:
        """Pixels beyond a tile that its maps depend on, rounded up to whole blocks.

        The sum of every kernel's radius bounds any chain of them (blurs, the
        gradient, the peak filter), so it stays safe if `blocks` composes them anew.
        """
        radii = [(getattr(self, f"g{i}").numel() - 1) // 2 for i in range(len(self.sigmas))]
        reach = sum(radii) + self.peak_radius + 1
        return math.ceil(reach / self.block) * self.block

    def layout(self, side: int) -> tuple[tuple[int, int], ...]:
        """(offset, width) in blocks of each nested centred region within a field `side` blocks wide."""
        out = []
        for frac in self.regions:
            w = max(1, round(side * frac))
            out.append(((side - w) // 2, w))
        return tuple(out)

    def view_invariant(self, field_px: int) -> bool:
        """Whether the statistics of a `field_px` field are unchanged by its 8 dihedral views.

        The maps commute with rotations and flips (symmetric kernels, gradient
        magnitude, pointwise stain maths), and means and spreads ignore the order
        of blocks; so invariance needs only a block grid and regions that the
        symmetries map onto themselves: whole blocks, and each region centred exactly.
        """
        side = field_px // self.block
        return field_px % self.block == 0 and all((side - w) % 2 == 0 for _, w in self.layout(side))

    def _blur(self, x: torch.Tensor, i: int) -> torch.Tensor:
        k = getattr(self, f"g{i}").to(x.dtype)
        c = x.shape[1]
        r = (k.numel() - 1) // 2
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def _soft_hist(self, v: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Block fraction of pixels in each bin, with soft edges so the result is smooth in the image.

        A bin is the difference of two soft step functions; averaging is linear,
        so the steps are pooled first and differenced per block (far less memory traffic).
        """
        width = 0.05
        steps = F.avg_pool2d(torch.sigmoid((v - edges.view(1, -1, 1, 1)) / width), self.block)
        cdf = torch.cat([torch.ones_like(steps[:, :1]), steps, torch.zeros_like(steps[:, :1])], dim=1)
        return cdf[:, :-1] - cdf[:, 1:]

    def _peaks(self, blurred: torch.Tensor) -> torch.Tensor:
        """Local maxima at least ~3 µm apart (one per nucleus); separable max filter, no indices."""
        k = 2 * self.peak_radius + 1
        m = F.max_pool2d(blurred, (1, k), stride=1, padding=(0, k // 2))
        m = F.max_pool2d(m, (k, 1), stride=1, padding=(k // 2, 0))
        return (blurred == m).to(blurred.dtype)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel maps averaged over `block_um` blocks: (B, len(CHANNELS), S/b, S/b), in CHANNELS order.

        Each group of maps is pooled as soon as it is made, so the full-resolution
        stack is never held at once (memory traffic dominated the run time).
        """
        pooled: dict[str, torch.Tensor] = {}

        def add(names: tuple[str, ...], stack: torch.Tensor, pool: bool = True) -> None:
            stack = F.avg_pool2d(stack, self.block) if pool else stack
            pooled.update(zip(names, stack.split(1, dim=1), strict=True))

        od = -torch.log(x.clamp(min=1.0 / 255.0))
        conc = torch.einsum("bchw,cs->bshw", od, self.unmix.to(x.dtype)).clamp(min=0)
        h, e = conc[:, :1], conc[:, 1:2]
        tissue = torch.sigmoid((od.sum(1, keepdim=True) - 0.3) * 15)
        nuclear = [torch.sigmoid((h - t) * 20) for t in (0.35, 0.6)]
        # One depthwise pass per kernel: H at sigma 2 µm is also the local mean used for contrast.
        fine = self._blur(torch.cat([h, od.mean(1, keepdim=True)], dim=1), 0)
        mid = self._blur(torch.cat([h, e, h * h, e * e], dim=1), 1)
        hb = [fine[:, :1], mid[:, :1], self._blur(h, 2), self._blur(h, 3)]
        dog = [hb[i] - hb[i + 1] for i in range(3)]
        peak = self._peaks(hb[1])
        peaks = [peak * (hb[1] > t).to(x.dtype) for t in (0.3, 0.55)]
        gy, gx = torch.gradient(fine[:, 1:], dim=(2, 3))
        grad = torch.sqrt(gx**2 + gy**2 + 1e-12)
        contrast = torch.sqrt((mid[:, 2:] - mid[:, :2] ** 2).clamp(min=0) + 1e-12)
        add(("h", "e", "residual"), conc)
        add(("tissue",), tissue)
        for name, mask in zip(("nuclear", "nuclear_dense"), nuclear, strict=True):
            add((name,), mask)
        for name, band in zip(("dog_fine", "dog_nucleus", "dog_cluster"), dog, strict=True):
            add((name,), band.clamp(min=0))
            add((f"{name}_abs",), band.abs())
        for name, found in zip(("peaks", "peaks_dense"), peaks, strict=True):
            add((name,), found)
        add(("gradient",), grad)
        add(("gradient_smooth",), self._blur(grad, 2))
        add(("contrast_h", "contrast_e"), contrast)
        add(("od_r", "od_g", "od_b"), od)
        add(tuple(n for n in MAPS if n.startswith("h_bin")), self._soft_hist(h, self.h_edges), pool=False)
        add(tuple(n for n in MAPS if n.startswith("e_bin")), self._soft_hist(e, self.e_edges), pool=False)
        full_res = {"h": h, "e": e, "nuclear": nuclear[0], "dog_nucleus_signed": dog[1], "peaks": peaks[0], "peaks_dense": peaks[1]}
        for name in TISSUE_MAPS:
            add((f"{name}_in_tissue",), full_res[name] * tissue)
        add(("tissue_weight",), tissue)
        return torch.cat([pooled[name] for name in CHANNELS], dim=1)

    def _region_features(self, mean: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
        """(N, C) block means and (N, n_spread) mean squares of the spread maps, over one region -> its statistics."""
        base = mean[:, : self.n_maps]
        tissue_mean = mean[:, self.n_maps : self.n_maps + self.n_tissue] / (mean[:, -1:] + 1e-3)
        spread = (mean_sq - mean[:, list(SPREAD_MAPS)] ** 2).clamp(min=0).sqrt()
        return torch.cat([base, tissue_mean, spread], dim=1)

    @staticmethod
    def _finish(parts: list[torch.Tensor]) -> torch.Tensor:
        # Every statistic is a non-negative amount (density, fraction, energy); the square root
        # stabilises their variance, as for counts, so a linear read-out weighs them evenly.
        return torch.cat(parts, dim=1).clamp(min=0).sqrt().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) fields centred on their spots -> (B, dim): the per-field reference computation."""
        blocks = self.blocks(x.float())
        feats = []
        for lo, w in self.layout(blocks.shape[-1]):
            region = blocks[:, :, lo : lo + w, lo : lo + w].flatten(2).double()
            feats.append(self._region_features(region.mean(-1), (region[:, list(SPREAD_MAPS)] ** 2).mean(-1)))
        return self._finish(feats)

    def plan(self, centres: np.ndarray, field_px: int, tile_px: int = 1024) -> TilePlan:
        """The tiles and block map that spots centred at `centres` ((N, 2) x, y in this scale's pixels) need.

        A spot's field starts at its centre minus half the field, which in
        general falls inside a block of the global grid: regions keep that
        fractional position (see `pool`), rather than snapping to whole blocks.
        """
        side = field_px // self.block
        layout = self.layout(side)
        starts = (np.asarray(centres, np.float64)[:, ::-1] / self.block - side / 2).reshape(-1, 2)
        tile_blocks = max(1, tile_px // self.block)
        lo_all = np.floor(starts + min(o for o, _ in layout)).astype(np.int64)
        hi_all = np.ceil(starts + max(o + w for o, w in layout)).astype(np.int64)
        if len(starts):
            origin, end = lo_all.min(0), hi_all.max(0)
        else:
            origin = end = np.zeros(2, np.int64)
        first, last = np.floor_divide(lo_all, tile_blocks), np.floor_divide(hi_all - 1, tile_blocks)
        tiles = sorted({(ty, tx) for (y0, x0), (y1, x1) in zip(first.tolist(), last.tolist(), strict=True)
                        for ty in range(y0, y1 + 1) for tx in range(x0, x1 + 1)})
        return TilePlan(self.block, tile_blocks, self.margin, (int(origin[0]), int(origin[1])),
                        (int(end[0] - origin[0]), int(end[1] - origin[1])), tuple(tiles), starts, layout)

    def block_map(self, plan: TilePlan, tiles: Iterable[np.ndarray], advance: Callable[..., None] | None = None) -> torch.Tensor:
        """Block maps (C, H, W) of the plan's area from its tiles' pixels ((side, side, 3) uint8, in plan order)."""
        device = self.unmix.device
        channels = len(CHANNELS)
        out = torch.zeros(channels, *plan.shape, device=device)
        keep = plan.margin // plan.block
        oy, ox = plan.origin
        pixels = iter(tiles)
        for first in range(0, len(plan.tiles), TILE_BATCH):
            where = plan.tiles[first : first + TILE_BATCH]
            batch = np.stack([next(pixels) for _ in where])
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            maps = self.blocks(x)[:, :, keep : keep + plan.tile_blocks, keep : keep + plan.tile_blocks]
            for (ty, tx), tile_maps in zip(where, maps, strict=True):
                gy, gx = ty * plan.tile_blocks, tx * plan.tile_blocks
                y0, y1 = max(gy, oy), min(gy + plan.tile_blocks, oy + plan.shape[0])
                x0, x1 = max(gx, ox), min(gx + plan.tile_blocks, ox + plan.shape[1])
                out[:, y0 - oy : y1 - oy, x0 - ox : x1 - ox] = tile_maps[:, y0 - gy : y1 - gy, x0 - gx : x1 - gx]
            if advance is not None:
                advance(len(where))
        return out

    @staticmethod
    def _integral_at(integral: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(C, H+1, W+1) integral image at fractional block positions -> (C, N).

        The block map is constant within each block, so its integral is bilinear
        within each block: interpolating the corners is exact, not an approximation.
        """
        y0 = y.floor().long().clamp(0, integral.shape[1] - 2)
        x0 = x.floor().long().clamp(0, integral.shape[2] - 2)
        fy, fx = y - y0, x - x0
        top = integral[:, y0, x0] * (1 - fx) + integral[:, y0, x0 + 1] * fx
        bottom = integral[:, y0 + 1, x0] * (1 - fx) + integral[:, y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    def pool(self, blocks: torch.Tensor, plan: TilePlan, rows: slice = slice(None)) -> torch.Tensor:
        """The statistics of the plan's spots `rows` from the block map: (n, dim), box sums over integral images
        (float64). The block map is the slide's; `rows` bounds the memory to a chunk of spots however many there are.

        Off the grid, a region takes the slide's blocks weighted by overlap: its
        means differ from the per-field ones only through partial blocks, its
        spread is that of the slide's blocks rather than of blocks cut at the field.
        """
        chosen = plan.starts[rows]
        n = len(chosen)
        starts = torch.as_tensor(chosen - np.asarray(plan.origin), dtype=torch.float64, device=blocks.device)
        values = torch.cat([blocks, blocks[list(SPREAD_MAPS)] ** 2])
        sums = torch.empty(len(self.regions), n, len(values), dtype=torch.float64, device=blocks.device)
        for c0 in range(0, len(values), INTEGRAL_CHUNK):
            chunk = values[c0 : c0 + INTEGRAL_CHUNK].double()
            integral = F.pad(chunk.cumsum(1).cumsum(2), (1, 0, 1, 0))
            for r, (lo, w) in enumerate(plan.layout):
                y0, x0 = starts[:, 0] + lo, starts[:, 1] + lo
                y1, x1 = y0 + w, x0 + w
                corners = ((y1, x1, 1.0), (y0, x1, -1.0), (y1, x0, -1.0), (y0, x0, 1.0))
                sums[r, :, c0 : c0 + len(chunk)] = sum(sign * self._integral_at(integral, y, x) for y, x, sign in corners).T
        channels = len(blocks)
        feats = [self._region_features(s[:, :channels] / (w * w), s[:, channels:] / (w * w))
                 for s, (_, w) in zip(sums, plan.layout, strict=True)]
        return self._finish(feats)
