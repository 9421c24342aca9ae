"""The fits `hinge train` and `hinge calibrate` make after training, recorded in a model's card.

The spread scale: trained on its own sections, a model's spread describes its errors on slides it has seen; on a new
section they are larger. One number per gene, the factor that makes point ± std cover 68.3% of the validation
section's truth, widens the spread at generation time. It is fitted on exactly what `generate` computes
(`hinge_cli.predict.predictive`), with its settings. The gene coupling: the correlation of the training spots'
standardised residuals, and the joint Gaussian of truth and prediction that completion conditions
(`hinge_cli.predict.coupling`).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from hinge_cli.config import GenerateConfig
from hinge_cli.data.expression import PLAIN, POISSON, Transform
from hinge_cli.model.card import GeneCorrelation, SpreadCalibration, ValidationSplit
from hinge_cli.model.checkpoint import Checkpoint
from hinge_cli.model.hinge import Hinge
from hinge_cli.model.sampler import sampling_steps
from hinge_cli.predict.coupling import SHRINKAGE, choose_joint, fit_correlation, optimism_factor
from hinge_cli.predict.predictive import BATCH, one_shot_predictions, predictive, sampler_of

log = logging.getLogger(__name__)

NOMINAL_1STD = 0.683  # a Gaussian's mass within one standard deviation
SCALE_RANGE = (0.05, 50.0)
SCALE_STEPS = 481  # scales tried with count noise: 1.5% apart over SCALE_RANGE


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


def spread_calibration(checkpoint: Checkpoint, image: Tensor, truth: np.ndarray, cfg: GenerateConfig,
                       split: ValidationSplit | None, depth: np.ndarray | None = None) -> SpreadCalibration:
    """The spread scale of `checkpoint` fitted on the validation spots, for its card; with the spots' `depth` and a model
    of normalised expression, through the observation model (count noise at each spot's depth)."""
    net = checkpoint.net
    transform = checkpoint.card.transform
    observed = depth is not None and transform is not None and transform.rates
    scale, raw, calibrated = fit_spread_scale(net, image, truth, cfg, (transform, np.asarray(depth, dtype=np.float64)) if observed else None)
    samples = list(split.val_samples) if split is not None else []
    calibration = SpreadCalibration([round(float(v), 5) for v in scale], samples, len(truth), cfg.n_samples,
                                    sampling_steps(cfg.steps, net.diffusion.steps), cfg.temperature, cfg.point, raw, calibrated,
                                    sampler_of(net, cfg), POISSON if observed else PLAIN)
    log.info("spread calibrated on %s: point ± std%s covered %.1f%% of %d spots, %.1f%% after a per-gene scale (median %.2f)",
             ", ".join(samples) or "random spots of the training slides", " (with each spot's count noise)" if observed else "",
             100 * raw, len(truth), 100 * calibrated, float(np.median(scale)))
    if not samples:
        log.warning("the spread was calibrated on spots of the training slides, so it will be too narrow on new slides; "
                    "train on 3 or more samples (or pass --val-samples) to calibrate on a held-out section")
    return calibration


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


def checkpoint_coupling(checkpoint: Checkpoint, name: str, image: Tensor, truth: np.ndarray, seed: int, samples: list[str],
                        spot_samples: np.ndarray, deflation: float = 1.0, depth: np.ndarray | None = None) -> GeneCorrelation | None:
    """The gene coupling of `checkpoint` (`name` in the log) measured on the spots it trained on, for its card (None for a mean-only network);
    with the spots' `depth` and a model of normalised expression, without their count noise (the observation model)."""
    if not checkpoint.net.has_spread:
        return None
    transform = checkpoint.card.transform
    counting = (transform, np.asarray(depth, dtype=np.float64)) if depth is not None and transform is not None and transform.rates else None
    coupling = replace(fit_coupling(checkpoint.net, image, truth, seed, spot_samples, deflation, counting), samples=list(samples))
    correlation = np.asarray(coupling.correlation)
    off = np.abs(correlation[~np.eye(len(correlation), dtype=bool)])
    log.info("genes coupled by the correlation of %d training spots' residuals (%s): median |r| %.2f, largest %.2f; "
             "given genes predict the others with shrinkage %.2g (cross-validated), the image's predictions trusted x%.2f "
             "(held-out / training fit)", len(truth), name, float(np.median(off)) if len(off) else 0.0,
             float(off.max()) if len(off) else 0.0, coupling.joint_shrinkage, coupling.joint_deflation)
    return coupling
