"""Where tensors run (`--device auto|cpu|cuda[:N]`) and what that device needs: mixed precision, memory layout, peak memory.

Every "is this a GPU?" question of the package is asked through `is_cuda`, and every CUDA-only call lives
in this module or right beside an `is_cuda` test, so the CPU test suite can answer yes and run each
branch (tests/test_cuda_branches.py lists them and fails on a new one that has no test).
"""

from __future__ import annotations

import logging
import os
import resource

import torch

from hinge_cli.errors import HingeError, setting

log = logging.getLogger(__name__)
_warned_no_bf16: set[int] = set()


def is_cuda(device: torch.device) -> bool:
    """The one place that asks whether a device is a GPU."""
    return device.type == "cuda"


def local_rank() -> int:
    """This process's GPU under torchrun (LOCAL_RANK), 0 elsewhere."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is a GPU when there is one, else the CPU; `cuda` without an index is this process's GPU (LOCAL_RANK
    under torchrun, so each rank gets its own); `cuda:N` must name a GPU that exists."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HingeError(f"unknown device '{name}'", "use auto, cpu or cuda (cuda:N for a given GPU)") from None
    if device.type not in ("cpu", "cuda"):
        raise HingeError(f"device '{name}' is not supported", "use auto, cpu or cuda")
    if device.type != "cuda":  # the name, not `is_cuda`: a test that fakes a GPU still resolves its CPU
        return device
    if not torch.cuda.is_available():
        raise HingeError(f"{setting('device')} cuda was asked for but no CUDA GPU is visible", f"use {setting('device')} cpu, or check CUDA_VISIBLE_DEVICES")
    index = local_rank() if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        gpus = ", ".join(f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(count))
        raise HingeError(f"{setting('device')} {name}: there is no GPU {index}; this machine shows {count}: {gpus}",
                         "choose one of those, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast on a GPU that supports it; a disabled autocast anywhere else, so callers need no branch.

    A GPU without bf16 (before Ampere) runs in fp32, with one warning per GPU: fp16 would need loss scaling
    in training and can overflow in the large encoders, and fp32 gives the same numbers, only slower.
    """
    if not (enabled and is_cuda(device)):
        return torch.autocast("cpu", enabled=False)
    if not torch.cuda.is_bf16_supported():
        index = device.index or 0
        if index not in _warned_no_bf16:
            _warned_no_bf16.add(index)
            log.warning("GPU %d (%s) has no bf16: running in fp32, the same results but slower", index, torch.cuda.get_device_name(index))
        return torch.autocast("cuda", enabled=False)
    return torch.autocast("cuda", dtype=torch.bfloat16)


def images_layout(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Image batches (and convolution weights) channels-last on a GPU, where convolutions run fastest so."""
    return x.contiguous(memory_format=torch.channels_last) if is_cuda(device) else x


def place_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """An image network in eval mode on `device`, channels-last on a GPU."""
    module.eval().to(device)
    return module.to(memory_format=torch.channels_last) if is_cuda(device) else module


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated GPU memory on a GPU, the process's max RSS on the CPU."""
    if is_cuda(device):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
