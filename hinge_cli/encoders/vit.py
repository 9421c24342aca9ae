"""One Vision Transformer, parameterised to match the published pathology foundation models.

UNI, UNI2-h, H-optimus-0, Virchow2, Prov-GigaPath and CONCH's image trunk are
all timm `VisionTransformer`s with different sizes and options. Module and
parameter names here follow timm's (`patch_embed.proj`, `cls_token`,
`reg_token`, `pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2,ls2.gamma}`, `norm`), so the official checkpoints load with
`strict=True` without timm installed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # timm's ViT uses LayerNorm(eps=1e-6) throughout


@dataclass(frozen=True)
class ViTArch:
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    swiglu: bool = False  # timm SwiGLUPacked + SiLU (DINOv2 giant family) instead of GELU MLP
    init_values: float | None = None  # LayerScale (`ls1.gamma`, `ls2.gamma`) when set
    reg_tokens: int = 0
    no_embed_class: bool = False  # position embedding covers patches only, not the prefix tokens
    pool: str = "token"  # token | token+mean (Virchow) | none (all tokens, for attentional pooling)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix(self) -> int:
        return 1 + self.reg_tokens

    @property
    def out_dim(self) -> int:
        return 2 * self.embed_dim if self.pool == "token+mean" else self.embed_dim

    def scaled(self, embed_dim: int, depth: int, num_heads: int, img_size: int | None = None) -> ViTArch:
        """The same architecture at another width/depth (for tests and speed benchmarks)."""
        return replace(self, embed_dim=embed_dim, depth=depth, num_heads=num_heads, img_size=img_size or self.img_size)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """GELU MLP, or timm's packed SwiGLU: `fc1` emits both halves, the first gated by SiLU."""

    def __init__(self, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        self.swiglu = swiglu
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if swiglu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.swiglu:
            gate, value = x.chunk(2, dim=-1)
            x = F.silu(gate) * value
        else:
            x = F.gelu(x)
        return self.fc2(x)


class Block(nn.Module):
    def __init__(self, arch: ViTArch):
        super().__init__()
        d = arch.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.attn = Attention(d, arch.num_heads)
        self.ls1 = LayerScale(d, arch.init_values) if arch.init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, int(d * arch.mlp_ratio), arch.swiglu)
        self.ls2 = LayerScale(d, arch.init_values) if arch.init_values is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """(B, 3, H, W) normalised image -> (B, out_dim) embedding, or all tokens with pool='none'."""

    def __init__(self, arch: ViTArch):
        super().__init__()
        self.arch = arch
        d = arch.embed_dim
        self.patch_embed = PatchEmbed(arch.patch_size, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, arch.reg_tokens, d)) if arch.reg_tokens else None
        n_pos = arch.grid**2 + (0 if arch.no_embed_class else arch.num_prefix)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, d))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init (benchmarks, tests): small normal weights; real use loads a checkpoint."""
        if self.pos_embed.is_meta:
            return
        for p in (self.pos_embed, self.cls_token, self.reg_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _patch_pos(self, grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position embeddings of the patches (resampled bicubically for another grid) and of the prefix."""
        pos = self.pos_embed
        prefix = None
        if not self.arch.no_embed_class:
            prefix, pos = pos[:, : self.arch.num_prefix], pos[:, self.arch.num_prefix :]
        g = self.arch.grid
        if (grid_h, grid_w) != (g, g):
            grid = pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", antialias=True, align_corners=False)
            pos = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return pos, prefix

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm: [cls, registers..., patches...]."""
        gh, gw = x.shape[-2] // self.arch.patch_size, x.shape[-1] // self.arch.patch_size
        x = self.patch_embed(x)
        pos, prefix_pos = self._patch_pos(gh, gw)
        b = x.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        prefix_t = torch.cat(prefix, dim=1)
        if prefix_pos is not None:
            prefix_t = prefix_t + prefix_pos
        x = torch.cat([prefix_t, x + pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        if self.arch.pool == "none":
            return tokens
        if self.arch.pool == "token+mean":
            return torch.cat([tokens[:, 0], tokens[:, self.arch.num_prefix :].mean(1)], dim=-1)
        return tokens[:, 0]

