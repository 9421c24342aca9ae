"""Trainable policies: frozen backbone stays bit-identical, LoRA starts at zero, full trains all."""

import dataclasses

import pytest
import torch

from hinge_cli.config import load_config
from hinge_cli.errors import HingeError
from hinge_cli.model import Hinge, count_parameters
from hinge_cli.model.lora import LoRALinear


def build(policy):
    cfg = dataclasses.replace(load_config("tiny").model, trainable=policy, lora_rank=2)
    torch.manual_seed(0)
    return Hinge.build(cfg, 30, torch.arange(1, 11), 4)


def one_step(model):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(torch.rand(8, 10, generator=g) * 3, torch.randn(8, 4, generator=g), g).backward()
    opt.step()


def frozen_weights(model):
    return {k: v.detach().clone() for k, v in model.backbone.named_parameters() if "lora_" not in k}


def test_frozen_backbone_is_bit_identical_after_a_step():
    model = build("frozen")
    before = frozen_weights(model)
    cond_before = model.layer_mods[0].proj.weight.detach().clone()
    one_step(model)
    after = frozen_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(cond_before, model.layer_mods[0].proj.weight)  # the adapter did train


def test_lora_trains_only_adapters_and_starts_at_zero():
    model = build("lora")
    adapters = [m for m in model.backbone.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 8 * model.cfg.n_layers  # q k v u o + ffn u v o per layer
    reference = build("frozen")
    values, visible = torch.rand(3, 10), torch.rand(3, 10) < 0.5
    t, image = torch.tensor([1, 5, 9]), torch.randn(3, 4)
    torch.testing.assert_close(model(values, visible, t, image), reference(values, visible, t, image))
    before = frozen_weights(model)
    b_before = adapters[0].lora_b.detach().clone()
    one_step(model)
    after = frozen_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(b_before, adapters[0].lora_b)


def test_full_policy_trains_the_backbone():
    model = build("full")
    before = frozen_weights(model)
    one_step(model)
    assert not torch.equal(before["layers.0.attn.q_proj.weight"], model.backbone.layers[0].attn.q_proj.weight)


def test_parameter_counts_order_the_policies():
    frozen, lora, full = (count_parameters(build(p)) for p in ("frozen", "lora", "full"))
    assert frozen < lora < full
    assert full == count_parameters(build("full"), trainable_only=False)


def test_unknown_policy_is_a_user_error():
    with pytest.raises(HingeError):
        build("partial")
