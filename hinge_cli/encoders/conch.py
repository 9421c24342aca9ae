"""CONCH's image tower (CoCa, ViT-B/16 at 448 px) with its published parameter names.

The checkpoint stores it under `visual.`: a timm ViT `trunk`, then an attentional
pooler (one learned query attending over all tokens) for the contrastive
embedding. The 512-d feature recommended for downstream tasks is the pooled,
layer-normed query before the contrastive projection (CONCH's
`encode_image(proj_contrast=False, normalize=False)`).
"""

from __future__ import annotations

import torch
from torch import nn

from hinge_cli.encoders.vit import VisionTransformer, ViTArch

CONCH_TRUNK = ViTArch(img_size=448, patch_size=16, embed_dim=768, depth=12, num_heads=12, pool="none")
# Caption pooler and its norm only feed CONCH's text decoder; embeddings never use them.
CONCH_UNUSED = ("attn_pool_caption.", "ln_caption.")


class AttentionalPooler(nn.Module):
    """Learned queries cross-attending over the trunk's tokens (open_clip's AttentionalPooler)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int, n_queries: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, keys, keys, need_weights=False)[0]


class ConchVision(nn.Module):
    """(B, 3, 448, 448) normalised image -> (B, embed_dim) CONCH image embedding."""

    def __init__(self, trunk: ViTArch = CONCH_TRUNK, embed_dim: int = 512, heads: int = 8, project: bool = False):
        super().__init__()
        self.project = project
        self.trunk = VisionTransformer(trunk)
        self.attn_pool_contrast = AttentionalPooler(embed_dim, trunk.embed_dim, heads, n_queries=1)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.proj_contrast = nn.Parameter(trunk.embed_dim**-0.5 * torch.randn(embed_dim, embed_dim))
        self.out_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.ln_contrast(self.attn_pool_contrast(self.trunk(x))[:, 0])
        return pooled @ self.proj_contrast if self.project else pooled
