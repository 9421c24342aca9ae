"""The reverse process: from every gene hidden to every gene revealed, in scheduled groups.

Each gene's value is drawn at the step it is revealed, from the model's predictive Gaussian
(mean + temperature x std x noise), so genes revealed early condition the later ones and a
sample carries gene-gene dependence; temperature 0 (or a model without a spread) reveals the
mean. Each (spot, sample) draws its gene order, fill noise and reveal noise as a function of
(seed, spot index) alone, so results do not depend on how spots are batched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hinge_cli.errors import HingeError
from hinge_cli.model.diffusion import Denoiser, MaskSchedule, check_fill, fill_hidden
from hinge_cli.model.randomness import spot_randomness
from hinge_cli.progress import SILENT, Progress

DEFAULT_STEPS = 10  # reverse-process steps unless asked: the HER2ST steps x samples grid (README, Benchmarks)


def sampling_steps(steps: int | None, n_steps: int) -> int:
    """The steps a reverse process takes: `steps` if given, else DEFAULT_STEPS or the trained T if that is fewer."""
    return min(DEFAULT_STEPS, n_steps) if steps is None else steps


@dataclass
class Samples:
    """Per-spot summary over samples; `samples` (B, n, G) only when asked for."""

    mean: Tensor  # (B, G)
    std: Tensor  # (B, G), population std over samples (0 for a single sample)
    samples: Tensor | None = None


def sample(
    net: Denoiser,
    image: Tensor,
    schedule: MaskSchedule,
    *,
    n_samples: int = 8,
    steps: int | None = None,
    seed: int = 0,
    spot_index: Tensor | None = None,
    fill: str = "noise",
    noise_std: float = 1.0,
    temperature: float = 0.0,
    keep_samples: bool = False,
    progress: Progress = SILENT,
) -> Samples:
    """Draw `n_samples` expression profiles per spot (batched together) and summarise them.

    `spot_index` (B,) gives each spot's global index (default 0..B-1): pass it when splitting a
    slide into batches so that every spot gets the same randomness whatever the batch size.
    `steps` < T walks a coarser grid of the training schedule. `temperature` scales the drawn
    spread; 0, or a network without a spread, reveals the mean.
    """
    check_fill(fill)
    if n_samples < 1:
        raise HingeError(f"n_samples must be at least 1, not {n_samples}", "pass --samples 1 or more")
    b, g, device = image.shape[0], schedule.n_genes, image.device
    spot_index = torch.arange(b) if spot_index is None else torch.as_tensor(spot_index).cpu()
    if spot_index.shape != (b,) or (spot_index < 0).any():
        raise HingeError("spot_index must hold one non-negative index per spot", "pass the spots' positions on the slide")
    if not temperature >= 0:
        raise HingeError(f"temperature must be 0 or more, not {temperature}", "pass --temperature 0 (the mean) or e.g. 1")
    ranks, noise, reveal = spot_randomness(spot_index, seed, n_samples, g)
    ranks = ranks.to(device)
    noise = noise.to(device) * noise_std if fill == "noise" else None
    draw = temperature > 0 and bool(getattr(net, "has_spread", False))
    reveal = reveal.to(device, image.dtype) * temperature
    images = image.repeat_interleave(n_samples, dim=0)
    x = torch.zeros(b * n_samples, g, dtype=image.dtype, device=device)
    counts = schedule.hidden_counts.tolist()
    grid = schedule.grid(steps)
    with progress.task("sampling", len(grid) - 1) as advance:
        for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
            n_now, n_next = counts[t_now], counts[t_next]
            if n_now > n_next:
                hidden = ranks < n_now
                t = torch.full((b * n_samples,), t_now, dtype=torch.long, device=device)
                values = fill_hidden(x, hidden, noise)
                if draw:
                    mean, log_var = net(values, ~hidden, t, images, spread=True)
                    pred = mean + torch.exp(0.5 * log_var) * reveal.to(mean.dtype)
                else:
                    pred = net(values, ~hidden, t, images)
                x = torch.where(hidden & (ranks >= n_next), pred.to(x.dtype), x)
            advance(1)
    draws = x.view(b, n_samples, g)
    return Samples(draws.mean(1), draws.std(1, correction=0), draws if keep_samples else None)
