"""SoftAdaLN starts as the identity: the HINGE model reproduces its backbone at step 0."""

import dataclasses

import pytest
import torch

from hinge_cli.config import load_config
from hinge_cli.model import Hinge
from hinge_cli.model.conditioning import SoftAdaLN

G, VOCAB, IMG = 12, 40, 7


def build(**overrides):
    cfg = dataclasses.replace(load_config("tiny").model, **overrides)
    torch.manual_seed(0)
    return Hinge.build(cfg, VOCAB, torch.randperm(VOCAB - 1)[:G] + 1, IMG).double()


def inputs(b, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(b, G, generator=g, dtype=torch.float64) * 6
    visible = torch.rand(b, G, generator=g) < 0.5
    t = torch.randint(1, 21, (b,), generator=g)
    image = torch.randn(b, IMG, generator=g, dtype=torch.float64) * 10
    return values, visible, t, image


def bare(model, values, visible):
    return model.backbone(model.gene_ids.expand(values.shape[0], -1), values, visible)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identity_at_init_is_exact_in_float64(seed):
    # eta = sigmoid(-40) and gate = sigmoid(40) round to exactly 0 and 1 in float64, so any
    # remaining difference would come from the modulation plumbing itself.
    model = build(softnorm_logit_init=-40.0, gate_logit_init=40.0)
    values, visible, t, image = inputs(5, seed)
    expected = bare(model, values, visible)
    for scale in (0.0, 1.0, 100.0):
        got = model(values, visible, t, image * scale)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_default_init_is_the_backbone_up_to_eta():
    model = build()  # eta = sigmoid(-12) ~ 6e-6, gate = sigmoid(12) ~ 1 - 6e-6
    values, visible, t, image = inputs(5, 3)
    diff = (model(values, visible, t, image) - bare(model, values, visible)).abs().max()
    assert diff < 1e-3


def test_condition_steers_the_output_once_the_head_learns():
    model = build()
    values, visible, t, image = inputs(4, 4)
    with torch.no_grad():
        for mod in model.layer_mods:
            mod.proj.weight.normal_(0, 0.1)
    a = model(values, visible, t, image)
    b = model(values, visible, t, image + 1)
    assert (a - b).abs().max() > 1e-3


def test_softadaln_head_is_zero_with_gate_bias():
    mod = SoftAdaLN(8, 4, n_sites=2, gated=True, eta_logit=-12.0, gate_logit=12.0)
    (m1, m2) = mod(torch.randn(3, 4))
    assert torch.equal(m1.shift, torch.zeros(3, 1, 8)) and torch.equal(m2.scale, torch.zeros(3, 1, 8))
    assert torch.allclose(m1.gate, torch.full((3, 1, 8), torch.sigmoid(torch.tensor(12.0)).item()))
    assert float(m1.eta.detach()) == pytest.approx(torch.sigmoid(torch.tensor(-12.0)).item())


def test_direct_path_is_zero_at_init_and_reaches_the_output_once_trained():
    model = build(softnorm_logit_init=-40.0, gate_logit_init=40.0)
    assert model.direct is not None  # the default model has the direct image path
    values, visible, t, image = inputs(5, 5)
    model.eval()
    torch.testing.assert_close(model.direct(image), torch.zeros(5, G, dtype=torch.float64), rtol=0, atol=0)
    with torch.no_grad():
        model.direct.mlp[-1].weight.normal_(0, 0.1)
        model.direct.linear.weight.normal_(0, 0.1)
    changed = model(values, visible, t, image) - bare(model, values, visible)
    torch.testing.assert_close(changed, model.direct(image))  # added to the backbone's output, per gene


def test_paper_faithful_model_has_no_direct_path():
    assert build(direct_path=False).direct is None
