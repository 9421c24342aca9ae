"""What `generate` predicts per spot (a point, draws and their spread), the per-gene spread scale and the coupling.

Two samplers. `coupled` (the default) reads each gene's mean and spread from one forward pass
with every gene hidden and draws the genes jointly from a Gaussian whose correlation was measured
on the training spots (`hinge_cli.model.coupling`), conditioned on any genes given. `reverse`
walks the reverse process and draws each gene at the step that reveals it.

Trained on its own sections, a model's spread describes its errors on slides it has seen; on a
new section they are larger. One number per gene, the factor that makes point ± std cover 68.3%
of the validation section's truth, widens the spread at generation time. It is fitted once after
training on exactly what `generate` computes, with its settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hinge_cli.config import GenerateConfig
from hinge_cli.data.expression import MODEL_SPACE_FLOOR, PLAIN, POISSON, Transform
from hinge_cli.formats.model_card import GeneCorrelation, SpreadCalibration, ValidationSplit, write_card
from hinge_cli.formats.prediction import PredictedBatch
from hinge_cli.model.checkpoint import load_checkpoint, sidecar_path
from hinge_cli.model.coupling import SHRINKAGE, GeneCoupling, fit_correlation
from hinge_cli.model.hinge import Hinge
from hinge_cli.model.joint import JointGaussian, choose_joint, optimism_factor
from hinge_cli.model.randomness import REVEAL_STREAM, normals
from hinge_cli.model.ridge import gaussian_batch
from hinge_cli.model.sampler import sampling_steps

log = logging.getLogger(__name__)

NOMINAL_1STD = 0.683  # a Gaussian's mass within one standard deviation
SCALE_RANGE = (0.05, 50.0)
SCALE_STEPS = 481  # scales tried with count noise: 1.5% apart over SCALE_RANGE
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


@torch.no_grad()
def fit_spread_scale(net: Hinge, image: Tensor, truth: np.ndarray, cfg: GenerateConfig,
                     counting: tuple[Transform, np.ndarray] | None = None) -> tuple[np.ndarray, float, float]:
    """Per-gene scale making |truth - point| <= sqrt((scale x std)² + noise) hold for 68.3% of the spots; coverage before
    and after. With `counting` (the units and each spot's depth), noise is the variance counting adds at the spot's depth
    to the predicted expression (the observation model), so the scaled spread is the model's uncertainty about the
    expression itself, not the validation sections' count noise; without, it is 0."""
    device = next(net.parameters()).device
    points, spreads = [], []
    for start in range(0, len(truth), BATCH):
        stop = min(len(truth), start + BATCH)
        written = predictive(net, image[start:stop].to(device), cfg, torch.arange(start, stop)).batch(keep_draws=False)
        points.append(written.mean)
        spreads.append(written.std)
    point = np.concatenate(points)
    error, spread = np.abs(truth - point), np.concatenate(spreads).astype(np.float64)
    if counting is not None:
        noise = counting[0].count_noise_variance(point, counting[1][:, None])

        def covered(scale: np.ndarray | float) -> np.ndarray:
            return error <= np.sqrt((spread * scale) ** 2 + noise)

        grid = np.geomspace(*SCALE_RANGE, SCALE_STEPS)
        reached = np.array([covered(s).mean(0) >= NOMINAL_1STD for s in grid])  # (steps, G), monotone in the scale
        scale = np.where(reached.any(0), grid[np.argmax(reached, axis=0)], SCALE_RANGE[1])
        return scale, float(np.mean(covered(1.0))), float(np.mean(covered(scale)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(spread > 0, error / spread, np.where(error > 0, np.inf, 0.0))
    scale = np.clip(np.quantile(ratio, NOMINAL_1STD, axis=0, method="higher"), *SCALE_RANGE)
    return scale, float(np.mean(error <= spread)), float(np.mean(error <= spread * scale))


def calibrate_checkpoint(path: Path, image: Tensor, truth: np.ndarray, cfg: GenerateConfig,
                         split: ValidationSplit | None, depth: np.ndarray | None = None) -> SpreadCalibration:
    """Fit the spread scale of the checkpoint at `path` on the validation spots and record it in its card; with the spots'
    `depth` and a model of normalised expression, through the observation model (count noise at each spot's depth)."""
    checkpoint = load_checkpoint(path)
    net = checkpoint.net
    transform = checkpoint.card.transform
    observed = depth is not None and transform is not None and transform.rates
    scale, raw, calibrated = fit_spread_scale(net, image, truth, cfg, (transform, np.asarray(depth, dtype=np.float64)) if observed else None)
    samples = list(split.val_samples) if split is not None else []
    calibration = SpreadCalibration([round(float(v), 5) for v in scale], samples, len(truth), cfg.n_samples,
                                    sampling_steps(cfg.steps, net.diffusion.steps), cfg.temperature, cfg.point, raw, calibrated,
                                    sampler_of(net, cfg), POISSON if observed else PLAIN)
    write_card(sidecar_path(path), replace(checkpoint.card, calibration=calibration))
    log.info("spread calibrated on %s: point ± std%s covered %.1f%% of %d spots, %.1f%% after a per-gene scale (median %.2f)",
             ", ".join(samples) or "random spots of the training slides", " (with each spot's count noise)" if observed else "",
             100 * raw, len(truth), 100 * calibrated, float(np.median(scale)))
    if not samples:
        log.warning("the spread was calibrated on spots of the training slides, so it will be too narrow on new slides; "
                    "train on 3 or more samples (or pass --val-samples) to calibrate on a held-out section")
    return calibration


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


def measure_optimism(net: Hinge, fitted: tuple[Tensor, np.ndarray], held_out: tuple[Tensor, np.ndarray], seed: int) -> float:
    """`optimism_factor` of `net`: its one-shot means on the spots it trained on against held-out ones
    (1 for a mean-only network, which has no one-shot pass and no joint Gaussian to deflate)."""
    if not net.has_spread:
        return 1.0
    predicted = [one_shot_predictions(net, image, len(truth), seed)[0] for image, truth in (fitted, held_out)]
    return optimism_factor((predicted[0], fitted[1]), (predicted[1], held_out[1]))


def fit_coupling(net: Hinge, image: Tensor, truth: np.ndarray, seed: int, spot_samples: np.ndarray,
                 deflation: float = 1.0, counting: tuple[Transform, np.ndarray] | None = None) -> GeneCorrelation:
    """The correlation of the spots' one-shot residuals, each over its predicted std, and the joint Gaussian of truth
    and prediction, deflated by `deflation` (`samples` and `n_spots` left for the caller). With `counting` (the units
    and each spot's depth) the count noise of the spots' own depth is taken out of the residuals' correlation (the
    observation model), so it couples the draws of the expression, which eval counts again at the measured depth."""
    mean, std = one_shot_predictions(net, image, len(truth), seed)
    noise = None if counting is None else counting[0].count_noise_variance(mean, counting[1][:, None]) / std.astype(np.float64) ** 2
    correlation = np.round(fit_correlation((truth - mean) / std, SHRINKAGE, noise), 5)  # the shrinkage dwarfs the rounding
    joint = choose_joint(truth, mean, spot_samples, seed).deflated(deflation)
    return GeneCorrelation(correlation.tolist(), [], len(truth), SHRINKAGE, np.round(joint.mean, 5).tolist(),
                           np.round(joint.std, 5).tolist(), np.round(joint.correlation, 5).tolist(), joint.shrinkage,
                           round(deflation, 5), POISSON if counting is not None else PLAIN)


def gene_coupling(card: GeneCorrelation) -> GeneCoupling:
    """The sampler's coupling from its card entry (without a joint Gaussian, given genes condition the residuals)."""
    joint = None
    if card.joint_correlation:
        joint = JointGaussian(np.asarray(card.joint_mean), np.asarray(card.joint_std), np.asarray(card.joint_correlation),
                              float(card.joint_shrinkage or 0.0))
    return GeneCoupling(np.asarray(card.correlation), joint)


def couple_checkpoint(path: Path, image: Tensor, truth: np.ndarray, seed: int, samples: list[str],
                      spot_samples: np.ndarray, deflation: float = 1.0, depth: np.ndarray | None = None) -> GeneCorrelation | None:
    """Measure the gene coupling of the checkpoint at `path` on the spots it trained on and record it in its card; with
    the spots' `depth` and a model of normalised expression, without their count noise (the observation model)."""
    checkpoint = load_checkpoint(path)
    if not checkpoint.net.has_spread:
        return None
    transform = checkpoint.card.transform
    counting = (transform, np.asarray(depth, dtype=np.float64)) if depth is not None and transform is not None and transform.rates else None
    coupling = replace(fit_coupling(checkpoint.net, image, truth, seed, spot_samples, deflation, counting), samples=list(samples))
    write_card(sidecar_path(path), replace(checkpoint.card, coupling=coupling))
    correlation = np.asarray(coupling.correlation)
    off = np.abs(correlation[~np.eye(len(correlation), dtype=bool)])
    log.info("genes coupled by the correlation of %d training spots' residuals (%s): median |r| %.2f, largest %.2f; "
             "given genes predict the others with shrinkage %.2g (cross-validated), the image's predictions trusted x%.2f "
             "(held-out / training fit)", len(truth), path.stem, float(np.median(off)) if len(off) else 0.0,
             float(off.max()) if len(off) else 0.0, coupling.joint_shrinkage, coupling.joint_deflation)
    return coupling
