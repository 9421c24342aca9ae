"""Validation by held-out section, the generated depth-partial that selects models, and the ridge-started direct path."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hinge_cli.config import load_config
from hinge_cli.core.distributed import Dist
from hinge_cli.data.dataset import SpotTable
from hinge_cli.model import Hinge
from hinge_cli.predict.ridge import start_direct_path_at_ridge
from hinge_cli.training.data import SplitData
from hinge_cli.training.losses import hinge_losses
from hinge_cli.training.selection import choose_split, generated_depth_partial

G, D = 6, 8


def synthetic_table(samples: tuple[str, ...] = ("a", "b", "c"), n: int = 50, seed: int = 0) -> SpotTable:
    """Targets linear in the features plus each spot's log depth: a ridge recovers them."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, G))
    parts = []
    for name in samples:
        x = rng.normal(size=(n, D)).astype(np.float32)
        depth = rng.uniform(1000, 20000, n)
        y = (x @ w * 0.5 + 0.3 * np.log(depth)[:, None] + rng.normal(0, 0.1, (n, G))).astype(np.float32)
        parts.append((np.full(n, name, dtype=object), [f"{name}{i}" for i in range(n)], x, y, depth))
    return SpotTable(np.concatenate([p[0] for p in parts]), [b for p in parts for b in p[1]], np.zeros((n * len(samples), 2)),
                     np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]),
                     np.concatenate([p[4] for p in parts]))


def test_three_samples_validate_on_one_whole_section_chosen_by_the_seed():
    splits = {seed: choose_split(["a", "b", "c"], [], 0.1, seed) for seed in range(6)}
    assert all(len(s.val_samples) == 1 and s.val_samples[0] in "abc" for s in splits.values())
    assert len({s.val_samples[0] for s in splits.values()}) > 1  # the seed chooses
    assert choose_split(["c", "b", "a"], [], 0.1, 3) == splits[3]  # not the order samples are listed in
    assert choose_split(["a", "b", "c"], ["b"], 0.1, 0).val_samples == ["b"]


def test_fewer_than_three_samples_fall_back_to_random_spots_and_say_so(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING):
        split = choose_split(["a", "b"], [], 0.2, 0)
    assert split.val_samples == [] and split.val_fraction == 0.2
    assert "random 20% of their spots" in caplog.text


def test_the_held_out_section_never_enters_training_batches():
    table = synthetic_table()
    split = choose_split(["a", "b", "c"], [], 0.1, 1)
    data = SplitData.of(table, split)
    held = split.val_samples[0]
    assert set(data.val.sample) == {held} and held not in set(data.train.sample)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    net = Hinge.build(cfg.model, G + 1, list(range(1, G + 1)), D, cfg.diffusion)
    seen: list[torch.Tensor] = []
    original = net.forward

    def spy(values, visible, t, image, spread=False):
        seen.append(image.detach().clone())
        return original(values, visible, t, image, spread)

    net.forward = spy  # type: ignore[method-assign]
    batch_loss, _ = hinge_losses(net, data, Dist(), 0, None, torch.device("cpu"))
    batch_loss(net, torch.arange(len(data.train.targets)), torch.Generator().manual_seed(0))
    trained_on = torch.cat(seen)
    held_rows = data.val.features[:, 0]
    assert not any(torch.equal(row, other) for row in trained_on for other in held_rows)


def test_ridge_started_direct_path_predicts_what_the_ridge_predicts_and_scores_well():
    table = synthetic_table()
    split = choose_split(["a", "b", "c"], ["c"], 0.1, 0)
    data = SplitData.of(table, split)
    cfg = load_config("tiny")
    torch.manual_seed(0)
    net = Hinge.build(cfg.model, G + 1, list(range(1, G + 1)), D, cfg.diffusion)
    before = generated_depth_partial(net, data.val, seed=0)
    train_rows = np.flatnonzero(table.sample != "c")
    start_direct_path_at_ridge(net.direct, table.subset(train_rows), data.norm, [f"g{j}" for j in range(G)], "k", 0)
    after = generated_depth_partial(net, data.val, seed=0)
    assert after > 0.9 and after > before + 0.3
    image = data.val.features[:5, 0]
    expected = image @ net.direct.linear.weight.T + net.direct.linear.bias
    torch.testing.assert_close(net.direct(image), expected)  # the MLP term is still zero: the linear probe alone
