"""Where tensors run: `--device auto|cpu|cuda[:N]`."""

from __future__ import annotations

import os

import torch

from hinge_cli.errors import HingeError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the GPU of this process (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HingeError(f"unknown device '{name}'", "use auto, cpu or cuda (cuda:N for a given GPU)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HingeError("--device cuda was asked for but no CUDA GPU is visible", "use --device cpu, or check CUDA_VISIBLE_DEVICES")
    if device.type not in ("cpu", "cuda"):
        raise HingeError(f"device '{name}' is not supported", "use auto, cpu or cuda")
    return device
