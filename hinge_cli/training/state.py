"""The resume state, `checkpoints/last.state.safetensors` + `.json`: what `hinge train` needs besides the weights.

Optimiser tensors go to safetensors; the optimiser's param groups and scalars and the loop's
counters and history go to the JSON beside it. Nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from hinge_cli.core.files import atomic_path, reading, write_text_atomic
from hinge_cli.model.card import rewrite_fix
from hinge_cli.training.fit import LoopState


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser state into tensors (for safetensors) and JSON (param groups, scalars)."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    scalars = {f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if not torch.is_tensor(v)}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_train_state(path: Path, opt: torch.optim.Optimizer, state: LoopState) -> None:
    tensors, meta = optimizer_tensors(opt)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_text_atomic(path.with_suffix(".json"), json.dumps({"optimizer": meta, "loop": state.to_dict()}))


def read_train_state(path: Path) -> tuple[dict[str, Any], LoopState]:
    """The optimiser's state dict and the loop state, as written by `write_train_state`."""
    with reading(path.with_suffix(".json"), rewrite_fix(path)):
        meta = json.loads(path.with_suffix(".json").read_text())
        loop = LoopState.from_dict(meta["loop"])
    with reading(path, rewrite_fix(path)):
        return optimizer_state(load_file(str(path)), meta["optimizer"]), loop
