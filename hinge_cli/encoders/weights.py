"""Finding and loading encoder weights offline, safely.

Pathology foundation models are gated on Hugging Face: users download them once
(or copy them onto a cluster) and point at the file, or leave them in a Hugging
Face cache. Nothing here touches the network, and nothing unpickles arbitrary
objects: safetensors, or `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from hinge_cli.errors import HingeError, setting

CACHE_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")


def hf_cache_dirs() -> list[Path]:
    """Hugging Face hub caches in the order huggingface_hub itself resolves them."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append(Path(xdg) / "huggingface" / "hub" if xdg else Path.home() / ".cache" / "huggingface" / "hub")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def find_in_hf_cache(repo: str, files: Iterable[str] = CACHE_FILES) -> Path | None:
    """A weights file of `repo` in a local hub cache: the `main` snapshot first, then any other."""
    for cache in hf_cache_dirs():
        root = cache / f"models--{repo.replace('/', '--')}"
        snapshots = root / "snapshots"
        if not snapshots.is_dir():
            continue
        ref = root / "refs" / "main"
        order = [snapshots / ref.read_text().strip()] if ref.is_file() else []
        order += sorted(p for p in snapshots.iterdir() if p not in order)
        for snap in order:
            for name in files:
                if (snap / name).is_file():
                    return snap / name
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .bin / .pth file, loaded without executing code."""
    path = Path(path)
    if not path.is_file():
        raise HingeError(f"weights file {path} does not exist", f"check the path given to {setting('weights')}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
            raise HingeError(f"{path} is not a readable safetensors file ({exc})", "re-download it") from None
    try:
        # mmap needs the zip format of torch >= 1.6; a legacy (non-zip) file is read whole, just as safely
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - refused pickles and corrupt zips alike
        raise HingeError(
            f"{path} could not be loaded safely ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})",
            "use the official .safetensors/.bin file, or re-save it as a plain state dict",
        ) from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise HingeError(f"{path} does not hold a state dict of tensors", "give the model's weights file")
    return data


def select_keys(state: dict[str, torch.Tensor], prefix: str = "", drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` (prefix removed), minus those starting with any of `drop`.

    A checkpoint of a whole model (CONCH: text tower too) is thus reduced to the
    part we rebuild; a file that holds only that part is used as is.
    """
    if prefix and any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    drop = tuple(drop)
    return {k: v for k, v in state.items() if not (drop and k.startswith(drop))}


def load_into(module: nn.Module, state: dict[str, torch.Tensor], name: str, source: Path) -> None:
    """`load_state_dict(strict=True)`, with a HingeError naming the first mismatches instead of a wall of text."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the architecture"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"the architecture needs {', '.join(missing[:3])}, which the file lacks")
        if unexpected:
            parts.append(f"the file has {', '.join(unexpected[:3])}, which the architecture lacks")
        if wrong:
            parts.append(", ".join(wrong[:3]))
        raise HingeError(
            f"{source} does not fit the {name} architecture ({'; '.join(parts)})",
            f"check that {setting('weights')} points at the {name} checkpoint, or choose the matching {setting('encoder')}",
        )
    module.load_state_dict(state, strict=True, assign=any(p.is_meta for p in module.parameters()))
