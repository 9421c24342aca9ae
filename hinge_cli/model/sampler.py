"""The reverse process: from every gene hidden to every gene revealed, in scheduled groups.

Each gene's value is drawn at the step it is revealed, from the model's predictive Gaussian
(mean + temperature x std x noise), so genes revealed early condition the later ones and a
sample carries gene-gene dependence; temperature 0 (or a model without a spread) reveals the
mean. Each (spot, sample) draws its gene order, fill noise and reveal noise as a function of
(seed, spot index) alone, so results do not depend on how spots are batched.

Genes given per spot (panel completion) are visible from the first step and never overwritten;
the other genes are revealed in their order with the hidden count scaled to how many remain,
and the network is told the training step whose hidden count is nearest to what is hidden, so
it sees states like those it was trained on. A spot with no gene given walks the plain process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.errors import HingeError, setting
from hinge_cli.model.diffusion import Denoiser, MaskSchedule, check_fill, fill_hidden
from hinge_cli.model.randomness import FILL_STREAM, normals, spot_randomness

DEFAULT_STEPS = 5  # reverse-process steps unless asked: on the HER2ST steps x samples grid 1-50 steps scored the same


def sampling_steps(steps: int | None, n_steps: int) -> int:
    """The steps a reverse process takes: `steps` if given, else DEFAULT_STEPS or the trained T if that is fewer."""
    return min(DEFAULT_STEPS, n_steps) if steps is None else steps


@dataclass
class Samples:
    """Per-spot summary over samples; `samples` (B, n, G) only when asked for."""

    mean: Tensor  # (B, G)
    std: Tensor  # (B, G), population std over samples (0 for a single sample)
    samples: Tensor | None = None


def nearest_steps(schedule: MaskSchedule) -> Tensor:
    """For h = 0..G hidden genes, the training step whose hidden count is nearest to h (the smallest on a tie)."""
    steps = schedule.training_steps()
    counts = schedule.hidden_counts[steps]
    wanted = torch.arange(schedule.n_genes + 1)
    return steps[(counts[None, :] - wanted[:, None]).abs().argmin(1)]


@dataclass
class RevealPlan:
    """Which genes of each row are hidden at a step, and the step the network is told, with genes given or not."""

    ranks: Tensor  # (R, G) the order genes are revealed in; given genes rank after every other
    remaining: Tensor | None  # (R, 1) genes not given per row; None when none is given anywhere
    nearest: Tensor  # (G + 1,) see `nearest_steps`

    def hidden_count(self, n_hidden: int, n_genes: int) -> Tensor | int:
        """The schedule's count n(t) scaled to each row's remaining genes, rounded half up."""
        if self.remaining is None:
            return n_hidden
        return (2 * n_hidden * self.remaining + n_genes) // (2 * n_genes)

    def step(self, t_now: int, n_now: int, n_genes: int, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The hidden mask at `t_now` and each row's timestep: `t_now` for a row given nothing, else the nearest."""
        hidden_now = self.hidden_count(n_now, n_genes)
        hidden = self.ranks < hidden_now
        t = torch.full((rows,), t_now, dtype=torch.long, device=device)
        if self.remaining is not None:
            plain = self.remaining.flatten() == n_genes
            t = torch.where(plain, t, self.nearest.to(device)[hidden_now.flatten()])
        return hidden, t


def reveal_plan(ranks: Tensor, given: Tensor | None, schedule: MaskSchedule) -> RevealPlan:
    """Ranks among the genes not given (given genes last, so never hidden) and how many remain per row."""
    if given is None:
        return RevealPlan(ranks, None, nearest_steps(schedule))
    keys = ranks + given.to(ranks.dtype) * schedule.n_genes
    remaining = (~given).sum(1, keepdim=True)
    return RevealPlan(keys.argsort(1).argsort(1), remaining, nearest_steps(schedule))


def one_shot(net: Denoiser, image: Tensor, schedule: MaskSchedule, *, seed: int, spot_index: Tensor, fill: str,
             noise_std: float) -> tuple[Tensor, Tensor]:
    """The mean and log-variance (B, G) from every gene hidden: the reverse process's first step, one forward pass.

    The fill noise is the one a single-sample reverse process would use, so its mean is the one-shot point.
    """
    check_fill(fill)
    b, g = image.shape[0], schedule.n_genes
    hidden = torch.ones(b, g, dtype=torch.bool, device=image.device)
    noise = torch.from_numpy(normals(seed, torch.as_tensor(spot_index).cpu(), 1, g, FILL_STREAM)).to(image.device) * noise_std
    values = fill_hidden(torch.zeros(b, g, dtype=image.dtype, device=image.device), hidden, noise if fill == "noise" else None)
    t = torch.full((b,), schedule.n_steps, dtype=torch.long, device=image.device)
    return net(values, ~hidden, t, image, spread=True)


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
    given: Tensor | None = None,
    given_values: Tensor | None = None,
    progress: Progress = SILENT,
) -> Samples:
    """Draw `n_samples` expression profiles per spot (batched together) and summarise them.

    `spot_index` (B,) gives each spot's global index (default 0..B-1): pass it when splitting a
    slide into batches so that every spot gets the same randomness whatever the batch size.
    `steps` < T walks a coarser grid of the training schedule. `temperature` scales the drawn
    spread; 0, or a network without a spread, reveals the mean. `given` (B, G) bool marks genes
    measured per spot, held at `given_values` (B, G, model space) throughout: their draws equal
    the given value and their std is 0.
    """
    check_fill(fill)
    if n_samples < 1:
        raise HingeError(f"n_samples must be at least 1, not {n_samples}", f"pass {setting('n-samples', '1')} or more")
    b, g, device = image.shape[0], schedule.n_genes, image.device
    spot_index = torch.arange(b) if spot_index is None else torch.as_tensor(spot_index).cpu()
    if spot_index.shape != (b,) or (spot_index < 0).any():
        raise HingeError("spot_index must hold one non-negative index per spot", "pass the spots' positions on the slide")
    if not temperature >= 0:
        raise HingeError(f"temperature must be 0 or more, not {temperature}", f"pass {setting('temperature', '0')} (the mean) or e.g. 1")
    ranks, noise, reveal = spot_randomness(spot_index, seed, n_samples, g)
    ranks = ranks.to(device)
    noise = noise.to(device) * noise_std if fill == "noise" else None
    draw = temperature > 0 and bool(getattr(net, "has_spread", False))
    reveal = reveal.to(device, image.dtype) * temperature
    images = image.repeat_interleave(n_samples, dim=0)
    x = torch.zeros(b * n_samples, g, dtype=image.dtype, device=device)
    if given is not None:
        if given_values is None or given.shape != (b, g) or given_values.shape != (b, g):
            raise HingeError(f"given genes need a (spots, genes) = ({b}, {g}) mask and values", "pass both for every spot of the batch")
        given = given.to(device, torch.bool)
        given_values = torch.where(given, given_values.to(device, image.dtype), torch.zeros_like(x[:b]))
        x = given_values.repeat_interleave(n_samples, dim=0)
    plan = reveal_plan(ranks, None if given is None else given.repeat_interleave(n_samples, dim=0), schedule)
    counts = schedule.hidden_counts.tolist()
    grid = schedule.grid(steps)
    with progress.task("sampling", len(grid) - 1) as advance:
        for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
            n_now, n_next = counts[t_now], counts[t_next]
            if n_now > n_next:
                hidden, t = plan.step(t_now, n_now, g, b * n_samples, device)
                values = fill_hidden(x, hidden, noise)
                if draw:
                    mean, log_var = net(values, ~hidden, t, images, spread=True)
                    pred = mean + torch.exp(0.5 * log_var) * reveal.to(mean.dtype)
                else:
                    pred = net(values, ~hidden, t, images)
                x = torch.where(hidden & (plan.ranks >= plan.hidden_count(n_next, g)), pred.to(x.dtype), x)
            advance(1)
    draws = x.view(b, n_samples, g)
    mean, std = draws.mean(1), draws.std(1, correction=0)
    if given is not None:  # exactly the given value, not a mean of copies of it up to rounding
        mean, std = torch.where(given, given_values, mean), torch.where(given, torch.zeros_like(std), std)
    return Samples(mean, std, draws if keep_samples else None)
