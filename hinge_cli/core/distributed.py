"""Data parallelism under `torchrun`: who am I, and the few collectives training needs.

Every rank draws the same global batch and the same random masks, then works on its
own contiguous slice; DistributedDataParallel averages the gradients. So K processes
take the same optimisation steps as one process with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hinge_cli.core import devices


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: torch.device) -> Dist:
        """Join the process group that torchrun describes in the environment (if any)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not tdist.is_initialized():
            if devices.is_cuda(device):
                torch.cuda.set_device(device)  # NCCL's collectives run on the current GPU: this rank's own
            tdist.init_process_group("nccl" if devices.is_cuda(device) else "gloo")
        return cls(tdist.get_rank(), tdist.get_world_size(), devices.local_rank())

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """`net` under DistributedDataParallel when several processes train (on a GPU: this rank's), else `net`."""
        if not self.active:
            return net
        return DistributedDataParallel(net, device_ids=[device.index] if devices.is_cuda(device) else None)

    def rows(self, batch: int) -> slice:
        """This rank's contiguous share of a global batch of `batch` rows."""
        bounds = torch.linspace(0, batch, self.world + 1).round().long().tolist()
        return slice(bounds[self.rank], bounds[self.rank + 1])

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a per-rank scalar weighted by nothing (shares are equal up to rounding)."""
        if not self.active:
            return value
        value = value.detach().clone()
        tdist.all_reduce(value)
        return value / self.world

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()
