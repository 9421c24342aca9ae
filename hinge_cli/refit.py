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
measured on the spots it trained on (`hinge_cli.model.coupling`); its joint Gaussian trusts the
image's predictions only as much as the validated model's held-out fit did against its training
fit (`model.joint.optimism_factor`), carried over like the spread scale. `recalibrate` does the
calibration and coupling again for a finished run (`hinge calibrate`), with no retraining.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hinge_cli.config import HingeConfig
from hinge_cli.data.dataset import SpotTable
from hinge_cli.distributed import Dist
from hinge_cli.errors import HingeError
from hinge_cli.fit import LoopSettings, fit
from hinge_cli.formats.model_card import TrainingRecord, write_card
from hinge_cli.lineage import require_panel, require_unchanged_since_warmup
from hinge_cli.losses import hinge_losses
from hinge_cli.model.calibration import calibrate_checkpoint, couple_checkpoint, measure_optimism
from hinge_cli.model.checkpoint import checkpoint_unit, load_checkpoint, read_checkpoint_card, sidecar_path, write_checkpoint
from hinge_cli.model.ridge import fit_run_ridge, start_direct_path_at_ridge
from hinge_cli.progress import SILENT, Progress
from hinge_cli.run import Run
from hinge_cli.train_data import SplitData, TrainingData, card_table

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
        deflation = calibrate_and_couple(cfg, data, selected)
    if refit:
        everything = TrainingData.of(table, data.norm)
        refit_on_all(run, cfg, table, data, everything, selected, best, epochs, dist, device, progress)
        if dist.main:
            couple_on_all(everything, best, cfg.generate.seed, deflation)


def calibrate_and_couple(cfg: HingeConfig, data: SplitData, selected: Path) -> float:
    """The validated model's spread scale (on the validation spots) and gene coupling (on its training spots), its joint
    Gaussian deflated by how much worse it predicts the validation spots; returns that factor for the refit."""
    card = read_checkpoint_card(selected)
    fitted, held_out = ((d.features[:, 0], d.targets.numpy()) for d in (data.train, data.val))
    calibrate_checkpoint(selected, *held_out, cfg.generate, card.split, data.val.depth)
    deflation = measure_optimism(load_checkpoint(selected).net, fitted, held_out, cfg.generate.seed)
    couple_checkpoint(selected, *fitted, cfg.generate.seed, card.samples, data.train.sample, deflation, data.train.depth)
    return deflation


def couple_on_all(everything: TrainingData, best: Path, seed: int, deflation: float) -> None:
    """The refit's gene coupling, on every training spot (the ones it trained on), deflated as the validated model's."""
    couple_checkpoint(best, everything.features[:, 0], everything.targets.numpy(), seed, read_checkpoint_card(best).samples,
                      everything.sample, deflation, everything.depth)


@dataclass
class Recalibrated:
    """What `hinge calibrate` updated."""

    models: list[Path]
    sampler: str

    def lines(self) -> list[str]:
        return [f"calibrate: spread scale ({self.sampler} sampler) and gene coupling fitted again for "
                + ", ".join(p.stem for p in self.models)]


def recalibrate(run: Run, cfg: HingeConfig) -> Recalibrated:
    """Fit the spread scale and gene coupling of a trained run again with `cfg.generate`'s settings; no retraining.

    For models trained before the coupled sampler, or after changing how generate samples.
    """
    with run.training_lock():
        return Recalibrated(_recalibrate(run, cfg), cfg.generate.sampler)


def _recalibrate(run: Run, cfg: HingeConfig) -> list[Path]:
    best, selected = run.checkpoint("best"), run.checkpoint("selected")
    if not best.exists():
        raise HingeError(f"{best} does not exist", "run `hinge train` first")
    require_panel(run, [selected, best])
    refit = selected.exists()
    selected = selected if refit else best
    card = read_checkpoint_card(selected)
    if card.split is None or card.feature_norm is None:
        raise HingeError(f"{selected} records no training split", "train it again with this version of hinge")
    require_unchanged_since_warmup(run, card.samples, card.encoder_key)
    table = card_table(run, card)
    data = SplitData.of(table, card.split, card.feature_norm)
    deflation = calibrate_and_couple(cfg, data, selected)
    if not refit:
        return [best]
    calibration = read_checkpoint_card(selected).calibration
    write_card(sidecar_path(best), replace(read_checkpoint_card(best), calibration=calibration))
    couple_on_all(TrainingData.of(table, data.norm), best, cfg.generate.seed, deflation)
    return [selected, best]


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
