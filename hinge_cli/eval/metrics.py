"""Expression metrics shared by the benchmarks and `hinge eval`.

Sequencing depth dominates raw-count correlations (DESIGN.md, "Evaluation"), so
next to per-gene Pearson there is a depth-partial Pearson: both prediction and
truth are regressed on each spot's log total counts, and the residuals are
correlated. It measures what an image says about a gene beyond "this spot was
sequenced deeply".

NaN policy, the same everywhere: a per-gene correlation is NaN when either side
is constant (no spread beyond rounding) or holds a non-finite value; summaries
exclude those genes and count them (`n_excluded`). Error metrics (`mse`, `mae`)
propagate NaN, so callers drop non-finite genes first and say so.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree
from scipy.stats import rankdata

FLAT = 1e-6  # centred norm below this fraction of the magnitude is constant (float32 rounding is ~6e-8)
# Spots with fewer total counts carry no expression to predict, and one of them can dominate the depth
# regression: depth-partial scores leave them out (and say how many).
MIN_DEPTH = 100.0


def cp10k_log(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """log1p(counts per 10k), with each spot's library size `totals` taken over all its genes."""
    counts = np.asarray(counts, dtype=np.float64)
    scale = 1e4 / np.maximum(np.asarray(totals, dtype=np.float64), 1.0)
    return np.log1p(counts * scale[:, None])


def varying(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Columns with real spread: finite, and a centred norm above rounding of `reference`'s magnitude.

    `reference` (default: `values`) matters for residuals: a prediction that is an
    exact function of depth leaves residuals of pure rounding noise, which must
    count as constant rather than correlate at random.
    """
    x = np.asarray(values, dtype=np.float64)
    ref = x if reference is None else np.asarray(reference, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        spread = np.sqrt(((x - x.mean(0)) ** 2).sum(0))
        scale = np.sqrt((ref**2).sum(0))
    return np.isfinite(spread) & np.isfinite(scale) & (spread > 0) & (spread > FLAT * scale)


def _correlate(p: np.ndarray, t: np.ndarray, valid: np.ndarray) -> np.ndarray:
    p = p - p.mean(0)
    t = t - t.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))
    return np.where(valid, np.clip(r, -1.0, 1.0), np.nan)


def _ranks(values: np.ndarray) -> np.ndarray:
    return rankdata(np.asarray(values, dtype=np.float64), axis=0)


def pearson_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pearson r over spots for each column; NaN where either side is constant or non-finite."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    return _correlate(p, t, varying(p) & varying(t))


def spearman_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman rho (Pearson of ranks, ties averaged) per column; NaN like `pearson_per_gene`."""
    valid = varying(pred) & varying(truth)
    return _correlate(_ranks(pred), _ranks(truth), valid)


def residualise(values: np.ndarray, covariate: np.ndarray) -> np.ndarray:
    """Residuals of each column of `values` after least squares on [1, covariate]."""
    design = np.column_stack([np.ones(len(covariate)), np.asarray(covariate, dtype=np.float64)])
    coef, *_ = np.linalg.lstsq(design, np.asarray(values, dtype=np.float64), rcond=None)
    return values - design @ coef


def depth_residuals(pred: np.ndarray, truth: np.ndarray, log_depth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both sides regressed on log depth, and the genes whose residuals still vary on both sides."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    finite = np.isfinite(p).all(0) & np.isfinite(t).all(0)
    p_res = residualise(np.where(finite, p, 0.0), log_depth)
    t_res = residualise(np.where(finite, t, 0.0), log_depth)
    valid = finite & varying(p_res, p) & varying(t_res, t)
    return p_res, t_res, valid


def depth_partial_pearson(pred: np.ndarray, truth: np.ndarray, log_depth: np.ndarray) -> np.ndarray:
    """Per-gene Pearson of prediction and truth after both are regressed on log depth (within one slide)."""
    p_res, t_res, valid = depth_residuals(pred, truth, log_depth)
    return _correlate(p_res, t_res, valid)


def counted_spots(depth: np.ndarray) -> np.ndarray:
    """The spots depth-partial scores use: those with at least MIN_DEPTH total counts."""
    return np.asarray(depth, dtype=np.float64) >= MIN_DEPTH


def depth_partial_score(pred: np.ndarray, truth: np.ndarray, depth: np.ndarray) -> tuple[float, int]:
    """Mean per-gene depth-partial Pearson over the counted spots, and how many were left out."""
    keep = counted_spots(depth)
    if keep.sum() < 3:
        return float("nan"), int((~keep).sum())
    r = depth_partial_pearson(np.asarray(pred)[keep], np.asarray(truth)[keep], np.log(np.asarray(depth, np.float64)[keep]))
    return (float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")), int((~keep).sum())


def depth_partial_spearman(pred: np.ndarray, truth: np.ndarray, log_depth: np.ndarray) -> np.ndarray:
    """Per-gene Spearman of the depth residuals (the rank analogue of `depth_partial_pearson`)."""
    p_res, t_res, valid = depth_residuals(pred, truth, log_depth)
    return _correlate(_ranks(p_res), _ranks(t_res), valid)


def mse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean((np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)) ** 2))


def mae(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64))))


def top_variable(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns with the largest variance, largest first."""
    order = np.argsort(-np.var(values, axis=0), kind="stable")
    return order[:k]


def pcc_at_k(r: np.ndarray, k: int) -> float:
    """Mean of the k best finite per-gene correlations (the PCC@k of published tables); NaN if the panel has < k genes.

    Optimistic by construction: it picks the best genes after seeing the result,
    so even predictions shuffled across spots score above zero.
    """
    r = np.asarray(r, dtype=np.float64)
    if len(r) < k:
        return float("nan")
    best = np.sort(r[np.isfinite(r)])[::-1][:k]
    return float(best.mean()) if len(best) else float("nan")


def finite_mean(values: np.ndarray) -> float:
    """Mean over finite entries; NaN (not a warning) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def summarise_correlations(r: np.ndarray, top: np.ndarray, ks: tuple[int, ...] = (50, 200)) -> dict[str, float | int]:
    """Mean over the panel and over the genes `top` (indices), PCC@k, and how many genes were excluded (NaN)."""
    r = np.asarray(r, dtype=np.float64)
    out: dict[str, float | int] = {
        "mean": finite_mean(r),
        "mean_top_variable": finite_mean(r[top]),
        "n_genes": len(r),
        "n_excluded": int((~np.isfinite(r)).sum()),
        "n_top_variable": len(top),
    }
    out.update({f"pcc_at_{k}": pcc_at_k(r, k) for k in ks})
    return out


def relative_variance_distance(pred: np.ndarray, truth: np.ndarray) -> tuple[float, np.ndarray]:
    """RVD = mean over genes of (var_pred - var_true)² / var_true², and the per-gene terms.

    0 is perfect, a prediction without spread scores 1, and over-dispersed
    predictions score above 1. Genes constant in the truth are NaN and left out.
    """
    vp = np.var(np.asarray(pred, dtype=np.float64), axis=0)
    vt = np.var(np.asarray(truth, dtype=np.float64), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(varying(truth), (vp - vt) ** 2 / vt**2, np.nan)
    return finite_mean(terms), terms


def correlation_matrix(values: np.ndarray) -> np.ndarray:
    """Gene-gene Pearson matrix (genes are columns)."""
    x = np.asarray(values, dtype=np.float64)
    x = x - x.mean(0)
    norm = np.sqrt((x * x).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = x / norm
    return np.clip(z.T @ z, -1.0, 1.0)


def coexpression(pred: np.ndarray, truth: np.ndarray,
                 valid: np.ndarray | None = None) -> tuple[dict[str, float | int], np.ndarray, np.ndarray, np.ndarray]:
    """Co-expression consistency over the genes that vary on both sides (or the given `valid` mask).

    Returns {consistency: Pearson between the upper triangles of the two gene-gene
    correlation matrices, mean_abs_diff: their mean absolute difference, n_genes},
    the two matrices, and the indices of the genes used.
    """
    genes = np.flatnonzero(varying(pred) & varying(truth) if valid is None else valid)
    cp = correlation_matrix(np.asarray(pred)[:, genes])
    ct = correlation_matrix(np.asarray(truth)[:, genes])
    upper = np.triu_indices(len(genes), k=1)
    a, b = cp[upper], ct[upper]
    consistency = float(pearson_per_gene(a[:, None], b[:, None])[0]) if len(a) >= 2 else float("nan")
    mad = float(np.mean(np.abs(a - b))) if len(a) else float("nan")
    return {"consistency": consistency, "mean_abs_diff": mad, "n_genes": len(genes)}, cp, ct, genes


def knn_weights(coords: np.ndarray, k: int = 6) -> sparse.csr_matrix:
    """Row-standardised k-nearest-neighbour weights (k=6: the ring of a Visium hex grid)."""
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    k = min(k, n - 1)
    _, idx = cKDTree(coords).query(coords, k=k + 1)
    rows = np.repeat(np.arange(n), k)
    cols = idx[:, 1:].ravel()  # the first neighbour is the spot itself
    return sparse.csr_matrix((np.full(n * k, 1.0 / k), (rows, cols)), shape=(n, n))


def morans_i(values: np.ndarray, weights: sparse.csr_matrix) -> np.ndarray:
    """Moran's I per column: (n / ΣW) · zᵀWz / zᵀz, z the centred values; NaN for constant columns."""
    x = np.asarray(values, dtype=np.float64)
    z = x - x.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        i = len(x) / weights.sum() * (z * (weights @ z)).sum(0) / (z * z).sum(0)
    return np.where(varying(x), i, np.nan)

