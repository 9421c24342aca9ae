"""Backbone pre-training: expressed genes favoured, diffusion masking mechanics, a loss that learns."""

import pytest
import torch

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.errors import HingeError
from hinge_cli.model import Backbone, pretrain_loss, select_genes


def test_select_genes_favours_expressed_genes():
    g = torch.Generator().manual_seed(0)
    expr = torch.zeros(50, 300)
    expr[:, :20] = torch.rand(50, 20) + 0.1  # 20 expressed genes per cell
    idx = select_genes(expr, 16, g, expressed_fraction=0.75)
    assert idx.shape == (50, 16)
    assert all(len(set(row)) == 16 for row in idx.tolist())
    assert torch.all((idx < 20).sum(1) >= 12)  # ceil(0.75 * 16) expressed genes at least
    idx = select_genes(expr, 40, g)
    assert torch.all((idx < 20).sum(1) == 20)  # all expressed genes when the quota allows
    with pytest.raises(HingeError):
        select_genes(expr, 301, g)


def test_select_genes_always_includes_the_panel():
    g = torch.Generator().manual_seed(1)
    expr = torch.zeros(30, 200)
    expr[:, 100:140] = torch.rand(30, 40) + 0.1  # expressed genes away from the panel
    panel = torch.tensor([3, 57, 181, 199])  # never expressed here, yet always in the sequence
    idx = select_genes(expr, 12, g, expressed_fraction=0.5, always=panel)
    assert all(set(panel.tolist()) <= set(row) for row in idx.tolist())
    assert torch.all(((idx >= 100) & (idx < 140)).sum(1) >= 4)  # ceil(0.5 * 8) of the free places expressed
    assert all(len(set(row)) == 12 for row in idx.tolist())


def test_pretraining_default_mask_range_reaches_every_gene_hidden():
    seen = []

    def recorder(ids, values, visible):
        seen.append(visible)
        return values

    pretrain_loss(recorder, torch.arange(1, 21).expand(2000, -1), torch.rand(2000, 20) + 1, DiffusionConfig(fill="zero"),
                  torch.Generator().manual_seed(0))
    hidden = (~seen[0]).sum(1)
    assert hidden.min() == 1 and hidden.max() == 20


def test_pretrain_hides_the_configured_fraction():
    seen = []

    def recorder(ids, values, visible):
        seen.append(visible)
        return values

    d = DiffusionConfig(fill="zero", pretrain_mask_min=0.2, pretrain_mask_max=0.5)
    x0 = torch.rand(200, 40) + 1
    loss = pretrain_loss(recorder, torch.arange(1, 41).expand(200, -1), x0, d, torch.Generator().manual_seed(0))
    hidden = (~seen[0]).sum(1)
    assert hidden.min() >= 8 and hidden.max() <= 20 and hidden.float().std() > 1
    m = (~seen[0]).float()  # the recorder predicts the zero fill, so the loss is the hidden genes' mean square
    assert loss.item() == pytest.approx((((x0**2) * m).sum(1) / m.sum(1)).mean().item())


def test_pretraining_reduces_the_loss():
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    bb = Backbone(cfg, 33)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(1, 32) * 4
    data = (base + 0.1 * torch.randn(32, 32)).clamp_min(0)
    ids = torch.arange(1, 33).expand(32, -1)
    opt = torch.optim.Adam(bb.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = pretrain_loss(bb, ids, data, DiffusionConfig(), g)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4


def test_a_stored_pretraining_is_reused_only_for_its_panel_transform_and_corpus():
    from hinge_cli.data.expression import Transform
    from hinge_cli.model.card import BackboneSource, ModelCard
    from hinge_cli.stages.train import stale_pretraining

    card = ModelCard("pretrain", vocab=["a", "b", "c"], transform=Transform("none"),
                     backbone=BackboneSource("corpus", corpus=["/x/1.h5ad", "/x/2.h5ad"]))
    corpus = ["/x/2.h5ad", "/x/1.h5ad"]
    assert stale_pretraining(card, ["a", "c"], Transform("none"), corpus) is None
    assert stale_pretraining(card, ["a", "z"], Transform("none"), corpus) == "lacks panel genes"
    assert stale_pretraining(card, ["a"], Transform("total"), corpus) == "was trained with --normalize none, not total"
    assert stale_pretraining(card, ["a"], Transform("none"), ["/x/1.h5ad"]) == "was trained on another corpus"
