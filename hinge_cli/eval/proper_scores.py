"""Proper scores and calibration checks of a predictive distribution, given as draws or as a Gaussian mean ± std.

A proper score is minimised in expectation only by the true distribution, so unlike coverage it
cannot be gamed by a spread that is merely wide enough. The continuous ranked probability score
(CRPS) scores each gene of each spot on its own; the energy score is its multivariate form over a
spot's whole gene vector, and so also rewards draws whose genes move together as the truth's do.
Both are in the units of the values (model space), and lower is better.

Scores from draws are the fair estimates (Ferro 2014): the draws are a sample of the predictive
distribution, so ½ E|X - X'| is averaged over the S(S - 1) pairs of distinct draws. That makes the
expected score the same however many draws were taken. Averaging over all S² pairs (a draw with itself
included) scores the draws' own empirical distribution instead, and charges a spread σ about
σ / (S √π) for having only S draws: 0.06 at S = 8 and σ = 0.9, as much as the gaps the scores are
read for. One draw has no pair to estimate the spread from, so it scores as a point prediction.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

CHUNK_ELEMENTS = 1 << 22  # float64 elements of working memory per chunk of spots (32 MiB)
PIT_BINS = 10


def _spot_chunks(n_spots: int, per_spot: int) -> list[slice]:
    """Slices of spots whose working arrays hold at most CHUNK_ELEMENTS values each."""
    step = max(1, CHUNK_ELEMENTS // max(per_spot, 1))
    return [slice(start, min(start + step, n_spots)) for start in range(0, n_spots, step)]


def _distinct_pairs(n_draws: int) -> int:
    """S (S - 1), the ordered pairs of distinct draws; 1 for a single draw, whose pair sums are 0 anyway."""
    return max(n_draws * (n_draws - 1), 1)


def crps_from_samples(draws: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Fair CRPS of each (spot, gene): E|X - y| - ½ E|X - X'| over the S draws (N, S, G) against the truth (N, G).

    E|X - X'| over distinct pairs comes from the sorted draws, Σᵢ (2i - S - 1) x₍ᵢ₎ · 2 / (S (S - 1)), in O(S log S)
    per element.
    """
    n_spots, n_draws, n_genes = draws.shape
    weights = (2.0 * np.arange(1, n_draws + 1) - n_draws - 1) * 2.0 / _distinct_pairs(n_draws)
    out = np.empty((n_spots, n_genes))
    for rows in _spot_chunks(n_spots, n_draws * n_genes):
        chunk = np.asarray(draws[rows], dtype=np.float64)
        to_truth = np.abs(chunk - np.asarray(truth[rows], dtype=np.float64)[:, None, :]).mean(1)
        between = np.einsum("s,nsg->ng", weights, np.sort(chunk, axis=1))
        out[rows] = to_truth - 0.5 * between
    return out


def crps_gaussian(mean: np.ndarray, std: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Closed-form CRPS of N(mean, std²) at the truth, elementwise: σ (z (2Φ(z) - 1) + 2φ(z) - 1/√π); std 0 gives |mean - truth|."""
    mean, std, truth = (np.asarray(a, dtype=np.float64) for a in (mean, std, truth))
    spread = std > 0
    safe = np.where(spread, std, 1.0)
    z = (truth - mean) / safe
    density = np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi)
    score = safe * (z * (2 * ndtr(z) - 1) + 2 * density - 1 / np.sqrt(np.pi))
    return np.where(spread, score, np.abs(mean - truth))


def energy_score(draws: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Fair energy score of each spot's gene vector: E‖X - y‖ - ½ E‖X - X'‖ (distinct pairs) over the draws (N, S, G);
    (N,), lower is better."""
    n_spots, n_draws, n_genes = draws.shape
    out = np.empty(n_spots)
    for rows in _spot_chunks(n_spots, n_draws * n_draws * n_genes):
        chunk = np.asarray(draws[rows], dtype=np.float64)
        to_truth = np.linalg.norm(chunk - np.asarray(truth[rows], dtype=np.float64)[:, None, :], axis=2).mean(1)
        between = np.linalg.norm(chunk[:, :, None, :] - chunk[:, None, :, :], axis=3).sum((1, 2)) / _distinct_pairs(n_draws)
        out[rows] = to_truth - 0.5 * between
    return out


def pit_values(draws: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Probability integral transform of the truth under the draws (N, S, G): its randomised rank among the S + 1 values.

    (draws below y + U·(draws equal to y + 1)) / (S + 1) with U ~ Uniform(0, 1): exactly uniform on [0, 1] when the
    truth is exchangeable with the draws, and ties (draws equal to the truth) are spread instead of piling up.
    """
    n_spots, n_draws, n_genes = draws.shape
    below, equal = np.empty((n_spots, n_genes)), np.empty((n_spots, n_genes))
    for rows in _spot_chunks(n_spots, n_draws * n_genes):
        chunk, target = np.asarray(draws[rows]), np.asarray(truth[rows], dtype=draws.dtype)[:, None, :]
        below[rows], equal[rows] = (chunk < target).sum(1), (chunk == target).sum(1)
    return (below + rng.uniform(size=below.shape) * (equal + 1)) / (n_draws + 1)


def pit_gaussian(mean: np.ndarray, std: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PIT under N(mean, std²): Φ((y - mean) / std); where std is 0 and the truth equals the mean, a uniform draw."""
    mean, std, truth = (np.asarray(a, dtype=np.float64) for a in (mean, std, truth))
    spread = std > 0
    pit = ndtr((truth - mean) / np.where(spread, std, 1.0))
    point = np.where(truth > mean, 1.0, np.where(truth < mean, 0.0, rng.uniform(size=np.shape(truth))))
    return np.where(spread, pit, point)


def pit_histogram(pit: np.ndarray, bins: int = PIT_BINS) -> np.ndarray:
    """Fractions of the finite PIT values in `bins` equal bins of [0, 1]: flat when calibrated, U when too narrow, a hump when too wide."""
    values = np.asarray(pit, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    counts, _ = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return counts / max(len(values), 1)


def _fraction(inside: np.ndarray, finite: np.ndarray, axis: int | None) -> float | np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = (inside & finite).sum(axis) / finite.sum(axis)
    return float(fraction) if axis is None else fraction


def coverage_std(mean: np.ndarray, std: np.ndarray, truth: np.ndarray, k: float = 1.0,
                 axis: int | None = None) -> float | np.ndarray:
    """Fraction of finite truth values inside mean ± k·std (a calibrated Gaussian: 0.683 at k=1, 0.954 at k=2); NaN if none.

    axis=None: over everything; axis=0: per gene.
    """
    mean, std, truth = (np.asarray(a, dtype=np.float64) for a in (mean, std, truth))
    finite = np.isfinite(mean) & np.isfinite(std) & np.isfinite(truth)
    with np.errstate(invalid="ignore"):
        return _fraction(np.abs(truth - mean) <= k * std, finite, axis)


def coverage_interval(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray,
                      axis: int | None = None) -> float | np.ndarray:
    """Fraction of finite truth values inside [lower, upper] (0.90 for a calibrated [q05, q95]); NaN if none."""
    lower, upper, truth = (np.asarray(a, dtype=np.float64) for a in (lower, upper, truth))
    finite = np.isfinite(lower) & np.isfinite(upper) & np.isfinite(truth)
    with np.errstate(invalid="ignore"):
        return _fraction((truth >= lower) & (truth <= upper), finite, axis)
