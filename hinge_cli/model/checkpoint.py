"""One model file format: safetensors weights plus a JSON sidecar that says how to rebuild them.

Loading never unpickles anything: the sidecar is JSON, the weights are safetensors, and the
sidecar's sha256 must match the weights file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hinge_cli import __version__
from hinge_cli.config import DiffusionConfig, ModelConfig
from hinge_cli.errors import HingeError
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.hinge import Hinge
from hinge_cli.files import atomic_path, sha256_file, write_text_atomic

FORMAT = "hinge-model/1"


def sidecar_path(path: Path | str) -> Path:
    """`checkpoints/last.safetensors` -> `checkpoints/last.json`."""
    return Path(path).with_suffix(".json")


@dataclass
class Loaded:
    model: Hinge | Backbone
    meta: dict[str, Any]


def save_checkpoint(
    path: Path | str,
    model: Hinge | Backbone,
    *,
    genes: Sequence[str] | None = None,
    vocab: Sequence[str] | None = None,
    encoder: Sequence[str] | None = None,
    transform: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write weights then sidecar (each atomically); return the sidecar.

    genes: the panel symbols (HINGE models); vocab: the backbone's gene symbols, id i+1 for
    entry i; encoder: patch-encoder keys; transform: the expression transform; extra: metrics etc.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    backbone = model.backbone if isinstance(model, Hinge) else model
    meta: dict[str, Any] = {
        "format": FORMAT,
        "kind": "hinge" if isinstance(model, Hinge) else "backbone",
        "model": dataclasses.asdict(model.cfg),
        "backbone_model": dataclasses.asdict(backbone.cfg),
        "vocab_size": backbone.vocab_size,
        "genes": list(genes) if genes is not None else None,
        "vocab": list(vocab) if vocab is not None else None,
        "encoder": list(encoder) if encoder is not None else None,
        "transform": transform,
        "extra": extra or {},
        "hinge_version": __version__,
        "weights": path.name,
        "sha256": sha256_file(path),
    }
    if isinstance(model, Hinge):
        meta |= {"diffusion": dataclasses.asdict(model.diffusion), "gene_ids": model.gene_ids.tolist(),
                 "image_dim": model.image_dim}
    write_text_atomic(sidecar_path(path), json.dumps(meta, indent=1))
    return meta


def _config(cls: type, data: dict[str, Any], where: Path) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HingeError(f"checkpoint sidecar {where} has unknown {cls.__name__} keys {unknown}",
                         "upgrade hinge to the version that wrote it")
    return cls(**data)


def read_sidecar(path: Path | str) -> dict[str, Any]:
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except FileNotFoundError:
        raise HingeError(f"checkpoint {path} has no sidecar {side.name}", "keep the .json next to the weights") from None
    except json.JSONDecodeError:
        raise HingeError(f"checkpoint sidecar {side} is not valid JSON", "re-create the checkpoint") from None
    if meta.get("format") != FORMAT:
        raise HingeError(f"{side} is not a {FORMAT} sidecar (format {meta.get('format')!r})", "re-create the checkpoint")
    return meta


def load_checkpoint(path: Path | str, device: str | torch.device = "cpu", verify: bool = True) -> Loaded:
    """Rebuild the model (HINGE or bare backbone) the sidecar describes and load its weights."""
    path = Path(path)
    if not path.is_file():
        raise HingeError(f"checkpoint {path} does not exist", "check the path (or run the stage that writes it)")
    meta = read_sidecar(path)
    if verify and sha256_file(path) != meta["sha256"]:
        raise HingeError(f"checkpoint {path} does not match the sha256 in its sidecar", "re-copy both files together")
    with torch.device("meta"):  # no random init of weights that are about to be replaced
        backbone = Backbone(_config(ModelConfig, meta["backbone_model"], path), meta["vocab_size"])
        model: nn.Module = backbone
        if meta["kind"] == "hinge":
            cfg = _config(ModelConfig, meta["model"], path)
            diffusion = _config(DiffusionConfig, meta["diffusion"], path)
            model = Hinge(backbone, meta["gene_ids"], meta["image_dim"], cfg, diffusion)
    try:
        state = load_file(str(path), device=str(device))
    except SafetensorError as exc:
        raise HingeError(f"checkpoint {path} is not a readable safetensors file ({exc})", "re-create it") from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise HingeError(f"checkpoint {path} does not fit its own config (missing {missing[:3]}, unexpected {unexpected[:3]})",
                         "re-create the checkpoint")
    return Loaded(model.to(device), meta)
