"""Gene-gene coupling of the predictive Gaussian: one correlation matrix of standardised residuals.

What the network leaves unexplained in a spot is correlated across genes (a spot richer in one
immune gene than its image suggests is richer in the others). Measured once on the training
spots' residuals, each divided by its predicted spread, that correlation makes one draw show the
truth's co-expression, and conditions the spread of genes when others are given (panel
completion), whose mean comes from the joint Gaussian of truth and prediction
(`hinge_cli.model.joint`). On HER2ST the network's own attention to visible genes moved the
other genes' depth-partial Pearson by 0.02; conditioning by 0.24 (docs/her2st_completion.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from hinge_cli import metrics
from hinge_cli.data.expression import less_noise

if TYPE_CHECKING:
    from hinge_cli.model.joint import JointGaussian

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
    conditional mean (`hinge_cli.model.joint`); their spread and draws are still conditioned
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
