"""Backbone pre-training on expression-only data with the diffusion's own masking mechanics.

A sequence is the panel's genes (when one is given) plus a random subset of the rest of one
cell's (or spot's) genes, expressed genes favoured, so the vocabulary can be far larger than
any panel while the panel genes always meet each other: fine-tuning predicts them from each
other. A random fraction of the sequence, from one gene up to all of it (the state generation
starts from), is hidden exactly as in the diffusion (random order, fill, mask embedding, key
dropping) and every hidden gene is scored, as fine-tuning's loss does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hinge_cli.config import DiffusionConfig
from hinge_cli.errors import HingeError
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.diffusion import draw_noise, fill_hidden, masked_mse, random_ranks


def select_genes(
    expr: Tensor,
    length: int,
    generator: torch.Generator | None = None,
    expressed_fraction: float = 0.75,
    always: Tensor | None = None,
) -> Tensor:
    """Column indices (N, length) into `expr` (N, V): the `always` columns first (as many as fit), then up to
    `expressed_fraction` of the remaining places from expressed genes, the rest random."""
    n, v = expr.shape
    if not 1 <= length <= v:
        raise HingeError(f"pre-training sequences of {length} genes need at least that many genes (have {v})",
                         "lower the sequence length or use a corpus with more genes")
    u = torch.rand((n, v), generator=generator, device=generator.device if generator else expr.device).to(expr.device)
    fixed = torch.zeros(v, dtype=torch.bool, device=expr.device)
    if always is not None and len(always):
        fixed[always.to(expr.device)] = True
    n_fixed = min(int(fixed.sum()), length)
    free = length - n_fixed
    expressed = (expr > 0) & ~fixed
    quota = torch.clamp(expressed.sum(1), max=math.ceil(expressed_fraction * free))
    order_in_expressed = torch.where(expressed, u, u - 2).argsort(1, descending=True).argsort(1)
    chosen = expressed & (order_in_expressed < quota[:, None])
    return torch.where(fixed, u + 4, torch.where(chosen, u + 2, u)).topk(length, dim=1).indices


def pretrain_loss(
    backbone: Backbone | nn.Module,
    gene_ids: Tensor,
    x0: Tensor,
    diffusion: DiffusionConfig | None = None,
    generator: torch.Generator | None = None,
    rows: slice | None = None,
) -> Tensor:
    """Hide U(min, max) of each sequence (at least one gene) and score the prediction of the hidden values.

    Draws cover the whole batch; `rows` scores only that share (data-parallel ranks).
    """
    d = diffusion or DiffusionConfig()
    if not 0 <= d.pretrain_mask_min <= d.pretrain_mask_max <= 1:
        raise HingeError(f"pre-training mask range [{d.pretrain_mask_min}, {d.pretrain_mask_max}] is not within [0, 1]",
                         "fix diffusion.pretrain_mask_min/max")
    b, length = x0.shape
    draw_on = generator.device if generator else x0.device
    frac = torch.empty(b, device=draw_on).uniform_(d.pretrain_mask_min, d.pretrain_mask_max, generator=generator)
    n_hidden = (frac * length).round().clamp(1, length).long().to(x0.device)
    hidden = random_ranks(x0, generator) < n_hidden[:, None]
    values = fill_hidden(x0, hidden, draw_noise(x0, d.fill, d.noise_std, generator))
    r = rows if rows is not None else slice(None)
    return masked_mse(backbone(gene_ids[r], values[r], ~hidden[r]), x0[r], hidden[r])
