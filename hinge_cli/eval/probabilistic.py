"""How well a prediction's spread describes the truth: coverage, the PIT histogram and proper scores (CRPS, energy score).

Scores come from the draws a prediction file keeps (obsm['samples']); a file with only a spread
(layers['std']) is scored as the Gaussian mean ± std it describes, and a file without one has no
calibration. Every aligned spot counts (the low-count rule is for depth-partial correlations only).
Predictions of normalised expression meet the truth through the observation model (`observation.py`):
their draws are taken to counts at each measured spot's depth first, and coverage is that of the central
68.3%, 95.4% and 90% of those draws (read from the randomised PIT, since counts tie).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from hinge_cli.data.expression import NO_COUNTS, PLAIN, POISSON, Transform
from hinge_cli.eval import observation, proper_scores
from hinge_cli.eval.align import Aligned

GAUSSIAN_COVERAGE = {"within_1std": 0.683, "within_2std": 0.954}
INTERVAL_COVERAGE = 0.90  # of [q05, q95], for any calibrated distribution
PIT_SEED = 0  # the PIT's tie-breaking draws, fixed so a slide's report is the same on every run


@dataclass(frozen=True)
class Calibration:
    """The spread against the truth, over every aligned spot and gene; lower CRPS and energy score are better."""

    within_1std: float
    within_2std: float
    expected_gaussian: dict[str, float] = field(default_factory=lambda: dict(GAUSSIAN_COVERAGE))
    within_90_interval: float = math.nan  # inside [q05, q95]; NaN for files without quantiles
    crps: float = math.nan  # mean over genes of each gene's mean over spots
    energy_score: float = math.nan  # mean over spots; NaN without draws
    pit_histogram: list[float] = field(default_factory=list)  # fractions in 10 equal bins of [0, 1]
    n_draws: int = 0
    crps_from: str = "gaussian"  # "samples" (the draws) or "gaussian" (mean ± std)
    fair: bool = False  # draws' spread term over distinct pairs (scored since 2026-12-01), not all pairs (older files)
    observation: str = PLAIN  # poisson: draws taken to counts at the measured depth (since 2026-12-07); plain: as predicted;
    # no counts: as predicted, because the truth held normalised expression and no depth


@dataclass(frozen=True)
class CalibrationScore:
    """A slide's calibration and the per-gene columns it adds to GeneScores."""

    calibration: Calibration
    per_gene: dict[str, np.ndarray]


def central(pit: np.ndarray, mass: float, axis: int | None = None) -> float | np.ndarray:
    """Fraction of PIT values inside the central `mass` of [0, 1]: the coverage of the central `mass` interval."""
    tail = (1.0 - mass) / 2
    return np.mean((pit >= tail) & (pit <= 1.0 - tail), axis=axis)


def _observed(aligned: Aligned, truth: np.ndarray, transform: Transform, std: np.ndarray) -> CalibrationScore:
    """The calibration of the predicted distribution *for each measurement*: draws through the observation model."""
    noise = np.random.default_rng(observation.SEED)
    base = aligned.draws if aligned.draws is not None else observation.gaussian_draws(aligned.pred, std, noise)
    draws = observation.observed_draws(base, transform, aligned.totals, noise)
    pit = proper_scores.pit_values(draws, truth, np.random.default_rng(PIT_SEED))
    per_gene_crps = proper_scores.crps_from_samples(draws, truth).mean(0)
    calibration = Calibration(
        within_1std=float(central(pit, GAUSSIAN_COVERAGE["within_1std"])), within_2std=float(central(pit, GAUSSIAN_COVERAGE["within_2std"])),
        within_90_interval=float(central(pit, INTERVAL_COVERAGE)), crps=float(per_gene_crps.mean()),
        energy_score=float(proper_scores.energy_score(draws, truth).mean()), pit_histogram=proper_scores.pit_histogram(pit).tolist(),
        n_draws=draws.shape[1], crps_from="samples" if aligned.draws is not None else "gaussian", fair=True, observation=POISSON,
    )
    return CalibrationScore(calibration, {"within_1std": central(pit, GAUSSIAN_COVERAGE["within_1std"], axis=0), "crps": per_gene_crps})


def score_calibration(aligned: Aligned, truth: np.ndarray, transform: Transform) -> CalibrationScore | None:
    """Coverage, PIT and CRPS of the aligned prediction's spread against the model-space truth (through the observation
    model where the units are normalised expression); None without a spread."""
    draws, mean = aligned.draws, aligned.pred
    std = aligned.std if aligned.std is not None or draws is None else draws.std(1, dtype=np.float64)
    if std is None:
        return None
    if transform.rates and aligned.raw:
        return _observed(aligned, truth, transform, std)
    rng = np.random.default_rng(PIT_SEED)
    if draws is not None:
        crps, pit = proper_scores.crps_from_samples(draws, truth), proper_scores.pit_values(draws, truth, rng)
        energy = float(proper_scores.energy_score(draws, truth).mean())
    else:
        crps, pit = proper_scores.crps_gaussian(mean, std, truth), proper_scores.pit_gaussian(mean, std, truth, rng)
        energy = math.nan
    interval = (proper_scores.coverage_interval(aligned.q05, aligned.q95, truth)
                if aligned.q05 is not None and aligned.q95 is not None else math.nan)
    per_gene_crps = crps.mean(0)
    calibration = Calibration(
        within_1std=proper_scores.coverage_std(mean, std, truth, 1.0), within_2std=proper_scores.coverage_std(mean, std, truth, 2.0),
        within_90_interval=interval, crps=float(per_gene_crps.mean()), energy_score=energy,
        pit_histogram=proper_scores.pit_histogram(pit).tolist(), n_draws=0 if draws is None else draws.shape[1],
        crps_from="gaussian" if draws is None else "samples", fair=True, observation=PLAIN if aligned.raw else NO_COUNTS,
    )
    return CalibrationScore(calibration, {"within_1std": proper_scores.coverage_std(mean, std, truth, 1.0, axis=0),
                                          "crps": per_gene_crps})
