"""The weight-free default encoder: stain, nuclei and texture statistics at several scales.

A first run needs no downloads, yet the features must carry real morphology:
what a pathologist reads (how much haematoxylin, how many and how large the
nuclei, how fibrous or fatty the stroma) is measured directly. The input is a
field larger than the spot; statistics are taken over nested centred regions
(the spot itself, its neighbourhood, a wider context), because expression at a
spot also follows the tissue around it (tumour borders, immune infiltrates).

Everything is plain tensor arithmetic, so it batches and runs on a GPU like
the learned encoders, and it is deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Optical-density vectors of haematoxylin, eosin and the residual channel
# (Ruifrok & Johnston, Anal Quant Cytol Histol 2001).
STAIN_OD = ((0.650, 0.704, 0.286), (0.072, 0.990, 0.105), (0.268, 0.570, 0.776))
HIST_EDGES_H = (0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3)
HIST_EDGES_E = (0.1, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class HandcraftedEncoder(nn.Module):
    """(B, 3, S, S) RGB in [0, 1] covering `field_um` -> (B, dim) morphology statistics.

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
        self.n_maps = 3 + 1 + 2 + 3 + 3 + 2 + 2 + 2 + 3 + 2 * (len(HIST_EDGES_H) + 1)
        self.n_tissue = 6  # maps also averaged over tissue pixels only
        self.n_spread = 4
        self.dim = len(self.regions) * (self.n_maps + self.n_tissue + self.n_spread)

    def _blur(self, x: torch.Tensor, i: int) -> torch.Tensor:
        k = getattr(self, f"g{i}").to(x.dtype)
        c = x.shape[1]
        r = (k.numel() - 1) // 2
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    @staticmethod
    def _soft_hist(v: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        """Fraction of pixels in each bin, with soft edges so the result is smooth in the image."""
        width = 0.05
        cdf = torch.sigmoid((v - edges.view(1, -1, 1, 1)) / width)
        ones = torch.ones_like(v)
        zeros = torch.zeros_like(v)
        cdf = torch.cat([ones, cdf, zeros], dim=1)
        return cdf[:, :-1] - cdf[:, 1:]

    def _peaks(self, blurred: torch.Tensor) -> torch.Tensor:
        """Local maxima at least ~3 µm apart (one per nucleus); separable max filter, no indices."""
        k = 2 * max(1, round(3.0 / self.mpp)) + 1
        m = F.max_pool2d(blurred, (1, k), stride=1, padding=(0, k // 2))
        m = F.max_pool2d(m, (k, 1), stride=1, padding=(k // 2, 0))
        return (blurred == m).to(blurred.dtype)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel maps averaged over `block_um` blocks: (B, n_maps + n_tissue + 1, S/b, S/b).

        Each group of maps is pooled as soon as it is made, so the full-resolution
        stack is never held at once (memory traffic dominated the run time).
        """
        pool = lambda m: F.avg_pool2d(m, self.block)  # noqa: E731
        od = -torch.log(x.clamp(min=1.0 / 255.0))
        conc = torch.einsum("bchw,cs->bshw", od, self.unmix.to(x.dtype)).clamp(min=0)
        h, e = conc[:, :1], conc[:, 1:2]
        tissue = torch.sigmoid((od.sum(1, keepdim=True) - 0.3) * 15)
        nuclear = torch.cat([torch.sigmoid((h - t) * 20) for t in (0.35, 0.6)], dim=1)
        hb = [self._blur(h, i) for i in range(len(self.sigmas))]
        dog = torch.cat([hb[i] - hb[i + 1] for i in range(3)], dim=1)
        peak = self._peaks(hb[1])
        peaks = torch.cat([peak * (hb[1] > t).to(x.dtype) for t in (0.3, 0.55)], dim=1)
        grey = self._blur(od.mean(1, keepdim=True), 0)
        gy, gx = torch.gradient(grey, dim=(2, 3))
        grad = torch.sqrt(gx**2 + gy**2 + 1e-12)
        he = torch.cat([h, e], dim=1)
        mean2 = self._blur(he, 1)
        contrast = torch.sqrt((self._blur(he * he, 1) - mean2**2).clamp(min=0) + 1e-12)
        # Tissue-weighted: H, E, nuclear mask, nucleus-scale DoG, peaks (amounts within tissue, not per area).
        weighted = torch.cat([h, e, nuclear[:, :1], dog[:, 1:2], peaks], dim=1) * tissue
        return torch.cat(
            [
                pool(conc), pool(tissue), pool(nuclear), pool(dog.clamp(min=0)), pool(dog.abs()), pool(peaks),
                pool(grad), pool(self._blur(grad, 2)), pool(contrast), pool(od),
                pool(self._soft_hist(h, self.h_edges)), pool(self._soft_hist(e, self.e_edges)),
                pool(weighted), pool(tissue),
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks(x.float())
        n, side = blocks.shape[1], blocks.shape[-1]
        feats = []
        for frac in self.regions:
            w = max(1, round(side * frac))
            lo = (side - w) // 2
            region = blocks[:, :, lo : lo + w, lo : lo + w].flatten(2)
            mean = region.mean(-1)
            base = mean[:, : self.n_maps]
            tissue_mean = mean[:, self.n_maps : self.n_maps + self.n_tissue] / (mean[:, n - 1 :] + 1e-3)
            spread = region[:, [0, 1, 3, 12]].std(-1, unbiased=False) if w > 1 else torch.zeros_like(base[:, :4])
            feats += [base, tissue_mean, spread]
        # Every statistic is a non-negative amount (density, fraction, energy); the square root
        # stabilises their variance, as for counts, so a linear read-out weighs them evenly.
        return torch.cat(feats, dim=1).clamp(min=0).sqrt()
