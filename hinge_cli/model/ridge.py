"""The closed-form ridge baseline `hinge train` fits beside the generator, so every run shows whether HINGE helps.

Features are standardised by the HINGE checkpoint's own `FeatureNorm` and averaged over stored
views; targets are the model-space panel. The penalty is the one of a fixed grid with the best
inner cross-validated depth-partial Pearson (the eval's headline): leave one training sample out
when there are several, else seeded random folds of spots. Each fold costs one eigendecomposition
of its Gram matrix, reused for every penalty, so a fit takes seconds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hinge_cli import metrics
from hinge_cli.data.dataset import SpotTable
from hinge_cli.data.features import FeatureNorm
from hinge_cli.errors import HingeError
from hinge_cli.formats.model_card import ModelCard
from hinge_cli.formats.ridge_model import PenaltySearch, RidgeModel, design, read_ridge_model, write_ridge_model
from hinge_cli.run import Run

log = logging.getLogger(__name__)

PENALTIES = tuple(float(v) for v in np.logspace(-3, 3, 13))
SPOT_FOLDS = 5
RIDGE = "ridge"  # checkpoints/ridge.safetensors


class Fold:
    """One training part's eigendecomposed Gram, ready to solve for any penalty."""

    def __init__(self, z: np.ndarray, y: np.ndarray):
        self.n = len(z)
        self.z_mean, self.y_mean = z.mean(0), y.mean(0)
        centred = z - self.z_mean
        self.eigenvalues, self.eigenvectors = np.linalg.eigh(centred.T @ centred)
        self.projected = self.eigenvectors.T @ (centred.T @ (y - self.y_mean))  # Vᵀ Zᵀ (Y − Ȳ)

    def weights(self, penalty: float) -> np.ndarray:
        """W of (ZᵀZ + λ n I) W = Zᵀ(Y − Ȳ), with Z centred on this part."""
        shrink = 1.0 / np.maximum(self.eigenvalues + penalty * self.n, np.finfo(float).tiny)
        return self.eigenvectors @ (shrink[:, None] * self.projected)

    def intercept(self, weights: np.ndarray) -> np.ndarray:
        return self.y_mean - self.z_mean @ weights


def inner_folds(groups: np.ndarray, seed: int) -> tuple[list[np.ndarray], str]:
    """Held-out row sets: one per sample when there are several, else `SPOT_FOLDS` seeded random folds of spots."""
    names = np.unique(groups)
    if len(names) >= 2:
        return [np.flatnonzero(groups == name) for name in names], "samples"
    order = np.random.default_rng(seed).permutation(len(groups))
    return [np.sort(part) for part in np.array_split(order, min(SPOT_FOLDS, len(groups)))], "spots"


def search_penalty(z: np.ndarray, y: np.ndarray, depth: np.ndarray, groups: np.ndarray, seed: int,
                   penalties: Sequence[float] = PENALTIES) -> PenaltySearch:
    """Score every penalty by inner cross-validation (mean over folds of the mean depth-partial Pearson)."""
    held_out, kind = inner_folds(groups, seed)
    scores = np.full((len(held_out), len(penalties)), np.nan)
    for i, test in enumerate(held_out):
        train = np.setdiff1d(np.arange(len(z)), test)
        fold = Fold(z[train], y[train])
        for j, penalty in enumerate(penalties):
            weights = fold.weights(penalty)
            scores[i, j] = metrics.depth_partial_score(z[test] @ weights + fold.intercept(weights), y[test], depth[test])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(scores, axis=0)
    return PenaltySearch([float(p) for p in penalties], [float(s) for s in mean], kind, len(held_out))


def best_penalty(search: PenaltySearch) -> float:
    """The best-scoring penalty (the smallest on ties); the largest when none could be scored."""
    scores = np.array(search.scores)
    if not np.isfinite(scores).any():
        return max(search.penalties)
    return search.penalties[int(np.nanargmax(scores))]


def fit_ridge(table: SpotTable, norm: FeatureNorm, genes: Sequence[str], encoder_key: str, seed: int = 0,
              penalties: Sequence[float] = PENALTIES) -> RidgeModel:
    """Choose the penalty on `table`'s spots by inner CV, then solve on all of them."""
    z, y = design(table.features, norm), table.targets.astype(np.float64)
    search = search_penalty(z, y, table.depth, np.asarray(table.sample, dtype=str), seed, penalties)
    penalty = best_penalty(search)
    fold = Fold(z, y)
    weights = fold.weights(penalty)
    return RidgeModel(weights, fold.intercept(weights), norm, penalty, search, list(genes), encoder_key,
                      sorted({str(s) for s in table.sample}), len(table))


def ridge_path(checkpoint: Path) -> Path:
    """The ridge baseline stored beside a HINGE checkpoint (the run's: `checkpoints/ridge.safetensors`)."""
    return Path(checkpoint).with_name(f"{RIDGE}.safetensors")


def fit_run_ridge(run: Run, card: ModelCard, train: SpotTable) -> RidgeModel:
    """Fit the ridge on `train`, the training spots of `card`'s split (`SplitData.train_rows`), and store it."""
    ridge = fit_ridge(train, card.feature_norm, card.genes, str(card.encoder_key), card.split.seed)
    path = run.checkpoint(RIDGE)
    write_ridge_model(path, ridge)
    log.info("ridge baseline: λ = %.3g, inner-CV depth-partial Pearson %.3f (%d folds of %s, %d spots) -> %s",
             ridge.penalty, ridge.score, ridge.search.n_folds, ridge.search.folds, ridge.n_spots, path)
    return ridge


def load_ridge(checkpoint: Path, genes: Sequence[str], encoder_key: str) -> RidgeModel:
    """The ridge beside `checkpoint`, checked to predict the same panel from the same features."""
    path = ridge_path(checkpoint)
    ridge = read_ridge_model(path)
    if ridge.genes != list(genes) or ridge.encoder_key != encoder_key:
        raise HingeError(f"{path} was fitted for another panel or encoder than {Path(checkpoint).name}",
                         "run `hinge train` again: it refits the ridge baseline with the checkpoint")
    return ridge
