"""The non-generative baselines of the HER2ST benchmark: training mean, ridge (probabilistic), a small MLP.

Each fits on the training sections' (features, model-space targets) and predicts a
held-out section's spots; none ever sees the held-out section. Hyper-parameters
are either chosen by inner leave-one-section-out (ridge's penalty) or fixed and
early-stopped on training spots (the MLP), so every baseline is as strong as its
training data allows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from ridge import choose_lambda, fit_ridge, out_of_fold_residual_std, predict_ridge
from torch import nn

from hinge_cli.eval import metrics

Section = tuple[np.ndarray, np.ndarray, np.ndarray]  # features (N, D), targets (N, G), total counts (N,)


def train_mean(train: Sequence[Section], test_x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Every spot gets the training spots' mean profile: the floor for MSE (correlations are undefined)."""
    mean = np.concatenate([y for _, y, _ in train]).mean(0)
    return np.broadcast_to(mean, (len(test_x), len(mean))).copy(), {}


def ridge(train: Sequence[Section], test_x: np.ndarray) -> tuple[np.ndarray, dict]:
    """Closed-form ridge; the penalty maximises the inner leave-one-section-out depth-partial Pearson (the headline).

    Its predictive distribution is a Gaussian per gene around the mean, with the std of the inner
    out-of-fold residuals at that penalty (`residual_std` in the info).
    """
    xs, ys, depths = ([s[i] for s in train] for i in range(3))
    lam, inner = choose_lambda(xs, ys, lambda p, t, i: metrics.depth_partial_score(p, t, depths[i])[0])
    model = fit_ridge(np.concatenate(xs), np.concatenate(ys), lam)
    spread = out_of_fold_residual_std(xs, ys, lam)
    return predict_ridge(model, test_x), {"lambda": lam, "inner_depth_partial": inner, "residual_std": spread.tolist()}


def mlp(train: Sequence[Section], test_x: np.ndarray, seed: int = 0, hidden: int = 256, dropout: float = 0.3,
        lr: float = 1e-3, weight_decay: float = 1e-2, batch: int = 64, max_epochs: int = 400, patience: int = 30,
        val_fraction: float = 0.1) -> tuple[np.ndarray, dict]:
    """One hidden layer, dropout and weight decay, early-stopped on a random 10% of the training spots."""
    x = np.concatenate([s[0] for s in train]).astype(np.float32)
    y = np.concatenate([s[1] for s in train]).astype(np.float32)
    mu, sd = x.mean(0), np.maximum(x.std(0), 1e-6)
    y_mean = y.mean(0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_val = max(1, round(val_fraction * len(x)))
    val, fit_rows = order[:n_val], order[n_val:]
    to_t: Callable[[np.ndarray], torch.Tensor] = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    xt, yt = to_t((x - mu) / sd), to_t(y - y_mean)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Dropout(dropout), nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Dropout(dropout),
                        nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    best, best_state, bad, epoch = np.inf, None, 0, 0
    for epoch in range(1, max_epochs + 1):  # noqa: B007 - the epoch reached is reported after the loop
        net.train()
        perm = torch.from_numpy(fit_rows)[torch.randperm(len(fit_rows), generator=generator)]
        for start in range(0, len(perm), batch):
            rows = perm[start:start + batch]
            loss = ((net(xt[rows]) - yt[rows]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val_loss = float(((net(xt[val]) - yt[val]) ** 2).mean())
        if val_loss < best:
            best, best_state, bad = val_loss, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            bad += 1
            if bad >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        pred = net(to_t((test_x - mu) / sd)).numpy() + y_mean
    return pred.astype(np.float64), {"epochs": epoch, "best_val_mse": best}


BASELINES: dict[str, Callable[[Sequence[Section], np.ndarray], tuple[np.ndarray, dict]]] = {
    "train-mean": train_mean,
    "ridge": ridge,
    "mlp": mlp,
}
