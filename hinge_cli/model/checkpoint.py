"""One model file format: safetensors weights plus a model card (JSON) that says how to rebuild them.

Loading never unpickles anything: the card is JSON, the weights are safetensors, and the
card's sha256 must match the weights file. The card's layout is owned by formats/model_card.py.

Files that belong together (weights and card; in training also `best` and the resume state)
land as one unit: they are staged in a hidden folder beside their final place, a commit list
is written last, and only then are they renamed into place. A kill before the commit leaves
the old unit; a kill after it is completed by the next reader or writer (`finish_pending`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hinge_cli import __version__
from hinge_cli.core.files import atomic_path, reading, sha256_file, write_text_atomic
from hinge_cli.errors import HingeError
from hinge_cli.formats.genes import panel_sha256
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.card import FORMAT, Architecture, ModelCard, read_card, rewrite_fix, write_card
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


COMMIT = "COMMIT"


def finish_pending(folder: Path) -> None:
    """Move the files of committed units into place (a writer was killed half-way through its renames)."""
    for staging in sorted(Path(folder).glob(".*.pending-*")):
        commit = staging / COMMIT
        if not commit.is_file():
            continue  # being written now, or abandoned: only the unit's own writer may discard it
        for name in json.loads(commit.read_text()):
            with contextlib.suppress(FileNotFoundError):  # moved already, by us before a kill or by another reader
                os.replace(staging / name, Path(folder) / name)
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def checkpoint_unit(folder: Path, unit: str) -> Iterator[Callable[[str], Path]]:
    """Yield `stage(name)`, the path to write file `name` at; on success every staged file replaces its old version at once.

    Call only while holding the lock of the stage that owns `unit` (earlier stagings of it are discarded).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    finish_pending(folder)
    for abandoned in folder.glob(f".{unit}.pending-*"):
        shutil.rmtree(abandoned, ignore_errors=True)
    staging = folder / f".{unit}.pending-{time.time_ns()}-{os.getpid()}"
    staging.mkdir()
    try:
        yield lambda name: staging / name
        write_text_atomic(staging / COMMIT, json.dumps(sorted(p.name for p in staging.iterdir())))
    except Exception:  # a kill leaves the staging behind: the unit's next writer discards it
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finish_pending(folder)


def save_checkpoint(path: Path | str, net: Hinge | Backbone, card: ModelCard) -> ModelCard:
    """Write weights and card as one unit; return the card as written, its architecture and hash filled in."""
    path = Path(path)
    with checkpoint_unit(path.parent, path.stem) as stage:
        return write_checkpoint(stage(path.name), net, card)


def write_checkpoint(path: Path, net: Hinge | Backbone, card: ModelCard) -> ModelCard:
    """Write weights then card at `path` (inside a `checkpoint_unit`, which makes the pair atomic)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    card = dataclasses.replace(card, kind="hinge" if isinstance(net, Hinge) else "backbone", architecture=architecture(net),
                               weights=path.name, sha256=sha256_file(path), hinge_version=__version__, format=FORMAT,
                               panel_sha256=panel_sha256(card.genes) if card.genes else None)
    write_card(sidecar_path(path), card)
    return card


def require_card_fits(path: Path, card: ModelCard, net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse a card whose architecture (or panel) disagrees with the weights beside it, naming the first tensor that
    differs, before loading: an edited or mismatched card would otherwise end in a state-dict traceback."""
    ids = card.architecture.gene_ids
    if card.genes is not None and ids is not None and len(card.genes) != len(ids):
        raise HingeError(f"checkpoint {path}: its card lists {len(card.genes)} genes but its architecture {len(ids)}",
                         f"use the card written with these weights; {rewrite_fix(path)}")
    expected = net.state_dict()
    for name, tensor in state.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise HingeError(f"checkpoint {path}: its card and its weights disagree: {name} is {tuple(tensor.shape)} in the "
                             f"weights but {tuple(expected[name].shape)} by the card's architecture",
                             f"use the card written with these weights; {rewrite_fix(path)}")


def read_checkpoint_card(path: Path | str) -> ModelCard:
    """The card of the checkpoint at `path` (weights not read)."""
    return read_card(sidecar_path(path))


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu", verify: bool = True) -> Checkpoint:
    """Rebuild the network (HINGE or bare backbone) the card describes and load its weights."""
    path = Path(path)
    if path.parent.is_dir():
        finish_pending(path.parent)
    if not path.is_file():
        raise HingeError(f"checkpoint {path} does not exist", "check the path (or run the stage that writes it)")
    card = read_checkpoint_card(path)
    if verify and sha256_file(path) != card.sha256:
        raise HingeError(f"checkpoint {path} does not match the sha256 in its sidecar: it is damaged, or was not copied with it",
                         f"{rewrite_fix(path)}; copy the .safetensors and its .json together")
    arch = card.architecture
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        backbone = Backbone(arch.backbone, arch.vocab_size)
        net: nn.Module = backbone
        if card.kind == "hinge":
            net = Hinge(backbone, arch.gene_ids, arch.image_dim, arch.model, arch.diffusion)
    with reading(path, rewrite_fix(path)):
        state = load_file(str(path), device=str(device))
    require_card_fits(path, card, net, state)
    missing, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise HingeError(f"checkpoint {path} does not fit its own config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "re-create the checkpoint")
    return Checkpoint(net.to(device), card)
