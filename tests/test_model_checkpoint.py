"""Our checkpoint format: safetensors + JSON sidecar, rebuilt without unpickling anything."""

import dataclasses
import json

import pytest
import torch

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.errors import HingeError
from hinge_cli.model import Backbone, Hinge, load_checkpoint, save_checkpoint, sidecar_path


def hinge_model():
    cfg = dataclasses.replace(load_config("tiny").model, trainable="lora", lora_rank=2)
    torch.manual_seed(0)
    model = Hinge.build(cfg, 30, [3, 7, 9, 11], 5, DiffusionConfig(steps=8, fill="zero"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init, so a silent re-init would show
    return model


def test_hinge_round_trip(tmp_path):
    model = hinge_model()
    path = tmp_path / "last.safetensors"
    meta = save_checkpoint(path, model, genes=["A", "B", "C", "D"], encoder=["uni"], transform="log2p1",
                           extra={"epoch": 3})
    side = json.loads(sidecar_path(path).read_text())
    assert side == meta and side["kind"] == "hinge" and side["genes"] == ["A", "B", "C", "D"]
    assert side["gene_ids"] == [3, 7, 9, 11] and side["image_dim"] == 5 and side["diffusion"]["fill"] == "zero"
    loaded = load_checkpoint(path)
    again = loaded.model
    assert isinstance(again, Hinge) and again.cfg == model.cfg and again.diffusion == model.diffusion
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), again.parameters()))
    values, visible = torch.rand(2, 4), torch.tensor([[True, False, True, False]] * 2)
    t, image = torch.tensor([2, 5]), torch.randn(2, 5)
    torch.testing.assert_close(again(values, visible, t, image), model(values, visible, t, image), rtol=0, atol=0)


def test_backbone_round_trip(tmp_path):
    torch.manual_seed(1)
    bb = Backbone(load_config("tiny").model, 17)
    save_checkpoint(tmp_path / "pretrain.safetensors", bb, vocab=[f"G{i}" for i in range(16)])
    loaded = load_checkpoint(tmp_path / "pretrain.safetensors")
    assert isinstance(loaded.model, Backbone) and loaded.meta["vocab"][0] == "G0"
    assert all(torch.equal(a, b) for a, b in zip(bb.state_dict().values(), loaded.model.state_dict().values()))


def test_tampered_or_incomplete_checkpoints_are_user_errors(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, hinge_model())
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(HingeError, match="sha256"):
        load_checkpoint(path)
    sidecar_path(path).unlink()
    with pytest.raises(HingeError, match="sidecar"):
        load_checkpoint(path)
    with pytest.raises(HingeError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")
