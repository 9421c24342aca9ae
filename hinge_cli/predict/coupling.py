"""Gene-gene coupling of the predictive Gaussian, and the joint Gaussian of truth and prediction that completion uses.

What the network leaves unexplained in a spot is correlated across genes (a spot richer in one
immune gene than its image suggests is richer in the others). Measured once on the training
spots' residuals, each divided by its predicted spread, that correlation makes one draw show the
truth's co-expression, and conditions the spread of genes when others are given (panel
completion), whose mean comes from the joint Gaussian of truth and prediction
(below). On HER2ST, 10 given genes
lift the other genes' depth-partial Pearson from 0.248 to 0.392 (docs/benchmarks/her2st-completion.md); the network's
own attention to visible genes moved it by 0.02 (docs/benchmarks/archive/her2st-completion-log2counts.md).

The joint Gaussian of the truth and the one-shot prediction over the training spots says what given genes predict.
With genes measured on a spot (panel completion), the best linear guess of another gene uses the
measured values and the image's predictions of every gene together, weighing each by how well it
predicted the gene on the training spots. Conditioning the residual Gaussian instead keeps the
image's prediction of the gene at full weight however much the given genes say; on HER2ST
(k = 10 of 50 genes given) that left 0.043 depth-partial Pearson to a ridge refitted on the given
genes; this, deflated by `optimism_factor`, is level with it (0.468 vs 0.469). The correlation is
shrunk toward the identity by a factor chosen by cross-validation over the training samples
(held-out spots, random sets of given genes), never on the data predicted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hinge_cli.data.expression import less_noise
from hinge_cli.eval import metrics

SHRINKAGE = 0.05  # pull toward the identity: keeps the matrix well conditioned when genes outnumber spots
MIN_CONDITIONAL_VARIANCE = 1e-6
EIGEN_FLOOR = 1e-3  # the least eigenvalue of a correlation with the count noise taken out


def fit_correlation(standardised: np.ndarray, shrinkage: float = SHRINKAGE, noise: np.ndarray | None = None) -> np.ndarray:
    """The genes' correlation over spots (rows), shrunk toward the identity; a gene that never varies is uncorrelated.

    `noise` (same shape, in the same standardised units) is the variance counting adds to each value (the observation
    model): independent across genes, it only dilutes the correlations, so its mean comes off the covariance's diagonal
    first (`data.expression.less_noise`) and the correlation is that of the expression itself.
    """
    z = np.asarray(standardised, dtype=np.float64)
    finite = np.isfinite(z).all(1)
    if noise is None:
        correlation = np.nan_to_num(metrics.correlation_matrix(z[finite]))
    else:
        covariance = np.atleast_2d(np.cov(z[finite], rowvar=False))
        variance = np.diag(covariance)
        rate = less_noise(variance, np.asarray(noise, dtype=np.float64)[finite].mean(0))
        scale = np.sqrt(rate)
        with np.errstate(divide="ignore", invalid="ignore"):
            correlation = np.nan_to_num(covariance / np.outer(scale, scale))
        np.fill_diagonal(correlation, 1.0)
        correlation = positive_definite(correlation)
    np.fill_diagonal(correlation, 1.0)
    return (1 - shrinkage) * correlation + shrinkage * np.eye(len(correlation))


def positive_definite(matrix: np.ndarray, floor: float = EIGEN_FLOOR) -> np.ndarray:
    """The correlation matrix nearest `matrix` in one step: its eigenvalues raised to `floor`, its diagonal back to 1.

    Taking each gene's count noise off the diagonal can leave a matrix that no Gaussian has."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    fixed = (vectors * np.maximum(values, floor)) @ vectors.T
    scale = np.sqrt(np.diag(fixed))
    return fixed / np.outer(scale, scale)


@dataclass
class CoupledDraws:
    """A batch's Gaussian after coupling: its mean and std per gene (B, G) and the draws' standardised noise (B, S, G).

    Draws are mean + std x noise; a given gene has its value as mean, std 0.
    """

    mean: Tensor
    std: Tensor
    noise: Tensor

    @property
    def draws(self) -> Tensor:
        return self.mean[:, None] + self.std[:, None] * self.noise


class GeneCoupling:
    """Correlated draws from a per-spot Gaussian, conditioned on the genes given at each spot.

    With a `joint` Gaussian of truth and prediction, a given spot's other genes take its
    conditional mean (`hinge_cli.predict.coupling`); their spread and draws are still conditioned
    through the residual correlation.
    """

    def __init__(self, correlation: np.ndarray | Tensor, joint: JointGaussian | None = None):
        self.correlation = torch.as_tensor(np.asarray(correlation), dtype=torch.float64)
        self.factor = torch.linalg.cholesky(self.correlation)
        self.joint = joint

    @classmethod
    def independent(cls, n_genes: int) -> GeneCoupling:
        """No coupling: every gene drawn on its own (a model card from before the coupling)."""
        return cls(np.eye(n_genes))

    def draw(self, mean: Tensor, std: Tensor, normal: Tensor, given: Tensor | None = None,
             given_values: Tensor | None = None) -> CoupledDraws:
        """mean, std (B, G) and independent standard-normal `normal` (B, S, G) to coupled draws.

        Given genes (B, G bool, held at `given_values`) are conditioned on: each spot's other genes
        get the conditional mean and std, and Matheron's rule turns the unconditional draw into a
        conditional one (draw + K (given - the draw's given genes)), one solve per pattern of givens.
        """
        dtype = mean.dtype
        factor = self.factor.to(mean.device)
        z = (normal.to(factor.dtype) @ factor.T)
        out_mean, out_std, noise = mean.to(factor.dtype).clone(), std.to(factor.dtype).clone(), z.clone()
        if given is not None and bool(given.any()):
            patterns, which = torch.unique(given.to(torch.bool), dim=0, return_inverse=True)
            for p, pattern in enumerate(patterns):
                if pattern.any():
                    self._condition(pattern, which == p, out_mean, out_std, noise, given_values.to(factor.dtype))
        return CoupledDraws(out_mean.to(dtype), out_std.to(dtype), noise.to(dtype))

    def _condition(self, pattern: Tensor, rows: Tensor, mean: Tensor, std: Tensor, noise: Tensor, values: Tensor) -> None:
        """Condition `rows` (whose given genes are `pattern`) in place."""
        r = self.correlation.to(mean.device)
        v, h = pattern.nonzero().flatten(), (~pattern).nonzero().flatten()
        gain = torch.linalg.solve(r[v][:, v], r[v][:, h])  # (V, H): the regression of hidden on given z-scores
        conditional = (1 - (r[h][:, v] * gain.T).sum(1)).clamp_min(MIN_CONDITIONAL_VARIANCE).sqrt()
        idx = rows.nonzero().flatten()
        m, s, z = mean[idx], std[idx], noise[idx]
        if self.joint is None:
            m[:, h] = m[:, h] + s[:, h] * (((values[idx][:, v] - m[:, v]) / s[:, v]) @ gain)
        else:
            m[:, h] = self.joint.predict(m, values[idx], pattern)
        s[:, h] = s[:, h] * conditional
        z[:, :, h] = (z[:, :, h] - z[:, :, v] @ gain) / conditional
        m[:, v], s[:, v], z[:, :, v] = values[idx][:, v], 0.0, 0.0
        mean[idx], std[idx], noise[idx] = m, s, z


# ----------------------------------------------------------------------------- the joint Gaussian of truth and prediction

SHRINKAGES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
GIVEN_SHARE = 0.2  # the share of the panel given in each cross-validation draw
DRAWS_PER_FOLD = 3
SPOT_FOLDS = 5  # folds of random spots when the training data are one sample


@dataclass
class JointGaussian:
    """Mean, std and correlation of z = [truth (G), one-shot mean (G)] over training spots."""

    mean: np.ndarray  # (2G,)
    std: np.ndarray  # (2G,)
    correlation: np.ndarray  # (2G, 2G), shrunk toward the identity
    shrinkage: float

    @classmethod
    def fit(cls, truth: np.ndarray, predicted: np.ndarray, shrinkage: float) -> JointGaussian:
        z = np.concatenate([truth, predicted], 1).astype(np.float64)
        z = z[np.isfinite(z).all(1)]
        std = z.std(0)
        return cls(z.mean(0), np.where(std > 0, std, 1.0), fit_correlation(z, shrinkage), shrinkage)

    @property
    def n_genes(self) -> int:
        return len(self.mean) // 2

    def deflated(self, factor: float) -> JointGaussian:
        """The same Gaussian with every truth-prediction correlation scaled by `factor` (see `optimism_factor`).

        A convex mix of the matrix and its block diagonal, so it stays a correlation matrix.
        """
        g = self.n_genes
        correlation = self.correlation.copy()
        correlation[:g, g:] *= factor
        correlation[g:, :g] *= factor
        return JointGaussian(self.mean, self.std, correlation, self.shrinkage)

    def predict(self, predicted: Tensor, values: Tensor, given: Tensor) -> Tensor:
        """E[truth of the genes not `given` (G,) | every gene's prediction (B, G), the given genes' values (B, G)]: (B, H)."""
        g = self.n_genes
        observed = torch.cat([torch.arange(g, 2 * g), given.nonzero().flatten().cpu()])
        hidden = (~given).nonzero().flatten().cpu()
        r, mean, std = (torch.as_tensor(a, dtype=torch.float64) for a in (self.correlation, self.mean, self.std))
        gain = torch.linalg.solve(r[observed][:, observed], r[observed][:, hidden])
        z = torch.cat([predicted, values[:, given]], 1).to(torch.float64).cpu()
        out = mean[hidden] + std[hidden] * (((z - mean[observed]) / std[observed]) @ gain)
        return out.to(predicted.device, predicted.dtype)


def choose_joint(truth: np.ndarray, predicted: np.ndarray, samples: np.ndarray, seed: int = 0) -> JointGaussian:
    """The joint Gaussian with the shrinkage whose held-out completion error was least (leave one sample out, or
    random spot folds with one sample), fitted on every spot."""
    groups = samples if len(np.unique(samples)) > 1 else np.random.default_rng(seed).integers(0, SPOT_FOLDS, len(truth))
    rng = np.random.default_rng(seed)
    g = truth.shape[1]
    patterns = [rng.random(g) < GIVEN_SHARE for _ in range(DRAWS_PER_FOLD)]
    patterns = [p for p in patterns if 0 < p.sum() < g] or [np.arange(g) < max(1, g // 5)]
    scale = truth.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    errors = {}
    for shrinkage in SHRINKAGES:
        total = 0.0
        for group in np.unique(groups):
            out = groups == group
            joint = JointGaussian.fit(truth[~out], predicted[~out], shrinkage)
            for pattern in patterns:
                given = torch.from_numpy(pattern)
                guess = joint.predict(torch.from_numpy(predicted[out]), torch.from_numpy(truth[out]), given).numpy()
                total += float(np.mean(((guess - truth[out][:, ~pattern]) / scale[~pattern]) ** 2))
        errors[shrinkage] = total
    return JointGaussian.fit(truth, predicted, min(errors, key=errors.get))


def optimism_factor(fitted: tuple[np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray]) -> float:
    """How much of the in-sample (prediction, truth) correlation survives on held-out spots, in [0, 1].

    The joint Gaussian is fitted on the spots the network trained on, where its predictions track
    the truth better than on a new slide, so it trusts them too much against the given genes. The
    validated model's mean per-gene Pearson on its validation spots over that on its training spots
    measures the excess; on HER2ST it is 0.82-0.94 and scaling the cross-correlations by it lifted
    completion (k = 10) from 0.456 to 0.468 depth-partial Pearson.
    """
    inside, outside = (metrics.finite_mean(metrics.pearson_per_gene(*pair)) for pair in (fitted, held_out))
    if not np.isfinite(inside) or inside <= 0 or not np.isfinite(outside):
        return 1.0
    return float(np.clip(outside / inside, 0.0, 1.0))


MIN_TRANSFER_SPOTS = 20  # fewer spots with a given gene: its Pearson is too noisy to judge the image by
TRUSTED = 0.05  # an expected image-truth correlation below this leaves nothing to deflate
RELIABILITY_FLOOR = 0.1  # at most a ~3x disattenuation of a very shallow slide's correlation


@dataclass(frozen=True)
class ImageTransfer:
    """How well the image predicts the given genes on this slide, against what the joint Gaussian expects of it."""

    weight: float  # the joint's truth-prediction correlations are scaled by it on this slide, in [0, 1]
    slide_r: float  # mean Pearson over given genes of one-shot mean and measured value, count noise removed
    expected_r: float  # the joint Gaussian's mean truth-prediction correlation of the same genes
    n_genes: int  # given genes judged (measured on at least MIN_TRANSFER_SPOTS spots)

    def to_dict(self) -> dict[str, float | int]:
        return {"image_weight": round(self.weight, 4), "image_r_given_genes": round(self.slide_r, 4),
                "image_r_expected": round(self.expected_r, 4), "image_r_genes": self.n_genes}


def image_transfer(joint: JointGaussian, predicted: np.ndarray, values: np.ndarray, mask: np.ndarray,
                   noise_variance: np.ndarray | None = None) -> ImageTransfer:
    """The weight of the image against the given genes on one slide: how well its predictions of the given genes
    (N, G) track their measured `values` where `mask`, over the correlation the joint Gaussian assumes for them.

    The given genes are measured, so this is checked on the slide itself without touching the genes predicted. On a
    new patient whose image features do not carry the training patient's gene patterns the weight falls toward 0 and
    the completion toward what the given genes alone say. `noise_variance` (N, G), the count noise of each measured
    value, removes the attenuation counting causes on a shallow slide (the correlation over the square root of the
    values' reliability), so a shallow slide's image is not distrusted for its depth alone. Never above 1.
    """
    g = joint.n_genes
    slide, expected = [], []
    for j in np.flatnonzero(mask.sum(0) >= MIN_TRANSFER_SPOTS):
        rows = mask[:, j]
        p, v = predicted[rows, j].astype(np.float64), values[rows, j].astype(np.float64)
        r = float(metrics.pearson_per_gene(p[:, None], v[:, None])[0])
        if not np.isfinite(r):
            continue
        if noise_variance is not None and v.var() > 0:
            reliability = 1.0 - float(noise_variance[rows, j].mean()) / float(v.var())
            r /= np.sqrt(np.clip(reliability, RELIABILITY_FLOOR, 1.0))
        slide.append(r)
        expected.append(float(joint.correlation[j, g + j]))
    if not slide:
        return ImageTransfer(1.0, float("nan"), float("nan"), 0)
    slide_r, expected_r = float(np.mean(slide)), float(np.mean(expected))
    weight = 1.0 if expected_r < TRUSTED else float(np.clip(slide_r / expected_r, 0.0, 1.0))
    return ImageTransfer(weight, slide_r, expected_r, len(slide))
