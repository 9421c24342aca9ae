"""One model file format: safetensors weights plus a model card (JSON) that says how to rebuild them.

Loading never unpickles anything: the card is JSON, the weights are safetensors, and the
card's sha256 must match the weights file. The card's layout is owned by formats/model_card.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hinge_cli import __version__
from hinge_cli.errors import HingeError
from hinge_cli.files import atomic_path, sha256_file
from hinge_cli.formats.model_card import FORMAT, Architecture, ModelCard, read_card, write_card
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.hinge import Hinge


def sidecar_path(path: Path | str) -> Path:
    """`checkpoints/last.safetensors` -> `checkpoints/last.json` (its model card)."""
    return Path(path).with_suffix(".json")


@dataclass
class Checkpoint:
    """A checkpoint read back: the network rebuilt with its weights, and its model card."""

    net: Hinge | Backbone
    card: ModelCard


def architecture(net: Hinge | Backbone) -> Architecture:
    if isinstance(net, Hinge):
        return Architecture(net.cfg, net.backbone.cfg, net.backbone.vocab_size, net.diffusion, net.gene_ids.tolist(),
                            net.image_dim)
    return Architecture(net.cfg, net.cfg, net.vocab_size)


def save_checkpoint(path: Path | str, net: Hinge | Backbone, card: ModelCard) -> ModelCard:
    """Write weights then card (each atomically); return the card as written, its architecture and hash filled in."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    card = dataclasses.replace(card, kind="hinge" if isinstance(net, Hinge) else "backbone", architecture=architecture(net),
                               weights=path.name, sha256=sha256_file(path), hinge_version=__version__, format=FORMAT)
    write_card(sidecar_path(path), card)
    return card


def read_checkpoint_card(path: Path | str) -> ModelCard:
    """The card of the checkpoint at `path` (weights not read)."""
    return read_card(sidecar_path(path))


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Rebuild the network (HINGE or bare backbone) the card describes and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise HingeError(f"checkpoint {path} does not exist", "check the path (or run the stage that writes it)")
    card = read_checkpoint_card(path)
    if verify and sha256_file(path) != card.sha256:
        raise HingeError(f"checkpoint {path} does not match the sha256 in its sidecar", "re-copy both files together")
    arch = card.architecture
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        backbone = Backbone(arch.backbone, arch.vocab_size)
        net: nn.Module = backbone
        if card.kind == "hinge":
            net = Hinge(backbone, arch.gene_ids, arch.image_dim, arch.model, arch.diffusion)
    try:
        state = load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise HingeError(f"checkpoint {path} is not a readable safetensors file ({exc})", "re-create it") from None
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise HingeError(f"checkpoint {path} does not fit its own config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "re-create the checkpoint")
    return Checkpoint(net.to(device), card)
