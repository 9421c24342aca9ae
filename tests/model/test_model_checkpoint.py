"""Our checkpoint format: safetensors + JSON sidecar, rebuilt without unpickling anything."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.data.expression import Transform
from hinge_cli.errors import HingeError
from hinge_cli.model import Backbone, Hinge, load_checkpoint, save_checkpoint, sidecar_path
from hinge_cli.model.card import ModelCard, TrainingRecord, read_card


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
    card = save_checkpoint(path, model, ModelCard("train", genes=["A", "B", "C", "D"], encoders=["uni"], transform=Transform(),
                                                  training=TrainingRecord(epochs=3)))
    side = read_card(sidecar_path(path))
    assert side == card and side.kind == "hinge" and side.genes == ["A", "B", "C", "D"]
    arch = side.architecture
    assert arch.gene_ids == [3, 7, 9, 11] and arch.image_dim == 5 and arch.diffusion.fill == "zero"
    checkpoint = load_checkpoint(path)
    again = checkpoint.net
    assert isinstance(again, Hinge) and again.cfg == model.cfg and again.diffusion == model.diffusion
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(model.parameters(), again.parameters(), strict=True))
    values, visible = torch.rand(2, 4), torch.tensor([[True, False, True, False]] * 2)
    t, image = torch.tensor([2, 5]), torch.randn(2, 5)
    torch.testing.assert_close(again(values, visible, t, image), model(values, visible, t, image), rtol=0, atol=0)


def test_backbone_round_trip(tmp_path):
    torch.manual_seed(1)
    bb = Backbone(load_config("tiny").model, 17)
    save_checkpoint(tmp_path / "pretrain.safetensors", bb, ModelCard("pretrain", vocab=[f"G{i}" for i in range(16)]))
    checkpoint = load_checkpoint(tmp_path / "pretrain.safetensors")
    assert isinstance(checkpoint.net, Backbone) and checkpoint.card.vocab[0] == "G0"
    assert all(torch.equal(a, b) for a, b in zip(bb.state_dict().values(), checkpoint.net.state_dict().values(), strict=True))


def test_tampered_or_incomplete_checkpoints_are_user_errors(tmp_path):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, hinge_model(), ModelCard("train"))
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


@pytest.mark.parametrize(("edit", "says"), [
    (lambda card: card["architecture"].__setitem__("image_dim", 6), r"card and its weights disagree: \S+ is \(\S+ 5\) in the weights"),
    (lambda card: card.__setitem__("genes", ["A", "B", "C"]), "lists 3 genes but its architecture 4"),
    (lambda card: [card["architecture"][part].__setitem__("d_model", 2 * card["architecture"][part]["d_model"])
                   for part in ("backbone", "model")], "card and its weights disagree"),  # a backbone twice as wide
])
def test_a_card_that_disagrees_with_its_weights_is_one_line_naming_the_tensor(tmp_path, edit, says):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, hinge_model(), ModelCard("train", genes=["A", "B", "C", "D"], transform=Transform()))
    card = json.loads(sidecar_path(path).read_text())
    edit(card)
    sidecar_path(path).write_text(json.dumps(card))
    with pytest.raises(HingeError, match=says):
        load_checkpoint(path)


def test_a_version_1_sidecar_still_loads(tmp_path):
    """Checkpoints written before the model card kept the stage's facts in an untyped `extra` dict."""
    model = hinge_model()
    path = tmp_path / "best.safetensors"
    card = save_checkpoint(path, model, ModelCard("train"))
    old_config = {**load_config("tiny").to_dict(), "train": {"epochs": 9, "warmup_epochs": 3}}
    del old_config["warmup"], old_config["generate"]
    legacy = {
        "format": "hinge-model/1", "kind": "hinge", "model": dataclasses.asdict(model.cfg),
        "backbone_model": dataclasses.asdict(model.backbone.cfg), "vocab_size": model.backbone.vocab_size,
        "genes": ["A", "B", "C", "D"], "vocab": None, "encoder": ["default"], "transform": Transform("total").to_dict(),
        "extra": {
            "stage": "train", "backbone_source": "random", "backbone": "random", "samples": ["s0", "s1"], "holdout": ["s2"],
            "split": {"val_samples": [], "val_fraction": 0.2, "seed": 4}, "feature_norm": {"mean": [0.5] * 5, "std": [2.0] * 5},
            "encoder_key": "default", "config": old_config, "warmup_mask_ratio": 0.2, "fill_missing": True,
            "tile": {"target_mpp": 0.5, "patch_px": 64, "mpp_source": 0.25, "spot_um": 55.0, "pitch_um": 100.0, "grid": "hex"},
            "embed": {"encoder": "default", "views": 8, "views_kept": True, "weights_sha256": "[null]"},
            "n_train_spots": 40, "n_val_spots": 10, "history": [{"epoch": 1, "val_loss": 0.5}], "epoch": 1, "best_epoch": 1,
            "best_val": 0.5,
        },
        "hinge_version": "0.1.0", "weights": path.name, "sha256": card.sha256, "diffusion": dataclasses.asdict(model.diffusion),
        "gene_ids": [3, 7, 9, 11], "image_dim": 5,
    }
    sidecar_path(path).write_text(json.dumps(legacy))
    checkpoint = load_checkpoint(path)
    old = checkpoint.card
    assert isinstance(checkpoint.net, Hinge) and old.stage == "train" and old.genes == ["A", "B", "C", "D"]
    assert old.transform == Transform("total") and old.encoders == ["default"] and old.encoder_key == "default"
    assert (old.split.val_fraction, old.split.seed, old.fill_missing, old.holdout) == (0.2, 4, True, ["s2"])
    np.testing.assert_array_equal(old.feature_norm.std, np.full(5, 2.0, np.float32))
    assert not old.per_slide  # standardised by its training spots alone, as every model was before slide standardisation
    assert old.tiling.mpp_source == 0.25 and old.tiling.grid == "hex"
    assert old.embedding.views == 8 and old.embedding.views_kept and old.embedding.weights_sha256 == [None]
    assert old.config.train.epochs == 9 and old.config.warmup.epochs == 3  # the old key moved to its section
    assert (old.training.n_train_spots, old.training.best_val, old.training.epochs) == (40, 0.5, 1)
    assert old.backbone.kind == "random" and old.architecture.gene_ids == [3, 7, 9, 11]
