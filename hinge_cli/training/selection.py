"""Which spots validate training, and the figure that picks the best epoch.

The teacher-forced loss on random spots of the training sections is optimistic and, on
HER2ST, ranked models backwards: it lets the network see true genes that at generation
time are its own guesses, on slides it trains on. So training is judged the way users
get its output: a short reverse process from every gene hidden, on whole held-out
training sections, scored by `hinge eval`'s headline (depth-partial Pearson).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from hinge_cli.eval import metrics
from hinge_cli.model.card import ValidationSplit
from hinge_cli.training.data import TrainingData

log = logging.getLogger(__name__)

MIN_VALIDATION_SECTIONS = 3  # with fewer training samples, one held out would starve training: random spots validate
VALIDATION_STEPS = 1  # the one-shot mean: it tracked the 10-step sampler within 0.005 depth-partial on HER2ST
VALIDATION_BATCH = 256


def choose_split(samples: Sequence[str], val_samples: Sequence[str], val_fraction: float, seed: int) -> ValidationSplit:
    """The user's validation samples; else one training section (seeded) when there are enough; else random spots."""
    if val_samples:
        return ValidationSplit(list(val_samples), val_fraction, seed)
    if len(samples) >= MIN_VALIDATION_SECTIONS:
        held = sorted(samples)[int(np.random.default_rng(seed).integers(len(samples)))]
        log.info("validating on the whole section %s (held out of training; pass --val-samples to choose)", held)
        return ValidationSplit([held], val_fraction, seed)
    log.warning("only %d training sample(s): validating on a random %.0f%% of their spots, which flatters the model "
                "(spots of a slide it trains on); %d or more samples validate on a held-out section",
                len(samples), 100 * val_fraction, MIN_VALIDATION_SECTIONS)
    return ValidationSplit([], val_fraction, seed)


@torch.no_grad()
def generated_depth_partial(net: nn.Module, val: TrainingData, seed: int, steps: int = VALIDATION_STEPS) -> float:
    """Mean over validation samples of the generated prediction's depth-partial Pearson (-1 where undefined)."""
    device = next(net.parameters()).device
    pred = np.concatenate([
        net.generate(val.features[start:start + VALIDATION_BATCH, 0].to(device), n_samples=1,
                     steps=min(steps, net.diffusion.steps), seed=seed,
                     spot_index=torch.arange(start, min(start + VALIDATION_BATCH, len(val.targets)))).mean.float().cpu().numpy()
        for start in range(0, len(val.targets), VALIDATION_BATCH)
    ])
    truth = val.targets.numpy()
    scores = [metrics.depth_partial_score(pred[rows], truth[rows], val.depth[rows])[0]
              for rows in (val.sample == name for name in np.unique(val.sample))]
    finite = [s for s in scores if np.isfinite(s)]
    return float(np.mean(finite)) if finite else -1.0
