"""What `hinge train` does after its loop: the stored ridge, the spread calibration, and the refit.

Holding a section out to choose the epoch costs the model that section's spots, and which
sections a model trains on moves its expression level on a new one (HER2ST, fold C2: ridge
fitted on C3-C5 predicts C2 0.85 log2 units too low, on C3-C6 0.14 too high). So once
validation has chosen the epoch count, the model is fitted again from the warm-up on every
training spot, the held-out section included, for that many epochs; its direct path restarts
at the ridge fit on all of them (`train.refit`). The validated model stays as
`checkpoints/selected.*`; the refit becomes `best`. The spread scale is fitted on the
validated model's predictions of the held-out section (the refit has no held-out data left)
and carried over to the refit, whose card records both loops.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hinge_cli.config import HingeConfig
from hinge_cli.data.dataset import SpotTable
from hinge_cli.distributed import Dist
from hinge_cli.fit import LoopSettings, fit
from hinge_cli.losses import hinge_losses
from hinge_cli.model.calibration import calibrate_checkpoint
from hinge_cli.model.checkpoint import checkpoint_unit, load_checkpoint, read_checkpoint_card, write_checkpoint
from hinge_cli.model.ridge import fit_run_ridge, start_direct_path_at_ridge
from hinge_cli.progress import SILENT, Progress
from hinge_cli.run import Run
from hinge_cli.train_data import SplitData, TrainingData

log = logging.getLogger(__name__)


def finish_training(run: Run, cfg: HingeConfig, table: SpotTable, data: SplitData, selected: Path, best: Path,
                    epochs: int, dist: Dist, device: torch.device, progress: Progress = SILENT) -> None:
    """Store the ridge baseline, calibrate the spread of the `selected` model, and with a refit write `best`.

    Without a refit `selected` is `best`. The ridge is fitted on the spots the final model trained on.
    """
    refit = selected != best
    card = read_checkpoint_card(selected)
    rows = np.arange(len(table.targets)) if refit else data.train_rows
    if dist.main:
        fit_run_ridge(run, card, table.subset(rows))
        calibrate_checkpoint(selected, data.val.features[:, 0], data.val.targets.numpy(), cfg.generate, card.split)
    if refit:
        refit_on_all(run, cfg, table, data, selected, best, epochs, dist, device, progress)


def refit_on_all(run: Run, cfg: HingeConfig, table: SpotTable, data: SplitData, selected: Path, best: Path, epochs: int,
                 dist: Dist, device: torch.device, progress: Progress = SILENT) -> None:
    """Train from the warm-up on every training spot for `epochs` epochs and write it as `best` with `selected`'s card."""
    warm = load_checkpoint(run.checkpoint("warmup"))
    net = warm.net.to(device)
    chosen = read_checkpoint_card(selected)
    everything = SplitData(TrainingData.of(table, data.norm), data.val, data.norm, data.split, np.arange(len(table.targets)))
    direct_init = (warm.card.config or cfg).model.direct_init
    if net.direct is not None and direct_init == "ridge":
        start_direct_path_at_ridge(net.direct, table, data.norm, list(chosen.genes), str(chosen.encoder_key), data.split.seed)
    log.info("refitting on all %d training spots (validation spots included) for the %d epochs validation chose",
             len(table.targets), epochs)
    tc = cfg.train
    batch_loss, validate = hinge_losses(net, everything, dist, data.split.seed, None, device)
    settings = LoopSettings(stage="refit", epochs=epochs, batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay,
                            grad_clip=tc.grad_clip, seed=data.split.seed, schedule=tc.schedule)
    state = fit(net, len(table.targets), batch_loss, validate, settings, dist=dist, device=device, progress=progress)
    if dist.main:
        with checkpoint_unit(best.parent, "best") as stage:
            write_checkpoint(stage(best.name), net, replace(chosen, refit=everything.record(state)))
