"""The closed-form ridge baseline `hinge train` fits beside the generator, so every run shows whether HINGE helps.

Features are standardised by the HINGE checkpoint's own `FeatureNorm` and averaged over stored
views; targets are the model-space panel. The penalty is the one of a fixed grid with the best
inner cross-validated depth-partial Pearson (the eval's headline): leave one training sample out
when there are several, else seeded random folds of spots. Each fold costs one eigendecomposition
of its Gram matrix, reused for every penalty, so a fit takes seconds. The same folds' residuals
give each gene's predictive std, so the ridge predicts a per-gene Gaussian around its mean.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

from hinge_cli.data.dataset import SpotTable
from hinge_cli.data.expression import MODEL_SPACE_FLOOR, Transform
from hinge_cli.data.features import FeatureNorm
from hinge_cli.errors import HingeError, command
from hinge_cli.eval import metrics
from hinge_cli.formats.prediction import PredictedBatch
from hinge_cli.model.card import ModelCard
from hinge_cli.model.conditioning import DirectPath
from hinge_cli.model.randomness import RIDGE_STREAM, normals
from hinge_cli.predict.ridge_model import PenaltySearch, RidgeModel, design, read_ridge_model, write_ridge_model
from hinge_cli.run.directory import Run

log = logging.getLogger(__name__)

PENALTIES = tuple(float(v) for v in np.logspace(-3, 3, 13))
SPOT_FOLDS = 5
RIDGE = "ridge"  # checkpoints/ridge.safetensors
GAUSSIAN_Q95 = NormalDist().inv_cdf(0.95)  # 1.6449: mean ± this × std bounds the central 90% of a Gaussian


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


def cross_validate(z: np.ndarray, y: np.ndarray, depth: np.ndarray, groups: np.ndarray, seed: int,
                   penalties: Sequence[float] = PENALTIES) -> tuple[PenaltySearch, np.ndarray]:
    """Score every penalty by inner cross-validation (mean over folds of the mean depth-partial Pearson).

    Also returns each penalty's out-of-fold mean squared residual per gene (P, G): every spot is
    held out once, so it is the error on spots the fit did not see.
    """
    held_out, kind = inner_folds(groups, seed)
    scores = np.full((len(held_out), len(penalties)), np.nan)
    squared = np.zeros((len(penalties), y.shape[1]))
    for i, test in enumerate(held_out):
        train = np.setdiff1d(np.arange(len(z)), test)
        fold = Fold(z[train], y[train])
        for j, penalty in enumerate(penalties):
            weights = fold.weights(penalty)
            predicted = z[test] @ weights + fold.intercept(weights)
            scores[i, j] = metrics.depth_partial_score(predicted, y[test], depth[test])[0]
            squared[j] += ((y[test] - predicted) ** 2).sum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(scores, axis=0)
    search = PenaltySearch([float(p) for p in penalties], [float(s) for s in mean], kind, len(held_out))
    return search, squared / sum(len(test) for test in held_out)


def best_penalty(search: PenaltySearch) -> float:
    """The best-scoring penalty (the smallest on ties); the largest when none could be scored."""
    scores = np.array(search.scores)
    if not np.isfinite(scores).any():
        return max(search.penalties)
    return search.penalties[int(np.nanargmax(scores))]


def residual_source(search: PenaltySearch) -> str:
    """Which residuals the predictive std comes from, in words (the prediction file's provenance)."""
    folds = "leave one sample out" if search.folds == "samples" else "seeded folds of spots"
    return f"out-of-fold residuals of the inner cross-validation at the chosen penalty ({folds}, {search.n_folds} folds)"


def fit_ridge(table: SpotTable, norm: FeatureNorm, genes: Sequence[str], encoder_key: str, seed: int = 0,
              penalties: Sequence[float] = PENALTIES, transform: Transform | None = None) -> RidgeModel:
    """Choose the penalty on `table`'s spots by inner CV, then solve on all of them.

    Each gene's predictive std is the root mean square of its out-of-fold residuals at that
    penalty: in-sample residuals would understate the error on a new section. For normalised
    units (`transform`), the count noise the training spots' own depth adds to those residuals is
    taken out (`Transform.less_count_noise`), so the std is the uncertainty
    about the expression, which the observation model counts again at a measured spot's depth.
    """
    z, y = design(table.features, norm), table.targets.astype(np.float64)
    search, mean_square = cross_validate(z, y, table.depth, np.asarray(table.sample, dtype=str), seed, penalties)
    penalty = best_penalty(search)
    fold = Fold(z, y)
    weights = fold.weights(penalty)
    intercept = fold.intercept(weights)
    variance, source = mean_square[search.penalties.index(penalty)], residual_source(search)
    if transform is not None and transform.rates:
        variance = transform.less_count_noise(variance, np.maximum(z @ weights + intercept, 0.0), table.depth)
        source += ", less the count noise of each training spot's depth"
    return RidgeModel(weights, intercept, norm, penalty, search, list(genes), encoder_key, sorted({str(s) for s in table.sample}),
                      len(table), np.sqrt(variance), source)



def ridge_path(checkpoint: Path) -> Path:
    """The ridge baseline stored beside a HINGE checkpoint (the run's: `checkpoints/ridge.safetensors`)."""
    return Path(checkpoint).with_name(f"{RIDGE}.safetensors")


def fit_run_ridge(run: Run, card: ModelCard, train: SpotTable) -> RidgeModel:
    """Fit the ridge on `train`, the training spots of `card`'s split (`SplitData.train_rows`), and store it."""
    ridge = fit_ridge(train, card.feature_norm, card.genes, str(card.encoder_key), card.split.seed, transform=card.transform)
    path = run.checkpoint(RIDGE)
    write_ridge_model(path, ridge)
    log.info("ridge baseline: λ = %.3g, inner-CV depth-partial Pearson %.3f, out-of-fold residual std %.3g (median "
             "over genes; %d folds of %s, %d spots) -> %s", ridge.penalty, ridge.score, float(np.median(ridge.residual_std)),
             ridge.search.n_folds, ridge.search.folds, ridge.n_spots, path)
    return ridge


def load_ridge(checkpoint: Path, genes: Sequence[str], encoder_key: str) -> RidgeModel:
    """The ridge beside `checkpoint`, checked to predict the same panel from the same features."""
    path = ridge_path(checkpoint)
    ridge = read_ridge_model(path)
    if ridge.genes != list(genes) or ridge.encoder_key != encoder_key:
        raise HingeError(f"{path} was fitted for another panel or encoder than {Path(checkpoint).name}",
                         f"run `{command('train')}` again: it refits the ridge baseline with the checkpoint")
    return ridge


def predictive_batch(ridge: RidgeModel, features: np.ndarray, spot_index: np.ndarray, seed: int,
                     n_draws: int | None = None) -> PredictedBatch:
    """The ridge mean of spots `spot_index` and, where the file has a residual std, its per-gene Gaussian.

    std is the gene's residual std at every spot, q05/q95 the Gaussian's exact quantiles, and the
    `n_draws` draws a spot come from the counter-based generator keyed by (seed, spot), so the
    same seed gives the same draws however the spots are batched.
    """
    mean = ridge.predict(features)
    if ridge.residual_std is None:
        return PredictedBatch(mean.astype(np.float32))
    noise = normals(seed, spot_index, n_draws, mean.shape[1], RIDGE_STREAM).reshape(len(mean), n_draws, -1) if n_draws else None
    return gaussian_batch(mean, ridge.residual_std, noise)


def gaussian_batch(mean: np.ndarray, std: np.ndarray, noise: np.ndarray | None = None) -> PredictedBatch:
    """A per-gene Gaussian around `mean` (spots, genes) as the file's layers: std (genes,) at every spot, its exact
    5% and 95% quantiles, and with standard-normal `noise` (spots, draws, genes) the draws; quantiles and draws censored
    at the model space's floor (ridge's and HINGE's coupled predictions alike)."""
    spread = np.broadcast_to(std, mean.shape)
    draws = None if noise is None else (mean[:, None] + spread[:, None] * noise).astype(np.float32)
    return PredictedBatch(mean.astype(np.float32), spread.astype(np.float32), (mean - GAUSSIAN_Q95 * spread).astype(np.float32),
                          (mean + GAUSSIAN_Q95 * spread).astype(np.float32), draws).censored(MODEL_SPACE_FLOOR)


def start_direct_path_at_ridge(direct: DirectPath, train: SpotTable, norm: FeatureNorm, panel: list[str], key: str,
                               seed: int) -> None:
    """Start the direct image path's linear term at the closed-form ridge fit on the training spots.

    Fitting the linear head first and fine-tuning from it (LP-FT) lets training spend its
    epochs on what a linear model cannot do, instead of slowly rediscovering the linear fit.
    """
    ridge = fit_ridge(train, norm, panel, key, seed)
    direct.start_at(torch.from_numpy(ridge.weights).float(), torch.from_numpy(ridge.intercept).float())
    log.info("direct image path starts at the ridge fit (λ = %.3g, inner-CV depth-partial Pearson %.3f, %d spots)",
             ridge.penalty, ridge.score, ridge.n_spots)
