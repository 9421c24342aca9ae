"""eval's pictures of one slide: maps of the best, worst and asked-for genes, co-expression heatmaps, a scatter."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from hinge_cli.core import figures
from hinge_cli.data.expression import expression_unit
from hinge_cli.eval.align import Aligned, Prediction
from hinge_cli.eval.report import GenePicks, Pictures
from hinge_cli.eval.score import VIEWS, SlideScore

N_MAP_GENES = 6  # best and worst genes drawn as maps


def _file_name(gene: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", gene)


def pick_genes(genes: list[str], r: np.ndarray, extra: Sequence[str] = (), n: int = N_MAP_GENES) -> GenePicks:
    """The n best and n worst genes by Pearson (finite only), and the extra genes asked for."""
    ranked = [genes[j] for j in np.argsort(-np.where(np.isfinite(r), r, -np.inf), kind="stable") if np.isfinite(r[j])]
    return GenePicks(best=ranked[:n], worst=ranked[::-1][:n], asked=list(extra))


def _cluster_order(truth_corr: np.ndarray) -> np.ndarray:
    """Genes ordered by average-linkage clustering of the true correlations, so blocks show."""
    if len(truth_corr) <= 2:
        return np.arange(len(truth_corr))
    return leaves_list(linkage(squareform(np.clip(1 - truth_corr, 0, 2), checks=False), "average"))


def draw_pictures(aligned: Aligned, pred: Prediction, result: SlideScore, maps_dir: Path,
                  genes_to_plot: Sequence[str] = (), draw: bool = True) -> Pictures:
    """Maps (true | predicted | its spread, where the file has one | error) of the chosen genes, co-expression
    heatmaps, the Pearson-variance scatter and the PIT histogram; without `draw`, only which genes they would show
    (a cohort's reports stay fast: figures cost seconds a slide)."""
    chosen = pick_genes(aligned.genes, result.pearson, genes_to_plot)
    if not draw:
        return Pictures(maps={}, figures={}, chosen=chosen)
    unit = expression_unit(**pred.transform.to_dict())
    column = {g: j for j, g in enumerate(aligned.genes)}
    xy, diameter = aligned.coords * pred.image_scale, aligned.spot_diameter * pred.image_scale
    maps: dict[str, str] = {}
    for gene in dict.fromkeys(chosen.best + chosen.worst + chosen.asked):
        j = column[gene]
        truth, guess = result.truth[:, j], aligned.pred[:, j]
        spread = [] if aligned.std is None else [figures.MapPanel("predictive std (uncertainty)", aligned.std[:, j], unit)]
        panels = [figures.MapPanel("true", truth, unit), figures.MapPanel("predicted", guess, unit), *spread,
                  figures.MapPanel("error (predicted − true)", guess - truth, unit, diverging=True)]
        title = f"{aligned.sample}: {gene}   Pearson r = {result.pearson[j]:.3f}   depth-partial r = {result.partial[j]:.3f}"
        maps[gene] = figures.spot_maps(maps_dir / f"{_file_name(gene)}.png", xy, diameter, panels, title, pred.image).name
    named: dict[str, str] = {}
    for view in ("model", "depth_partial"):
        cp, ct, used = result.coexpression[view]
        if len(used) < 2:
            continue
        order = _cluster_order(ct)
        names = [aligned.genes[used[k]] for k in order]
        path = figures.heatmaps(maps_dir / f"coexpression_{view}.png",
                                [("true", ct[np.ix_(order, order)]), ("predicted", cp[np.ix_(order, order)])], names,
                                f"{aligned.sample}: gene-gene Pearson, {VIEWS[view]} (genes clustered on the truth)")
        named[f"coexpression_{view}"] = path.name
    path = figures.scatter(maps_dir / "pearson_vs_variance.png",
                           {"Pearson": (result.truth.var(0), result.pearson),
                            "depth-partial": (result.truth.var(0), result.partial)},
                           f"{aligned.sample}: per-gene correlation against truth variance",
                           f"variance of the truth in {unit}", "correlation r (prediction vs truth)")
    named["pearson_vs_variance"] = path.name
    calibration = result.metrics.calibration
    if calibration is not None:
        source = f"ranks among {calibration.n_draws} draws" if calibration.crps_from == "samples" else "Gaussian mean ± std"
        path = figures.histogram(maps_dir / "pit_histogram.png", calibration.pit_histogram,
                                 f"{aligned.sample}: PIT of the truth under the predictive distribution ({source})",
                                 "PIT (where the true value falls in its predictive distribution)",
                                 reference=1 / len(calibration.pit_histogram),
                                 note="flat: calibrated; U: too narrow; hump: too wide; slope: biased")
        named["pit_histogram"] = path.name
    return Pictures(maps=maps, figures=named, chosen=chosen)
