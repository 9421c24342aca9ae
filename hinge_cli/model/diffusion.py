"""Masked diffusion over a gene panel: schedule, forward masking and loss.

A random order of the G genes per sample; at step t the first n(t) = floor(gamma(t) G) genes in
that order are hidden, gamma(t) = 1 - (1 - t/T)^alpha. The same masking mechanics (ranks,
fill, mask embedding, key dropping) serve backbone pre-training, so both objectives agree.

The loss scores every hidden gene by default. The official HINGE code scores only the genes
revealed between t and t-1 (`loss: revealed`): about one gene per spot per step on a 50-gene
panel, and the all-hidden state where generation starts is one training row in T. A share of
each batch (`all_hidden_share`) is drawn at t = T so that state gets its own weight.

With `likelihood: gaussian` the network also predicts each gene's log-variance, trained by the
Gaussian negative log-likelihood of the (detached) mean's residual; the mean keeps the squared
error, so adding the spread does not trade point accuracy for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from hinge_cli.config import DiffusionConfig
from hinge_cli.errors import HingeError, setting

ALPHA_RANGE = (1.05, 4.0)
FILLS = ("noise", "zero")
LOSS_TARGETS = ("hidden", "revealed")
LIKELIHOODS = ("gaussian", "mse")


class Denoiser(Protocol):
    """Anything that predicts clean expression (B, G) from a partly hidden panel."""

    def __call__(self, values: Tensor, visible: Tensor, t: Tensor, image: Tensor, spread: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The clean-expression mean (B, G); with `spread` (models that have one) also its log-variance."""


def automatic_alpha(n_steps: int, n_genes: int) -> float:
    """The exponent that leaves exactly one gene visible at t = T-1 (G T^-alpha = 1), clipped."""
    if n_steps < 2 or n_genes < 2:
        return ALPHA_RANGE[0]
    return float(np.clip(math.log(n_genes) / math.log(n_steps), *ALPHA_RANGE))


class MaskSchedule:
    """How many of the G genes are hidden at each step t = 0..T."""

    def __init__(self, n_steps: int, n_genes: int, alpha: float | None = None):
        if n_steps < 1 or n_genes < 1:
            raise HingeError(f"a schedule needs at least one step and one gene (got T={n_steps}, G={n_genes})",
                             "check diffusion.steps and the gene panel")
        self.n_steps, self.n_genes = n_steps, n_genes
        self.alpha = automatic_alpha(n_steps, n_genes) if alpha is None else float(alpha)
        t = np.arange(n_steps + 1, dtype=np.float64)
        gamma = 1.0 - (1.0 - t / n_steps) ** self.alpha
        counts = np.floor(gamma * n_genes + 1e-9).astype(np.int64)
        counts[-1] = n_genes
        self.hidden_counts = torch.from_numpy(np.maximum.accumulate(counts))

    def revealed_counts(self) -> Tensor:
        """Genes revealed going from t to t-1, for t = 1..T (index t-1)."""
        return self.hidden_counts[1:] - self.hidden_counts[:-1]

    def training_steps(self, max_hidden_fraction: float | None = None) -> Tensor:
        """The steps t >= 1 that reveal at least one gene, optionally only those hiding <= a fraction.

        The warm-start curriculum passes rho here; if no step qualifies, the least-hiding one is kept.
        """
        t = torch.arange(1, self.n_steps + 1)
        keep = self.revealed_counts() > 0
        if max_hidden_fraction is not None:
            easy = keep & (self.hidden_counts[1:] <= max_hidden_fraction * self.n_genes)
            keep = easy if easy.any() else keep & (t == t[keep][0])
        return t[keep]

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 max_hidden_fraction: float | None = None, all_hidden_share: float = 0.0) -> Tensor:
        """Uniform training timesteps among `training_steps`; with `all_hidden_share` > 0 that share of rows gets t = T.

        The curriculum (`max_hidden_fraction` set) never draws the all-hidden state.
        """
        steps = self.training_steps(max_hidden_fraction)
        device = _draw_device(generator, steps.device)
        t = steps[torch.randint(len(steps), (batch,), generator=generator, device=device).cpu()]
        if all_hidden_share > 0 and max_hidden_fraction is None:
            full = torch.rand(batch, generator=generator, device=device).cpu() < all_hidden_share
            t = torch.where(full, torch.full_like(t, self.n_steps), t)
        return t

    def grid(self, steps: int | None = None) -> list[int]:
        """Timesteps T = t_S > ... > t_0 = 0 for a reverse process of `steps` steps (coarser than T allowed)."""
        steps = self.n_steps if steps is None else steps
        if not 1 <= steps <= self.n_steps:
            raise HingeError(f"sampling steps must be between 1 and the training T={self.n_steps}, not {steps}",
                             f"pass a smaller {setting('steps')}")
        return [round(k * self.n_steps / steps) for k in range(steps, -1, -1)]


def _draw_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    """Random draws happen where the generator lives, so a CPU generator also seeds GPU training."""
    return generator.device if generator is not None else fallback


def random_ranks(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each gene's position in a uniformly random order, per row of `like` (B, G)."""
    keys = torch.rand(like.shape, generator=generator, device=_draw_device(generator, like.device))
    return keys.argsort(dim=1).argsort(dim=1).to(like.device)


def check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise HingeError(f"unknown fill '{fill}'", f"set diffusion.fill to one of {', '.join(FILLS)}")


def check_loss_target(target: str) -> None:
    if target not in LOSS_TARGETS:
        raise HingeError(f"unknown diffusion loss '{target}'", f"set diffusion.loss to one of {', '.join(LOSS_TARGETS)}")


def check_likelihood(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise HingeError(f"unknown diffusion likelihood '{likelihood}'", f"set diffusion.likelihood to one of {', '.join(LIKELIHOODS)}")


def fill_hidden(x: Tensor, hidden: Tensor, noise: Tensor | None) -> Tensor:
    """Replace hidden values by noise (or zeros when `noise` is None); visible values stay."""
    return torch.where(hidden, torch.zeros_like(x) if noise is None else noise.to(x.dtype), x)


def draw_noise(like: Tensor, fill: str, noise_std: float, generator: torch.Generator | None = None) -> Tensor | None:
    """Fill values for a training batch: N(0, noise_std^2) for 'noise', None for 'zero'."""
    check_fill(fill)
    if fill == "zero":
        return None
    noise = torch.randn(like.shape, generator=generator, device=_draw_device(generator, like.device))
    return noise.to(like.device, like.dtype) * noise_std


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Squared error averaged over the masked genes of each row, then over rows that have any."""
    m = mask.to(pred.dtype)
    per_row = ((pred - target) ** 2 * m).sum(1) / m.sum(1).clamp_min(1)
    has_any = mask.any(1)
    return per_row[has_any].mean() if has_any.any() else pred.sum() * 0


def masked_gaussian_nll(log_var: Tensor, residual: Tensor, mask: Tensor) -> Tensor:
    """Gaussian negative log-likelihood (without the constant) of the residuals, averaged like `masked_mse`."""
    nll = 0.5 * (log_var + residual.detach() ** 2 * torch.exp(-log_var))
    m = mask.to(nll.dtype)
    per_row = (nll * m).sum(1) / m.sum(1).clamp_min(1)
    has_any = mask.any(1)
    return per_row[has_any].mean() if has_any.any() else log_var.sum() * 0


@dataclass
class Corruption:
    """A forward-process draw: what the network sees and which genes the loss scores."""

    values: Tensor  # (B, G) visible values kept, hidden ones filled
    visible: Tensor  # (B, G) bool
    target: Tensor  # (B, G) bool: the genes the loss scores (all hidden ones, or those revealed between t and t-1)
    t: Tensor  # (B,)


def corrupt(
    x0: Tensor,
    t: Tensor,
    schedule: MaskSchedule,
    ranks: Tensor,
    noise: Tensor | None,
    loss_target: str = "hidden",
) -> Corruption:
    """Hide the first n(t) genes in each row's order; the loss targets all of them, or only ranks in [n(t-1), n(t))."""
    check_loss_target(loss_target)
    counts = schedule.hidden_counts.to(x0.device)
    n_t, n_prev = counts[t][:, None], counts[t - 1][:, None]
    hidden = ranks < n_t
    target = hidden if loss_target == "hidden" else hidden & (ranks >= n_prev)
    return Corruption(fill_hidden(x0, hidden, noise), ~hidden, target, t)


def diffusion_loss(
    net: Denoiser,
    x0: Tensor,
    image: Tensor,
    schedule: MaskSchedule,
    diffusion: DiffusionConfig,
    generator: torch.Generator | None = None,
    max_hidden_fraction: float | None = None,
    rows: slice | None = None,
) -> Tensor:
    """One training loss: random t and order, predict clean x0, score the hidden (or just revealed) genes.

    The draws are made for the whole batch; `rows` then scores only that share of it, so
    data-parallel ranks together see exactly the draws of one process.
    """
    d = diffusion
    t = schedule.sample_t(x0.shape[0], generator, max_hidden_fraction, d.all_hidden_share).to(x0.device)
    ranks = random_ranks(x0, generator)
    c = corrupt(x0, t, schedule, ranks, draw_noise(x0, d.fill, d.noise_std, generator), d.loss)
    r = rows if rows is not None else slice(None)
    if d.likelihood == "mse":
        return masked_mse(net(c.values[r], c.visible[r], c.t[r], image[r]), x0[r], c.target[r])
    mean, log_var = net(c.values[r], c.visible[r], c.t[r], image[r], spread=True)
    return masked_mse(mean, x0[r], c.target[r]) + masked_gaussian_nll(log_var, x0[r] - mean, c.target[r])
