"""`hinge calibrate`: fit the spread scale and gene coupling of a finished run again, with no retraining."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hinge_cli.config import HingeConfig
from hinge_cli.errors import HingeError, command
from hinge_cli.model.checkpoint import read_checkpoint_card
from hinge_cli.predict.trained import require_panel
from hinge_cli.run.directory import Run
from hinge_cli.run.lineage import require_unchanged_since_warmup
from hinge_cli.training.data import SplitData, TrainingData, card_table
from hinge_cli.training.refit import calibrate_and_couple, couple_on_all


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
        raise HingeError(f"{best} does not exist", f"run `{command('train')}` first")
    require_panel(run, [selected, best])
    refit = selected.exists()
    selected = selected if refit else best
    card = read_checkpoint_card(selected)
    if card.split is None or card.feature_norm is None:
        raise HingeError(f"{selected} records no training split", "train it again with this version of hinge")
    require_unchanged_since_warmup(run, card.samples, card.encoder_key)
    table = card_table(run, card)
    data = SplitData.of(table, card.split, card.feature_norm)
    calibration, deflation = calibrate_and_couple(cfg, data, selected)
    if not refit:
        return [best]
    couple_on_all(TrainingData.of(table, data.norm), best, cfg.generate.seed, deflation, calibration)
    return [selected, best]
