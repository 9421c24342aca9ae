"""Training spots: the validation split and the standardised tensors the training loop reads."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from hinge_cli.data.dataset import SpotTable, assemble
from hinge_cli.data.features import FeatureNorm, views
from hinge_cli.errors import HingeError, setting
from hinge_cli.model.card import ModelCard, TrainingRecord, ValidationSplit
from hinge_cli.run.directory import Run
from hinge_cli.training.fit import LoopState


def split_rows(split: ValidationSplit, table: SpotTable) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation rows: whole samples, or a seeded random fraction of spots (views stay together)."""
    if split.val_samples:
        is_val = np.isin(table.sample, split.val_samples)
    else:
        keys = np.array([f"{s}\t{b}" for s, b in zip(table.sample, table.barcodes, strict=True)])
        order = np.argsort(keys, kind="stable")
        shuffled = order[np.random.default_rng(split.seed).permutation(len(order))]
        is_val = np.zeros(len(table), bool)
        is_val[shuffled[: max(1, round(split.val_fraction * len(table)))]] = True
    if is_val.all() or not is_val.any():
        raise HingeError("the validation split leaves no training or no validation spots",
                         f"give a {setting('val-fraction')} between 0 and 1, or {setting('val-samples')} that are not all of them")
    return np.nonzero(~is_val)[0], np.nonzero(is_val)[0]


def card_table(run: Run, card: ModelCard) -> SpotTable:
    """The training table a model card was made from: its samples, panel, transform and feature standardisation."""
    return assemble(run, card.encoder_key, card.samples, card.genes, card.transform, card.fill_missing, per_slide=card.per_slide)


@dataclass
class TrainingData:
    """What the loop needs: standardised features (N, V, D) and targets (N, G) as tensors; each spot's sample and depth."""

    features: Tensor
    targets: Tensor
    sample: np.ndarray
    depth: np.ndarray

    @classmethod
    def of(cls, table: SpotTable, norm: FeatureNorm) -> TrainingData:
        return cls(torch.from_numpy(norm(views(table.features))), torch.from_numpy(table.targets), table.sample, table.depth)


@dataclass
class SplitData:
    """The training table split into training and validation spots, standardised by `norm`."""

    train: TrainingData
    val: TrainingData
    norm: FeatureNorm
    split: ValidationSplit
    train_rows: np.ndarray  # the training spots' rows of the table it was split from

    @classmethod
    def of(cls, table: SpotTable, split: ValidationSplit, norm: FeatureNorm | None = None, per_slide: bool = False) -> SplitData:
        """Split `table`; without `norm`, fit it on the training spots (`per_slide`: the table's features are slide-standardised)."""
        train_rows, val_rows = split_rows(split, table)
        norm = norm or FeatureNorm.fit(views(table.features[train_rows]), per_slide)
        return cls(TrainingData.of(table.subset(train_rows), norm), TrainingData.of(table.subset(val_rows), norm), norm, split,
                   train_rows)

    def record(self, state: LoopState) -> TrainingRecord:
        """What the model card says about a loop over this data."""
        return TrainingRecord(state.history, state.epoch, state.best_epoch, state.best_val, len(self.train.targets),
                              len(self.val.targets))
