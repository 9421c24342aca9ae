"""CellFM-compatible gene encoder: gene + value tokens through linear-attention retention layers.

Layer structure and initialisation follow CellFM (biomed-AI/CellFM, MindSpore) so that its
weights load one-to-one; `hinge_cli.model.cellfm` holds the name mapping. Every layer takes
optional SoftAdaLN modulations; without them the backbone is the plain pre-trained model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hinge_cli.config import ModelConfig
from hinge_cli.errors import HingeError
from hinge_cli.model.conditioning import Modulation

LEAKY_SLOPE = 0.2  # MindSpore's nn.LeakyReLU default, which CellFM was trained with
LN_EPS = 1e-7  # MindSpore's nn.LayerNorm default


def _linear(d_in: int, d_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=False)
    nn.init.xavier_normal_(layer.weight, gain=gain)
    return layer


class ValueEncoder(nn.Module):
    """Scalar expression -> embedding by soft binning (CellFM): a softmax over learned bins, then a table."""

    def __init__(self, d_model: int, n_bins: int):
        super().__init__()
        self.w1 = nn.Linear(1, n_bins, bias=False)
        self.w3 = nn.Linear(n_bins, n_bins, bias=False)
        self.a = nn.Parameter(torch.zeros(1, 1))  # learned weight of the residual around w3
        self.table = nn.Linear(n_bins, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        v = F.leaky_relu(self.w1(x.unsqueeze(-1)), LEAKY_SLOPE)
        v = self.w3(v) + self.a * v
        return self.table(torch.softmax(v, dim=-1))


class ValueDecoder(nn.Module):
    """Gene token -> predicted expression (Linear, LeakyReLU, Linear to 1)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_model, bias=False)
        self.w2 = nn.Linear(d_model, 1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.w2(F.leaky_relu(self.w1(h), LEAKY_SLOPE)).squeeze(-1)


class Retention(nn.Module):
    """Multi-head linear attention: Q (K^T V) with ReLU feature maps, per-head RMS norm, SiLU(U) gate.

    Cost and memory are linear in the number of tokens, so a 1000-gene panel is cheap.
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int):
        super().__init__()
        if d_model % n_heads:
            raise HingeError(f"d_model {d_model} is not divisible by n_heads {n_heads}", "fix the model section of the config")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        beta = (8 * n_layers) ** -0.25
        self.q_proj = _linear(d_model, d_model, 1.0)
        self.k_proj = _linear(d_model, d_model, 1.0)
        self.v_proj = _linear(d_model, d_model, beta)
        self.u_proj = _linear(d_model, d_model, beta)
        self.o_proj = _linear(d_model, d_model, beta)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, key_mask: Tensor | None, v_scale: float) -> Tensor:
        root = self.head_dim**0.5
        q = self._heads(F.relu(self.q_proj(x))) / root
        k = self._heads(F.relu(self.k_proj(x))) / root
        v = self._heads(self.v_proj(x)) * v_scale
        u = self._heads(F.silu(self.u_proj(x)))
        if key_mask is not None:
            k = k * key_mask[:, None, :, None]
        o = q @ (k.transpose(-1, -2) @ v)
        o = o / (o.norm(dim=-1, keepdim=True) / root).clamp_min(1e-12)
        o = (o * u).transpose(1, 2).flatten(2)
        return self.o_proj(o)


class GatedLinearUnit(nn.Module):
    """CellFM's feed-forward: o(u(x) * v(x)), a bilinear gated unit without bias."""

    def __init__(self, d_model: int, ffn_dim: int, n_layers: int):
        super().__init__()
        beta = (8 * n_layers) ** -0.25
        self.u_proj = _linear(d_model, ffn_dim, beta)
        self.v_proj = _linear(d_model, ffn_dim, beta)
        self.o_proj = _linear(ffn_dim, d_model, beta)

    def forward(self, x: Tensor) -> Tensor:
        return self.o_proj(self.u_proj(x) * self.v_proj(x))


class RetentionLayer(nn.Module):
    """Retention + GLU, each as post-LN with a scaled residual: LN(alpha * x + sublayer(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Retention(cfg.d_model, cfg.n_heads, cfg.n_layers)
        self.ffn = GatedLinearUnit(cfg.d_model, cfg.ffn_dim, cfg.n_layers)
        self.post_norm1 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.post_norm2 = nn.LayerNorm(cfg.d_model, eps=LN_EPS)
        self.dropout = nn.Dropout(cfg.dropout)
        self.alpha = (2 * cfg.n_layers) ** 0.25

    def forward(self, x: Tensor, key_mask: Tensor | None, v_scale: float, mods: list[Modulation] | None = None) -> Tensor:
        h = mods[0].modulate(x) if mods else x
        y = self.dropout(self.attn(h, key_mask, v_scale))
        x = self.post_norm1(self.alpha * x + (mods[0].gated(y) if mods else y))
        h = mods[1].modulate(x) if mods else x
        y = self.dropout(self.ffn(h))
        return self.post_norm2(self.alpha * x + (mods[1].gated(y) if mods else y))


class Backbone(nn.Module):
    """The sc-FM: [CLS] + one token per gene (gene + value embedding, + mask embedding if hidden).

    Hidden tokens are removed from attention keys/values in the first half of the layers,
    so their filled-in values cannot leak into visible tokens early on.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.gene_emb = nn.Embedding(vocab_size, cfg.d_model, padding_idx=0)
        nn.init.xavier_normal_(self.gene_emb.weight, gain=0.5)
        with torch.no_grad():
            self.gene_emb.weight[0].zero_()
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.d_model))
        nn.init.xavier_normal_(self.cls_token, gain=0.5)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, cfg.d_model))
        nn.init.xavier_normal_(self.mask_emb, gain=0.5)
        self.value_enc = ValueEncoder(cfg.d_model, cfg.n_bins)
        self.layers = nn.ModuleList(RetentionLayer(cfg) for _ in range(cfg.n_layers))
        self.value_dec = ValueDecoder(cfg.d_model)

    def embed(self, gene_ids: Tensor, values: Tensor, visible: Tensor) -> Tensor:
        """Token embeddings (B, 1 + L, D) with the [CLS] token first."""
        tokens = self.gene_emb(gene_ids) + self.value_enc(values.to(self.mask_emb.dtype))
        tokens = tokens + (~visible).unsqueeze(-1).to(tokens.dtype) * self.mask_emb
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def encode(
        self,
        gene_ids: Tensor,
        values: Tensor,
        visible: Tensor,
        layer_mods: list[list[Modulation]] | None = None,
    ) -> Tensor:
        """Hidden states (B, 1 + L, D) after all retention layers."""
        h = self.embed(gene_ids, values, visible)
        key_mask = torch.cat([visible.new_ones(visible.shape[0], 1), visible], dim=1).to(h.dtype)
        v_scale = gene_ids.shape[1] ** -0.5
        for i, layer in enumerate(self.layers):
            mask = key_mask if i < len(self.layers) // 2 else None
            h = layer(h, mask, v_scale, layer_mods[i] if layer_mods else None)
        return h

    def forward(
        self,
        gene_ids: Tensor,
        values: Tensor,
        visible: Tensor,
        layer_mods: list[list[Modulation]] | None = None,
        decoder_mod: Modulation | None = None,
    ) -> Tensor:
        """Predicted expression (B, L) for every gene token, hidden or not."""
        h = self.encode(gene_ids, values, visible, layer_mods)[:, 1:]
        return self.value_dec(decoder_mod.modulate(h) if decoder_mod else h)
