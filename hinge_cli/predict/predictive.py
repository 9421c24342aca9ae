"""What `generate` predicts per spot: a point, draws and their spread, from the network, its spread scale and coupling.

Two samplers. `coupled` (the default) reads each gene's mean and spread from one forward pass
with every gene hidden and draws the genes jointly from a Gaussian whose correlation was measured
on the training spots (`hinge_cli.predict.coupling`), conditioned on any genes given. `reverse`
walks the reverse process and draws each gene at the step that reveals it.

The spread scale and the coupling are fitted after training (`hinge_cli.training.calibration`) on exactly what
this module computes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from hinge_cli.config import GenerateConfig
from hinge_cli.data.expression import MODEL_SPACE_FLOOR
from hinge_cli.formats.prediction import PredictedBatch
from hinge_cli.model.card import GeneCorrelation
from hinge_cli.model.hinge import Hinge
from hinge_cli.model.randomness import REVEAL_STREAM, normals
from hinge_cli.model.sampler import sampling_steps
from hinge_cli.predict.coupling import GeneCoupling, JointGaussian
from hinge_cli.predict.ridge import gaussian_batch

log = logging.getLogger(__name__)

BATCH = 256


@dataclass
class Predictive:
    """One batch's prediction: the point (X), the draws (B, S, G), their per-spot centre, and the genes given.

    `std` is the exact std of a Gaussian prediction (the coupled sampler): its layers are then the
    Gaussian's std and quantiles around `center` instead of the draws' empirical ones.
    """

    point: Tensor
    draws: Tensor
    center: Tensor  # the sampler's mean over draws (given genes exactly their value)
    given: Tensor | None = None  # (B, G) bool
    std: Tensor | None = None

    def batch(self, keep_draws: bool) -> PredictedBatch:
        """The file's layers: the point, and the spread's std and 5% and 95% quantiles (std exactly 0 for a given gene)."""
        draws = self.draws.float().cpu().numpy()
        if self.std is not None:
            gaussian = gaussian_batch(self.center.float().cpu().numpy(), self.std.float().cpu().numpy())
            q05, q95, std = gaussian.q05, gaussian.q95, gaussian.std.copy()
        else:
            q05, q95 = np.quantile(draws, (0.05, 0.95), axis=1).astype(np.float32)
            std = draws.std(1)
        if self.given is not None:
            std[self.given.cpu().numpy()] = 0
        return PredictedBatch(self.point.float().cpu().numpy(), std, q05, q95, draws if keep_draws else None)

    def censored(self, floor: float, point_from_draws: bool) -> Predictive:
        """Draws below the model space's floor moved to it (a Gaussian spread around a low mean puts draws where no
        expression lies: 3.5% of them on HER2ST, for ridge as for HINGE); a point that is the draws' mean follows."""
        draws = self.draws.clamp_min(floor)
        point = draws.mean(1) if point_from_draws else self.point
        if self.given is not None:
            point = torch.where(self.given.to(point.device, torch.bool), self.point, point)
        return replace(self, point=point, draws=draws)

    def widened(self, scale: Tensor) -> Predictive:
        """Draws stretched around their centre by a per-gene factor (G,); the centre does not move."""
        center = self.center[:, None]
        return replace(self, draws=center + (self.draws - center) * scale.to(self.draws))


def predictive(net: Hinge, image: Tensor, cfg: GenerateConfig, spot_index: Tensor, given: Tensor | None = None,
               given_values: Tensor | None = None, scale: Tensor | None = None,
               coupling: GeneCoupling | None = None) -> Predictive:
    """`cfg`'s sampler with its samples and temperature, the spread widened by the per-gene `scale`.

    `given` (B, G) marks genes measured per spot, held at `given_values`. A model without a spread
    (diffusion.likelihood: mse) always walks the reverse process.
    """
    if cfg.sampler == "coupled" and net.has_spread:
        pred = coupled_predictive(net, image, cfg, spot_index, given, given_values, scale, coupling)
    else:
        pred = reverse_predictive(net, image, cfg, spot_index, given, given_values)
        pred = pred if scale is None else pred.widened(scale)
    return pred.censored(MODEL_SPACE_FLOOR, cfg.point == "samples")


def coupled_predictive(net: Hinge, image: Tensor, cfg: GenerateConfig, spot_index: Tensor, given: Tensor | None,
                       given_values: Tensor | None, scale: Tensor | None, coupling: GeneCoupling | None) -> Predictive:
    """One forward pass, then `cfg.n_samples` joint draws from the coupled Gaussian (conditioned on the given genes).

    X is the Gaussian's mean (the one-shot mean, or the conditional mean when genes are given), or with
    `point: samples` the draws' mean; the temperature scales the spread after conditioning.
    """
    mean, log_var = net.one_shot(image, seed=cfg.seed, spot_index=spot_index)
    std = torch.exp(0.5 * log_var)
    std = std if scale is None else std * scale.to(std)
    b, g = mean.shape
    normal = torch.from_numpy(normals(cfg.seed, spot_index, cfg.n_samples, g, REVEAL_STREAM)).view(b, cfg.n_samples, g)
    coupled = (coupling or GeneCoupling.independent(g)).draw(mean, std, normal.to(mean.device), given, given_values)
    spread = coupled.std * cfg.temperature
    draws = coupled.mean[:, None] + spread[:, None] * coupled.noise
    point = draws.mean(1) if cfg.point == "samples" else coupled.mean
    if given is not None:
        point = torch.where(given.to(point.device, torch.bool), coupled.mean, point)
    return Predictive(point, draws, coupled.mean, given, spread)


def reverse_predictive(net: Hinge, image: Tensor, cfg: GenerateConfig, spot_index: Tensor, given: Tensor | None,
                       given_values: Tensor | None) -> Predictive:
    """The reverse process; X the one-shot mean (with given genes visible) or the samples' mean."""
    out = net.generate(image, n_samples=cfg.n_samples, steps=sampling_steps(cfg.steps, net.diffusion.steps), seed=cfg.seed,
                       spot_index=spot_index, keep_samples=True, temperature=cfg.temperature, given=given,
                       given_values=given_values)
    point = out.mean
    if cfg.point == "one-shot":
        point = net.generate(image, n_samples=1, steps=1, seed=cfg.seed, spot_index=spot_index, given=given,
                             given_values=given_values).mean
    return Predictive(point, out.samples, out.mean, given)


def sampler_of(net: Hinge, cfg: GenerateConfig) -> str:
    """The sampler `predictive` runs for `cfg` on this network."""
    return cfg.sampler if net.has_spread else "reverse"


@torch.no_grad()
def one_shot_predictions(net: Hinge, image: Tensor, n_spots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The one-shot mean and predicted std (N, G) of every spot, in batches."""
    device = next(net.parameters()).device
    means, stds = [], []
    for start in range(0, n_spots, BATCH):
        stop = min(n_spots, start + BATCH)
        mean, log_var = net.one_shot(image[start:stop].to(device), seed=seed, spot_index=torch.arange(start, stop))
        means.append(mean.float().cpu().numpy())
        stds.append(np.exp(0.5 * log_var.float().cpu().numpy()))
    return np.concatenate(means), np.concatenate(stds)


def gene_coupling(card: GeneCorrelation) -> GeneCoupling:
    """The sampler's coupling from its card entry (without a joint Gaussian, given genes condition the residuals)."""
    joint = None
    if card.joint_correlation:
        joint = JointGaussian(np.asarray(card.joint_mean), np.asarray(card.joint_std), np.asarray(card.joint_correlation),
                              float(card.joint_shrinkage or 0.0))
    return GeneCoupling(np.asarray(card.correlation), joint)
