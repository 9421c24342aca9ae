"""What `generate` predicts per spot (a point, draws and their spread) and the per-gene spread scale.

Trained on its own sections, a model's spread describes its errors on slides it has seen; on a
new section they are larger. One number per gene, the factor that makes point ± std cover 68.3%
of the validation section's truth, widens every draw around its spot's mean at generation time.
It is fitted once after training on exactly what `generate` computes, with its settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hinge_cli.config import GenerateConfig
from hinge_cli.formats.model_card import SpreadCalibration, ValidationSplit, write_card
from hinge_cli.formats.prediction import PredictedBatch
from hinge_cli.model.checkpoint import load_checkpoint, sidecar_path
from hinge_cli.model.hinge import Hinge
from hinge_cli.model.sampler import sampling_steps

log = logging.getLogger(__name__)

NOMINAL_1STD = 0.683  # a Gaussian's mass within one standard deviation
SCALE_RANGE = (0.05, 50.0)
BATCH = 256


@dataclass
class Predictive:
    """One batch's prediction: the point (X), the draws (B, S, G), their per-spot centre, and the genes given."""

    point: Tensor
    draws: Tensor
    center: Tensor  # the sampler's mean over draws (given genes exactly their value)
    given: Tensor | None = None  # (B, G) bool

    def batch(self, keep_draws: bool) -> PredictedBatch:
        """The file's layers: the point, and the draws' std and 5% and 95% quantiles (std exactly 0 for a given gene)."""
        draws = self.draws.float().cpu().numpy()
        q05, q95 = np.quantile(draws, (0.05, 0.95), axis=1).astype(np.float32)
        std = draws.std(1)
        if self.given is not None:
            std[self.given.cpu().numpy()] = 0
        return PredictedBatch(self.point.float().cpu().numpy(), std, q05, q95, draws if keep_draws else None)

    def widened(self, scale: Tensor) -> Predictive:
        """Draws stretched around their centre by a per-gene factor (G,); the centre does not move."""
        center = self.center[:, None]
        return replace(self, draws=center + (self.draws - center) * scale.to(self.draws))


def predictive(net: Hinge, image: Tensor, cfg: GenerateConfig, spot_index: Tensor, given: Tensor | None = None,
               given_values: Tensor | None = None) -> Predictive:
    """The reverse process with `cfg`'s samples, steps and temperature; X the one-shot mean or the samples' mean.

    `given` (B, G) marks genes measured per spot, held at `given_values`: the one-shot mean is then the
    mean of the remaining genes with the given ones visible.
    """
    out = net.generate(image, n_samples=cfg.n_samples, steps=sampling_steps(cfg.steps, net.diffusion.steps), seed=cfg.seed,
                       spot_index=spot_index, keep_samples=True, temperature=cfg.temperature, given=given,
                       given_values=given_values)
    point = out.mean
    if cfg.point == "one-shot":
        point = net.generate(image, n_samples=1, steps=1, seed=cfg.seed, spot_index=spot_index, given=given,
                             given_values=given_values).mean
    return Predictive(point, out.samples, out.mean, given)


@torch.no_grad()
def fit_spread_scale(net: Hinge, image: Tensor, truth: np.ndarray, cfg: GenerateConfig) -> tuple[np.ndarray, float, float]:
    """Per-gene scale making |truth - point| <= scale x std hold for 68.3% of the spots; coverage before and after."""
    device = next(net.parameters()).device
    points, spreads = [], []
    for start in range(0, len(truth), BATCH):
        stop = min(len(truth), start + BATCH)
        written = predictive(net, image[start:stop].to(device), cfg, torch.arange(start, stop)).batch(keep_draws=False)
        points.append(written.mean)
        spreads.append(written.std)
    error, spread = np.abs(truth - np.concatenate(points)), np.concatenate(spreads)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(spread > 0, error / spread, np.where(error > 0, np.inf, 0.0))
    scale = np.clip(np.quantile(ratio, NOMINAL_1STD, axis=0, method="higher"), *SCALE_RANGE)
    return scale, float(np.mean(error <= spread)), float(np.mean(error <= spread * scale))


def calibrate_checkpoint(path: Path, image: Tensor, truth: np.ndarray, cfg: GenerateConfig,
                         split: ValidationSplit | None) -> SpreadCalibration:
    """Fit the spread scale of the checkpoint at `path` on the validation spots and record it in its card."""
    checkpoint = load_checkpoint(path)
    net = checkpoint.net
    scale, raw, calibrated = fit_spread_scale(net, image, truth, cfg)
    samples = list(split.val_samples) if split is not None else []
    calibration = SpreadCalibration([round(float(v), 5) for v in scale], samples, len(truth), cfg.n_samples,
                                    sampling_steps(cfg.steps, net.diffusion.steps), cfg.temperature, cfg.point, raw, calibrated)
    write_card(sidecar_path(path), replace(checkpoint.card, calibration=calibration))
    log.info("spread calibrated on %s: point ± std covered %.1f%% of %d spots, %.1f%% after a per-gene scale (median %.2f)",
             ", ".join(samples) or "random spots of the training slides", 100 * raw, len(truth), 100 * calibrated,
             float(np.median(scale)))
    if not samples:
        log.warning("the spread was calibrated on spots of the training slides, so it will be too narrow on new slides; "
                    "train on 3 or more samples (or pass --val-samples) to calibrate on a held-out section")
    return calibration
