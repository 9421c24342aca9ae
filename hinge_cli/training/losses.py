"""The training stages' batch losses and validation figures, built over their data.

`hinge train` and its refit share `hinge_losses`; backbone pre-training has its own
masked-value loss over corpus profiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hinge_cli.config import HingeConfig
from hinge_cli.core.distributed import Dist
from hinge_cli.data.corpus import Corpus
from hinge_cli.model import Hinge
from hinge_cli.model.diffusion import diffusion_loss
from hinge_cli.model.pretrain import pretrain_loss, select_genes
from hinge_cli.training.data import SplitData
from hinge_cli.training.fit import BatchLoss, Validate
from hinge_cli.training.selection import generated_depth_partial

EVAL_BATCH = 256
# Validation draws timesteps and masks from a generator of its own, seeded once per run: every epoch is scored on
# the same corruptions, so the numbers compare across epochs. The offsets (the 1000th and 10000th primes; arbitrary
# but fixed: changing them changes every recorded validation loss) keep it apart from the training draws' seed.
HINGE_VALIDATION_SEED_OFFSET = 7919
PRETRAIN_VALIDATION_SEED_OFFSET = 104729


def hinge_losses(net: Hinge, data: SplitData, dist: Dist, seed: int, max_hidden_fraction: float | None,
                 device: torch.device, generated: bool = False) -> tuple[BatchLoss, Validate]:
    """Batch loss (a random stored view per spot; this rank's share of the global draws) and validation.

    Validation always reports the teacher-forced loss; with `generated` also the generated prediction's
    depth-partial Pearson (`val_depth_partial`), the figure training selects on.
    """
    diffusion, train, val = net.diffusion, data.train, data.val

    def batch_loss(wrapped: nn.Module, rows: Tensor, generator: torch.Generator) -> Tensor:
        view = torch.randint(train.features.shape[1], (len(rows),), generator=generator)
        x0, image = train.targets[rows].to(device), train.features[rows, view].to(device)
        return diffusion_loss(wrapped, x0, image, net.schedule, diffusion, generator, max_hidden_fraction,
                              rows=dist.rows(len(rows)))

    def validate(unwrapped: nn.Module) -> dict[str, float]:
        generator = torch.Generator().manual_seed(seed + HINGE_VALIDATION_SEED_OFFSET)
        total, n = 0.0, len(val.targets)
        for start in range(0, n, EVAL_BATCH):
            x0 = val.targets[start : start + EVAL_BATCH].to(device)
            image = val.features[start : start + EVAL_BATCH, 0].to(device)
            loss = diffusion_loss(unwrapped, x0, image, net.schedule, diffusion, generator)
            total += float(loss) * len(x0)
        figures = {"val_loss": total / n}
        if generated:
            figures["val_depth_partial"] = generated_depth_partial(unwrapped, val, seed + HINGE_VALIDATION_SEED_OFFSET)
        return figures

    return batch_loss, validate


def pretrain_losses(corpus: Corpus, train_rows: np.ndarray, val_rows: np.ndarray, cfg: HingeConfig, dist: Dist,
                    device: torch.device, panel: Sequence[str] = ()) -> tuple[BatchLoss, Validate]:
    """Masked-value loss on gene subsets of corpus profiles: the panel's genes plus others (expressed ones favoured)."""
    length = min(cfg.pretrain.seq_len, len(corpus.vocab))
    diffusion = cfg.diffusion
    column = {g: j for j, g in enumerate(corpus.vocab)}
    always = torch.tensor([column[g] for g in panel if g in column], dtype=torch.long)

    def draw(rows: np.ndarray, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        dense = torch.from_numpy(corpus.dense(rows))
        cols = select_genes(dense, length, generator, diffusion.pretrain_expressed_fraction, always)
        return (cols + 1).to(device), dense.gather(1, cols).to(device)

    def batch_loss(wrapped: nn.Module, rows: Tensor, generator: torch.Generator) -> Tensor:
        ids, values = draw(train_rows[rows.numpy()], generator)
        return pretrain_loss(wrapped, ids, values, diffusion, generator, rows=dist.rows(len(rows)))

    def validate(unwrapped: nn.Module) -> dict[str, float]:
        generator = torch.Generator().manual_seed(cfg.train.seed + PRETRAIN_VALIDATION_SEED_OFFSET)
        total = 0.0
        for start in range(0, len(val_rows), EVAL_BATCH):
            ids, values = draw(val_rows[start : start + EVAL_BATCH], generator)
            total += float(pretrain_loss(unwrapped, ids, values, diffusion, generator)) * len(ids)
        return {"val_loss": total / len(val_rows)}

    return batch_loss, validate
