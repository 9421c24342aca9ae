"""SoftAdaLN and the condition network: how the image, timestep and mask steer a frozen backbone.

Every modulation starts as the identity (shift = scale = 0 exactly, SoftNorm's eta ~ 0,
gate ~ 1), so training begins from the pre-trained backbone's own function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Modulation:
    """One sub-layer's condition-dependent shift/scale (and gate), shaped (B, 1, D)."""

    shift: Tensor
    scale: Tensor
    eta: Tensor  # SoftNorm mixing weight, a scalar in (0, 1)
    gate: Tensor | None = None

    def modulate(self, h: Tensor) -> Tensor:
        """SoftNorm(h) * (1 + scale) + shift with SoftNorm(h) = (1 - eta) h + eta LN(h)."""
        normed = F.layer_norm(h, h.shape[-1:], eps=1e-6)
        soft = (1 - self.eta) * h + self.eta * normed
        return soft * (1 + self.scale) + self.shift

    def gated(self, y: Tensor) -> Tensor:
        """Scale a sub-layer output by its gate before the residual (identity if ungated)."""
        return y if self.gate is None else y * self.gate


class SoftAdaLN(nn.Module):
    """Maps the condition to modulations for `n_sites` sub-layers; zero-initialised head."""

    def __init__(self, d_model: int, cond_dim: int, n_sites: int, gated: bool, eta_logit: float, gate_logit: float):
        super().__init__()
        self.n_sites, self.gated, self.d_model = n_sites, gated, d_model
        per_site = 3 if gated else 2
        self.proj = nn.Linear(cond_dim, n_sites * per_site * d_model)
        nn.init.zeros_(self.proj.weight)
        bias = torch.zeros(n_sites, per_site, d_model)
        if gated:
            bias[:, 2] = gate_logit
        with torch.no_grad():
            self.proj.bias.copy_(bias.flatten())
        self.eta_logit = nn.Parameter(torch.full((n_sites,), float(eta_logit)))

    def forward(self, c: Tensor) -> list[Modulation]:
        parts = self.proj(F.silu(c)).view(c.shape[0], self.n_sites, -1, self.d_model).unsqueeze(2)
        eta = torch.sigmoid(self.eta_logit)
        return [
            Modulation(
                shift=parts[:, i, :, 0],
                scale=parts[:, i, :, 1],
                eta=eta[i],
                gate=torch.sigmoid(parts[:, i, :, 2]) if self.gated else None,
            )
            for i in range(self.n_sites)
        ]


LOG_VAR_MIN, LOG_VAR_MAX = -12.0, 8.0  # keeps exp(-log_var) finite in bf16 and the spread within model-space sense


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of the (integer) diffusion step, as in DDPM/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float64) / half)
    args = t.to(torch.float64)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ConditionNet(nn.Module):
    """c = MLP(image feature) + MLP(sinusoidal timestep) + MLP(visibility mask)."""

    def __init__(self, image_dim: int, n_genes: int, cond_dim: int):
        super().__init__()
        self.cond_dim = cond_dim
        self.image = _mlp(image_dim, cond_dim)
        self.time = _mlp(cond_dim, cond_dim)
        self.mask = _mlp(n_genes, cond_dim)

    def forward(self, image: Tensor, t: Tensor, visible: Tensor) -> Tensor:
        dtype = self.image[0].weight.dtype
        t_emb = timestep_embedding(t, self.cond_dim).to(dtype)
        return self.image(image.to(dtype)) + self.time(t_emb) + self.mask(visible.to(dtype))


class DirectPath(nn.Module):
    """A per-gene head on the image feature, added to the backbone's output; zero at initialisation.

    SoftAdaLN reaches the output only by modulating the backbone's channels, which a plain MLP
    on the same features beats; this path lets the image predict expression directly (a linear
    term and a small MLP) while the backbone refines it from the visible genes. Both start at
    zero, so the model still begins as the backbone's own function.
    """

    def __init__(self, image_dim: int, n_genes: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.linear = nn.Linear(image_dim, n_genes)
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_genes))
        for layer in (self.linear, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @torch.no_grad()
    def start_at(self, weights: Tensor, intercept: Tensor) -> None:
        """Set the linear term to a fitted linear model (D, G) and intercept (G,): a linear probe to fine-tune from."""
        self.linear.weight.copy_(weights.T.to(self.linear.weight))
        self.linear.bias.copy_(intercept.to(self.linear.bias))

    def forward(self, image: Tensor) -> Tensor:
        x = image.to(self.linear.weight.dtype)
        return self.linear(x) + self.mlp(x)


class SpreadHead(nn.Module):
    """The log-variance of each gene's predictive Gaussian, from its token state and the condition.

    It reads detached inputs, so the likelihood term trains the spread alone and leaves the
    mean's features to the squared error. Zero at initialisation: unit variance in model space.
    """

    def __init__(self, d_model: int, cond_dim: int, n_genes: int):
        super().__init__()
        self.token = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        self.condition = nn.Linear(cond_dim, n_genes)
        self.gene = nn.Parameter(torch.zeros(n_genes))
        for layer in (self.token[-1], self.condition):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, states: Tensor, condition: Tensor) -> Tensor:
        dtype = self.gene.dtype
        log_var = self.token(states.detach().to(dtype)).squeeze(-1) + self.condition(condition.detach().to(dtype))
        return (log_var + self.gene).clamp(LOG_VAR_MIN, LOG_VAR_MAX)
