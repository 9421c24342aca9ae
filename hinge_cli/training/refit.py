"""What `hinge train` does after its loop: the stored ridge, the spread calibration, the refit and the gene coupling.

Holding a section out to choose the epoch costs the model that section's spots, and which
sections a model trains on moves its expression level on a new one (HER2ST, fold C2: ridge
fitted on C3-C5 predicts C2 0.85 log2 units too low, on C3-C6 0.14 too high). So once
validation has chosen the epoch count, the model is fitted again from the warm-up on every
training spot, the held-out section included, for that many epochs; its direct path restarts
at the ridge fit on all of them (`train.refit`). The validated model stays as
`checkpoints/selected.*`; the refit becomes `best`. The spread scale is fitted on the
validated model's predictions of the held-out section (the refit has no held-out data left)
and carried over to the refit, whose card records both loops. Each model's gene coupling is then
measured on the spots it trained on (`hinge_cli.predict.coupling`); its joint Gaussian trusts the
image's predictions only as much as the validated model's held-out fit did against its training
fit (`model.joint.optimism_factor`), carried over like the spread scale. `hinge calibrate`
(`hinge_cli.stages.calibrate`) does the calibration and coupling again for a finished run, with no retraining.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hinge_cli.config import HingeConfig
from hinge_cli.core.distributed import Dist
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.dataset import SpotTable
from hinge_cli.model.card import SpreadCalibration, TrainingRecord, write_card
from hinge_cli.model.checkpoint import checkpoint_unit, load_checkpoint, read_checkpoint_card, sidecar_path, write_checkpoint
from hinge_cli.predict.ridge import fit_run_ridge, start_direct_path_at_ridge
from hinge_cli.run.directory import Run
from hinge_cli.training.calibration import checkpoint_coupling, measure_optimism, spread_calibration
from hinge_cli.training.data import SplitData, TrainingData
from hinge_cli.training.fit import LoopSettings, fit
from hinge_cli.training.losses import hinge_losses

log = logging.getLogger(__name__)


def finish_training(run: Run, cfg: HingeConfig, table: SpotTable, data: SplitData, selected: Path, best: Path,
                    epochs: int, dist: Dist, device: torch.device, progress: Progress = SILENT) -> None:
    """Store the ridge baseline, calibrate the spread of the `selected` model, and with a refit write `best`.

    Without a refit `selected` is `best`. The ridge is fitted on the spots the final model trained on.
    """
    refit = selected != best
    card = read_checkpoint_card(selected)
    rows = np.arange(len(table.targets)) if refit else data.train_rows
    deflation = 1.0
    if dist.main:
        fit_run_ridge(run, card, table.subset(rows))
        deflation = calibrate_and_couple(cfg, data, selected)[1]
    if refit:
        everything = TrainingData.of(table, data.norm)
        refit_on_all(run, cfg, table, data, everything, selected, best, epochs, dist, device, progress)
        if dist.main:
            couple_on_all(everything, best, cfg.generate.seed, deflation)


def calibrate_and_couple(cfg: HingeConfig, data: SplitData, selected: Path) -> tuple[SpreadCalibration, float]:
    """The validated model's spread scale (on the validation spots) and gene coupling (on its training spots), its joint
    Gaussian deflated by how much worse it predicts the validation spots, written to its card at once; returns the
    scale and that factor for the refit."""
    checkpoint = load_checkpoint(selected)
    card, seed = checkpoint.card, cfg.generate.seed
    fitted, held_out = ((d.features[:, 0], d.targets.numpy()) for d in (data.train, data.val))
    calibration = spread_calibration(checkpoint, *held_out, cfg.generate, card.split, data.val.depth)
    deflation = measure_optimism(checkpoint.net, fitted, held_out, seed)
    coupling = checkpoint_coupling(checkpoint, selected.stem, *fitted, seed, card.samples, data.train.sample, deflation,
                                   data.train.depth)
    write_card(sidecar_path(selected), replace(card, calibration=calibration, coupling=coupling or card.coupling))
    return calibration, deflation


def couple_on_all(everything: TrainingData, best: Path, seed: int, deflation: float,
                  calibration: SpreadCalibration | None = None) -> None:
    """The refit's gene coupling, on every training spot (the ones it trained on), deflated as the validated model's;
    with `calibration`, the validated model's spread scale is carried over in the same write."""
    checkpoint = load_checkpoint(best)
    card = checkpoint.card
    coupling = checkpoint_coupling(checkpoint, best.stem, everything.features[:, 0], everything.targets.numpy(), seed,
                                   card.samples, everything.sample, deflation, everything.depth)
    if coupling is not None or calibration is not None:
        write_card(sidecar_path(best), replace(card, calibration=calibration or card.calibration,
                                               coupling=coupling or card.coupling))


def refit_on_all(run: Run, cfg: HingeConfig, table: SpotTable, data: SplitData, everything: TrainingData, selected: Path,
                 best: Path, epochs: int, dist: Dist, device: torch.device, progress: Progress = SILENT) -> None:
    """Train from the warm-up on every training spot (`everything`, `table`'s rows standardised) for `epochs` epochs and
    write it as `best` with `selected`'s card."""
    warm = load_checkpoint(run.checkpoint("warmup"))
    net = warm.net.to(device)
    chosen = read_checkpoint_card(selected)
    split = SplitData(everything, data.val, data.norm, data.split, np.arange(len(table.targets)))
    direct_init = (warm.card.config or cfg).model.direct_init
    if net.direct is not None and direct_init == "ridge":
        start_direct_path_at_ridge(net.direct, table, data.norm, list(chosen.genes), str(chosen.encoder_key), data.split.seed)
    log.info("refitting on all %d training spots (validation spots included) for the %d epochs validation chose",
             len(table.targets), epochs)
    tc = cfg.train
    batch_loss, _ = hinge_losses(net, split, dist, data.split.seed, None, device)
    settings = LoopSettings(stage="refit", epochs=epochs, batch_size=tc.batch_size, lr=tc.lr, weight_decay=tc.weight_decay,
                            grad_clip=tc.grad_clip, seed=data.split.seed, schedule=tc.schedule)
    # nothing is held out of a refit: scoring the validation spots it now trains on would cost time and mean nothing
    state = fit(net, len(table.targets), batch_loss, None, settings, dist=dist, device=device, progress=progress)
    if dist.main:
        record = TrainingRecord(state.history, state.epoch, state.best_epoch, None, len(table.targets), 0)
        with checkpoint_unit(best.parent, "best") as stage:
            write_checkpoint(stage(best.name), net, replace(chosen, refit=record))
