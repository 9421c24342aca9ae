"""The observation model: what a prediction says about one *measured* value, count noise included.

A model of normalised expression predicts a rate: each gene's share of the spot's counts. A measured spot
of 600 UMI and one of 12,000 UMI with the same rates give very different values in the same units, because
counting is noisy and noisier at low depth. So each draw of the predicted rate is taken to expected counts
at the measured spot's own total, counted (Poisson), and put back into the units; calibration is then judged
against those draws. It means the same on a shallow section as on a deep one, where a plain ± 1 std
(the model's uncertainty about the rate alone) covers far too little of a shallow section's values.

Predictions in count units (`--normalize none`, log2(counts + 1) at the training data's depth) have no rate
to take to another depth: they are scored plainly, and metrics.json says which was used.
"""

from __future__ import annotations

import numpy as np

from hinge_cli.data.expression import Transform

GAUSSIAN_DRAWS = 32  # draws taken from a file's mean ± std when it kept none
SEED = 20261207  # the counting noise: a fixed seed (the same report on every run) of its own, apart from the PIT's tie-breaking draws


def gaussian_draws(mean: np.ndarray, std: np.ndarray, rng: np.random.Generator, n: int = GAUSSIAN_DRAWS) -> np.ndarray:
    """(N, n, G) draws of N(mean, std²) censored at the floor of the units, for files that kept only a spread."""
    draws = mean[:, None, :] + std[:, None, :] * rng.standard_normal((mean.shape[0], n, mean.shape[1]))
    return np.maximum(draws, 0.0).astype(np.float32)


def observed_draws(draws: np.ndarray, transform: Transform, totals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each draw (N, S, G) of predicted normalised expression as a measurement at each spot's own total: expected counts
    rate x total, Poisson counts, back through the same transform (the truth's path, so equal counts give equal values)."""
    n, s, g = draws.shape
    rate = transform.linear(draws) / transform.target_sum
    totals = np.asarray(totals, dtype=np.float64)
    counts = rng.poisson(rate * totals[:, None, None])
    return transform.apply(counts.reshape(n * s, g), np.repeat(totals, s)).reshape(n, s, g)
