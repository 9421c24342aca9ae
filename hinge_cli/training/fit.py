"""One readable training loop, shared by backbone pre-training, warm-up and training.

Everything random in epoch e (the shuffle, timesteps, gene orders, fill noise) comes
from a generator seeded by (seed, stage, e). So resuming after epoch e needs only the
weights, the optimiser state and the loop counters: the rest is re-derived, and a
resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hinge_cli.core import devices
from hinge_cli.core.distributed import Dist
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.errors import HingeError

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")

# (network or its DDP wrapper, the global batch's row indices, the epoch's generator) -> this rank's loss
BatchLoss = Callable[[nn.Module, Tensor, torch.Generator], Tensor]
# the network (unwrapped, in eval mode) -> its validation figures by name (LoopSettings.select picks the one that counts);
# None where nothing is held out (a refit on every spot): each epoch is then the newest best and nothing stops early
Validate = Callable[[nn.Module], dict[str, float]]


@dataclass(kw_only=True)
class LoopSettings:
    stage: str
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    patience: int | None = None  # stop after this many epochs without a better validation figure
    select: str = "val_loss"  # the validation figure that picks the best epoch and stops early
    maximize: bool = False  # True when a higher `select` is better (a correlation rather than a loss)
    seed: int = 0
    schedule: str = "cosine"  # cosine decay after a linear warm-up, or constant
    lr_warmup: float = 0.05  # fraction of all steps spent ramping the learning rate up

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise HingeError(f"unknown learning-rate schedule '{self.schedule}'",
                             f"set train.schedule to one of {', '.join(SCHEDULES)}")


@dataclass
class LoopState:
    """Counters and history: all a resume needs besides weights and optimiser (JSON-able)."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_val: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopState:
        return cls(**data)


def epoch_generator(seed: int, stage: str, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{stage}:{seed}:{epoch}".encode()))


def lr_at(step: int, total: int, settings: LoopSettings) -> float:
    warm = max(1, int(settings.lr_warmup * total))
    if step < warm:
        return settings.lr * (step + 1) / warm
    if settings.schedule == "constant":
        return settings.lr
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(
    net: nn.Module,
    n_rows: int,
    batch_loss: BatchLoss,
    validate: Validate | None,
    settings: LoopSettings,
    *,
    dist: Dist | None = None,
    device: torch.device | None = None,
    state: LoopState | None = None,
    optimizer_state_dict: dict[str, Any] | None = None,
    on_epoch_end: Callable[[LoopState, nn.Module, torch.optim.Optimizer, bool], None] | None = None,
    progress: Progress = SILENT,
) -> LoopState:
    """Train `net` for `settings.epochs` epochs (from `state.epoch` when resuming); returns the final state."""
    dist, device, state = dist or Dist(), device or torch.device("cpu"), state or LoopState()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if optimizer_state_dict is not None:
        opt.load_state_dict(optimizer_state_dict)
    wrapped = dist.wrap(net, device)
    steps_per_epoch = max(1, math.ceil(n_rows / settings.batch_size))
    total = steps_per_epoch * settings.epochs
    autocast = devices.autocast(device)
    # the overall bar: epochs left (a resumed run starts part-way), with the validation loss beside it
    with progress.task(f"{settings.stage} epochs", max(0, settings.epochs - state.epoch)) as epoch_done:
        for epoch in range(state.epoch, settings.epochs):
            if state.stopped_early:
                break
            started = time.time()
            generator = epoch_generator(settings.seed, settings.stage, epoch)
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))  # dropout and friends
            order = torch.randperm(n_rows, generator=generator)
            net.train()
            total_loss, lr = 0.0, settings.lr
            with progress.task(f"{settings.stage} {epoch + 1}/{settings.epochs}", steps_per_epoch) as advance:
                for batch in range(steps_per_epoch):
                    rows = order[batch * settings.batch_size : (batch + 1) * settings.batch_size]
                    lr = lr_at(state.step, total, settings)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    share = dist.rows(len(rows))
                    with autocast:
                        # weighted so that DDP's gradient average is the gradient of the global batch mean
                        loss = batch_loss(wrapped, rows, generator) * ((share.stop - share.start) * dist.world / len(rows))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if settings.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                    opt.step()
                    state.step += 1
                    value = float(dist.mean(loss.detach().float()))
                    total_loss += value
                    advance(1, f"loss {value:.4f}  lr {lr:.2e}")
            net.eval()
            figures: dict[str, float] = {}
            if validate is not None:
                with torch.no_grad(), autocast:
                    figures = {name: float(value) for name, value in validate(net).items()}
            val = figures[settings.select] if validate is not None else None
            improved = val is None or state.best_val is None or (val > state.best_val if settings.maximize else val < state.best_val)
            if improved:
                state.best_val, state.best_epoch, state.bad_epochs = val, epoch + 1, 0
            else:
                state.bad_epochs += 1
            state.epoch = epoch + 1
            state.stopped_early = settings.patience is not None and state.bad_epochs >= settings.patience
            state.history.append({
                "epoch": epoch + 1, "step": state.step, "train_loss": total_loss / steps_per_epoch, **figures, "lr": lr,
                "seconds": round(time.time() - started, 3), "peak_memory_mb": round(devices.peak_memory_mb(device), 1),
            })
            shown = ", ".join(f"{name.removeprefix('val_').replace('_', ' ')} {value:.4f}" for name, value in figures.items())
            log.info("%s epoch %d/%d: train loss %.4f%s%s", settings.stage, epoch + 1, settings.epochs, total_loss / steps_per_epoch,
                     f", validation {shown}" if shown else "", " (best so far)" if improved and shown else "")
            epoch_done(1, f"val {val:.4f}  best {state.best_val:.4f} @ {state.best_epoch}" if val is not None
                       else f"loss {total_loss / steps_per_epoch:.4f}")
            if dist.main and on_epoch_end is not None:
                on_epoch_end(state, net, opt, improved)
            dist.barrier()
    return state
