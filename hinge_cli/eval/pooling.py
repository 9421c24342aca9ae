"""How a bin-level prediction scores as bins are pooled: the bin itself, then 32, 55 and 112 µm squares.

A Visium HD bin holds a few UMI, so its score is mostly counting noise; pooling both sides into squares of the bin
grid (the windows and the half-full rule `tile --visium-hd` pools training spots with) shows how much of the truth
the prediction carries at each scale. The truth's counts are summed. The prediction, which at each bin is the
expression of a neighbourhood the size the model was trained on, is taken back to linear units and averaged (rates)
or summed (counts), then transformed again. Only correlations are scored on pooled squares: the spread of a square's mean would need
the draws' covariance across bins, which a prediction file does not keep, so calibration stays at bin level.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import sparse

from hinge_cli.data.bins import MIN_TISSUE_FRACTION, bin_grid, pool_windows, pseudo_spot_names, window_bins
from hinge_cli.data.expression import Transform
from hinge_cli.eval.align import MIN_SPOTS, Aligned
from hinge_cli.eval.score import SlideMetrics, score_slide

log = logging.getLogger(__name__)

POOL_UM = (32.0, 55.0, 112.0)  # beside the bin itself: twice a 16 µm bin, a Visium spot, twice that


@dataclass(frozen=True)
class PoolingLevel:
    """The scores of one pooling level: both sides pooled to `pool_um` squares (the bin size: not pooled)."""

    pool_um: float
    n_spots: int
    dropped_low_count: int  # spots under the depth floor, left out of the depth-partial score
    median_umi: float
    depth_partial_pearson: float
    pearson: float  # in model space, depth left in
    coexpression_depth_partial: float  # agreement of the predicted and measured gene-gene correlations, depth-partial

    @classmethod
    def of(cls, pool_um: float, aligned: Aligned, metrics: SlideMetrics) -> PoolingLevel:
        c = metrics.correlation
        return cls(pool_um, len(aligned.pred), c.low_count_spots, float(np.median(aligned.totals)), c.depth_partial.pearson.mean,
                   c.model.pearson.mean, c.depth_partial.coexpression.consistency)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def pool_aligned(aligned: Aligned, transform: Transform, bin_um: float, pool_um: float) -> Aligned:
    """Both sides of a bin-level `aligned` pooled to `pool_um` squares holding at least MIN_TISSUE_FRACTION of their
    bins (as `tile --visium-hd` pools): counts and totals summed, centres averaged, no spread. The prediction is
    taken back to linear units and averaged where it is normalised expression (a rate: the square's is its bins'
    mean), summed where it is counts (the square holds its bins' counts), then transformed again."""
    keys, of_bin = pool_windows(bin_grid(aligned.barcodes), bin_um, pool_um)
    n = len(of_bin)
    member = sparse.csr_matrix((np.ones(n), (of_bin, np.arange(n))), shape=(len(keys), n))
    size = np.asarray(member.sum(axis=1)).ravel()
    full = np.flatnonzero(size >= MIN_TISSUE_FRACTION * window_bins(keys, bin_um, pool_um))
    member, size, keys = member[full], size[full], keys[full]
    linear = member @ transform.linear(aligned.pred)
    pred = transform.from_linear(linear / size[:, None] if transform.rates else linear)
    return replace(aligned, pred=pred, std=None, q05=None, q95=None, draws=None, counts=member @ aligned.counts,
                   totals=member @ aligned.totals, coords=member @ aligned.coords / size[:, None],
                   spot_diameter=aligned.spot_diameter * pool_um / bin_um, barcodes=pseudo_spot_names(keys, pool_um))


def pooling_curve(aligned: Aligned, metrics: SlideMetrics, transform: Transform, bin_um: float,
                  levels: tuple[float, ...] = POOL_UM) -> list[PoolingLevel]:
    """The bin level (its `metrics`, already scored) and each coarser level of `levels`, both sides pooled; a level with
    fewer than MIN_SPOTS full squares (a small or cropped prediction) is left out, with a note."""
    curve = [PoolingLevel.of(float(bin_um), aligned, metrics)]
    for pool_um in (p for p in levels if p > bin_um):
        pooled = pool_aligned(aligned, transform, bin_um, pool_um)
        if len(pooled.pred) < MIN_SPOTS:
            log.info("%s: only %d squares of %g µm hold half their bins: that pooling level is left out",
                     aligned.sample, len(pooled.pred), pool_um)
            continue
        curve.append(PoolingLevel.of(pool_um, pooled, score_slide(pooled, transform).metrics))
    return curve


def pooling_table(curve: list[PoolingLevel]) -> list[str]:
    """report.md's section on a bin-level prediction: the score at each pooling level."""
    lines = ["## Pooling: the score as bins are pooled", "",
             "Both sides pooled to squares of the bin grid holding at least half their bins: counts summed, predictions "
             "averaged (normalised expression) or summed (counts) in linear units.", "",
             "| pooled to | spots | median UMI | left out (< 100 UMI) | depth-partial Pearson | Pearson | co-expression |",
             "|---|---|---|---|---|---|---|"]
    for level in curve:
        lines.append(f"| {level.pool_um:g} µm | {level.n_spots} | {level.median_umi:.0f} | {level.dropped_low_count} | "
                     f"{level.depth_partial_pearson:.3f} | {level.pearson:.3f} | {level.coexpression_depth_partial:.3f} |")
    return [*lines, ""]
