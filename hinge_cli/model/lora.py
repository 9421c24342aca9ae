"""What of the backbone trains: nothing (frozen), low-rank adapters (LoRA), or everything (full).

LoRA keeps each projection's `weight` under its original name, so a backbone checkpoint
loads into a LoRA model unchanged; the adapters add `lora_a`/`lora_b` next to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hinge_cli.errors import HingeError

POLICIES = ("frozen", "lora", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "u_proj", "o_proj")  # in attention and feed-forward


class LoRALinear(nn.Linear):
    """A frozen linear map plus a trainable rank-r update B A, zero at initialisation (B = 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scaling = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scaling


def apply_policy(backbone: nn.Module, policy: str, rank: int = 8, alpha: float = 16.0) -> None:
    """Set requires_grad on the backbone (and insert adapters for 'lora'), in place."""
    if policy not in POLICIES:
        raise HingeError(f"unknown trainable policy '{policy}'", f"use one of {', '.join(POLICIES)}")
    backbone.requires_grad_(policy == "full")
    if policy != "lora":
        return
    if rank < 1:
        raise HingeError(f"lora_rank must be at least 1, not {rank}", "set model.lora_rank in the config")
    targets = [
        (parent, name, child)
        for parent in backbone.modules()
        for name, child in parent.named_children()
        if name in LORA_TARGETS and type(child) is nn.Linear
    ]
    for parent, name, child in targets:
        setattr(parent, name, LoRALinear(child, rank, alpha))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on the meta device."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
