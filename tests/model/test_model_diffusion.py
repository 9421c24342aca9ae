"""Masked diffusion: schedule counts, the forward process, the loss, and that masking masks."""

import math

import pytest
import torch
from torch import Tensor

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.errors import HingeError
from hinge_cli.model import Hinge, MaskSchedule, automatic_alpha, corrupt, diffusion_loss
from hinge_cli.model.backbone import Backbone
from hinge_cli.model.diffusion import random_ranks


@pytest.mark.parametrize(("steps", "genes"), [(50, 50), (50, 200), (50, 1000), (20, 7), (10, 300), (1, 5)])
def test_schedule_counts(steps, genes):
    s = MaskSchedule(steps, genes)
    n = s.hidden_counts
    assert n[0] == 0 and n[-1] == genes
    assert torch.all(n[1:] >= n[:-1])
    assert int(s.revealed_counts().sum()) == genes
    assert 1.05 <= s.alpha <= 4.0
    if steps > 1 and genes <= steps**4:
        assert genes - int(n[steps - 1]) == 1  # one gene visible at t = T-1


def test_schedule_follows_gamma():
    s = MaskSchedule(50, 1000)
    assert s.alpha == pytest.approx(math.log(1000) / math.log(50))
    t = 17
    assert int(s.hidden_counts[t]) == math.floor(1000 * (1 - (1 - t / 50) ** s.alpha))
    assert automatic_alpha(50, 10) == 1.05 and automatic_alpha(2, 10**9) == 4.0


def test_warm_start_steps_hide_at_most_rho():
    s = MaskSchedule(50, 200)
    easy = s.training_steps(0.2)
    assert len(easy) > 0 and torch.all(s.hidden_counts[easy] <= 0.2 * 200)
    assert len(easy) < len(s.training_steps())
    t = s.sample_t(1000, torch.Generator().manual_seed(0), 0.2)
    assert set(t.tolist()) <= set(easy.tolist())


def test_coarse_grid():
    s = MaskSchedule(50, 100)
    assert s.grid() == list(range(50, -1, -1))
    grid = s.grid(10)
    assert grid[0] == 50 and grid[-1] == 0 and len(grid) == 11 and grid == sorted(grid, reverse=True)
    with pytest.raises(HingeError):
        s.grid(51)


def test_forward_process_hides_and_targets_the_scheduled_genes():
    s = MaskSchedule(20, 64)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(40, 64, generator=g) + 1
    t = s.sample_t(40, g)
    ranks = random_ranks(x0, g)
    c = corrupt(x0, t, s, ranks, None, "revealed")
    hidden = ~c.visible
    assert torch.equal(hidden.sum(1), s.hidden_counts[t])
    assert torch.equal(c.target.sum(1), s.revealed_counts()[t - 1])
    assert torch.all(c.target <= hidden)
    assert torch.all(c.values[hidden] == 0) and torch.equal(c.values[c.visible], x0[c.visible])
    assert torch.equal(corrupt(x0, t, s, ranks, None).target, hidden)  # the default scores every hidden gene


@pytest.mark.parametrize("loss", ["hidden", "revealed"])
def test_oracle_loss_is_zero_and_a_uniform_error_costs_its_square(loss):
    s = MaskSchedule(10, 30)
    x0 = torch.rand(16, 30)
    cfg = DiffusionConfig(steps=10, fill="zero", loss=loss, likelihood="mse")
    g = torch.Generator().manual_seed(0)
    assert diffusion_loss(lambda values, visible, t, image: x0.clone(), x0, torch.zeros(16, 1), s, cfg, g) == 0
    assert diffusion_loss(lambda values, visible, t, image: x0 + 1, x0, torch.zeros(16, 1), s, cfg, g) == pytest.approx(1.0)


def test_gaussian_loss_adds_the_spread_likelihood_of_the_detached_residual():
    """Error e and log-variance v cost e^2 + (v + e^2 exp(-v)) / 2, least at v = log e^2; the spread never moves the mean."""
    s = MaskSchedule(10, 30)
    x0 = torch.rand(16, 30)
    cfg = DiffusionConfig(steps=10, fill="zero", likelihood="gaussian")

    def loss(error: float, log_var: float, mean: Tensor | None = None) -> Tensor:
        mean = x0 + error if mean is None else mean
        net = lambda values, visible, t, image, spread: (mean, torch.full_like(x0, log_var))  # noqa: E731
        return diffusion_loss(net, x0, torch.zeros(16, 1), s, cfg, torch.Generator().manual_seed(0))

    assert loss(0.0, 0.0) == 0
    assert loss(1.0, 0.0) == pytest.approx(1.5)
    assert loss(2.0, math.log(4.0)) == pytest.approx(4 + 0.5 * (math.log(4.0) + 1))
    assert loss(2.0, math.log(4.0)) < min(loss(2.0, math.log(3.0)), loss(2.0, math.log(5.0)))
    grads = []
    for likelihood in ("gaussian", "mse"):
        mean = (x0 + 1).requires_grad_()

        def net(values, visible, t, image, spread=False, mean=mean):
            return (mean, torch.full_like(x0, -2.0)) if spread else mean

        cfg_l = DiffusionConfig(steps=10, fill="zero", likelihood=likelihood)
        diffusion_loss(net, x0, torch.zeros(16, 1), s, cfg_l, torch.Generator().manual_seed(0)).backward()
        grads.append(mean.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_hidden_loss_sees_a_wrong_gene_anywhere_in_the_hidden_set():
    """A network wrong only on genes hidden but not revealed at t: the revealed loss misses it, the hidden loss does not."""
    s = MaskSchedule(10, 30)
    x0 = torch.rand(16, 30)
    g = torch.Generator().manual_seed(3)
    t = torch.full((16,), 8)
    ranks = random_ranks(x0, g)
    revealed_at_t = corrupt(x0, t, s, ranks, None, "revealed").target

    def wrong_elsewhere(values, visible, t_, image):
        return torch.where(~visible & ~revealed_at_t, x0 + 2, x0)

    def loss(target):
        c = corrupt(x0, t, s, ranks, None, target)
        return float(((wrong_elsewhere(c.values, c.visible, t, None) - x0) ** 2 * c.target).sum())

    assert loss("revealed") == 0 and loss("hidden") > 0


def test_all_hidden_share_draws_t_equal_T_but_never_in_the_curriculum():
    s = MaskSchedule(20, 50)
    g = torch.Generator().manual_seed(0)
    plain = s.sample_t(4000, g)
    mixed = s.sample_t(4000, g, all_hidden_share=0.5)
    assert (plain == 20).float().mean() < 0.1
    assert 0.5 < (mixed == 20).float().mean() < 0.6  # half drawn at T, plus the uniform draws that land there
    assert not (s.sample_t(4000, g, 0.2, all_hidden_share=0.5) == 20).any()


def test_unknown_loss_target_is_a_user_error():
    cfg = load_config("tiny")
    with pytest.raises(HingeError, match="diffusion loss"):
        Hinge(Backbone(cfg.model, 30), torch.arange(1, 21), 5, cfg.model, DiffusionConfig(steps=10, loss="all"))


def tiny_hinge(fill):
    cfg = load_config("tiny")
    torch.manual_seed(0)
    return Hinge(Backbone(cfg.model, 30), torch.arange(1, 21), 5, cfg.model, DiffusionConfig(steps=10, fill=fill)).double()


@pytest.mark.parametrize("fill", ["zero", "noise"])
def test_masking_really_masks(fill):
    model = tiny_hinge(fill)
    with torch.no_grad():  # a non-trivial modulation, so the test covers the conditioned path
        for mod in model.layer_mods:
            mod.proj.weight.normal_(0, 0.05)
    x0 = torch.rand(6, 20, dtype=torch.float64) * 4
    t = torch.full((6,), 6)
    ranks = random_ranks(x0, torch.Generator().manual_seed(2))
    noise = torch.randn(6, 20, dtype=torch.float64) if fill == "noise" else None
    image = torch.randn(6, 5, dtype=torch.float64)

    def predict(x):
        c = corrupt(x, t, model.schedule, ranks, noise)
        return model(c.values, c.visible, c.t, image), c.visible

    base, visible = predict(x0)
    changed_hidden = torch.where(visible, x0, x0 + 3)
    torch.testing.assert_close(predict(changed_hidden)[0], base, rtol=0, atol=0)
    changed_visible = torch.where(visible, x0 + 3, x0)
    assert (predict(changed_visible)[0] - base).abs().max() > 1e-6


def test_hidden_tokens_are_not_attended_in_the_first_half():
    cfg = load_config("tiny").model
    torch.manual_seed(0)
    bb = Backbone(cfg, 30).double()
    ids = torch.arange(1, 21).expand(3, -1)
    visible = torch.rand(3, 20) < 0.5
    values = torch.rand(3, 20, dtype=torch.float64)
    other = torch.where(visible, values, values + 5)

    def first_layer(v):
        h = bb.embed(ids, v, visible)
        mask = torch.cat([torch.ones(3, 1, dtype=torch.bool), visible], 1).double()
        return bb.layers[0](h, mask, 20**-0.5)[:, 1:][visible]

    torch.testing.assert_close(first_layer(other), first_layer(values), rtol=0, atol=1e-12)
    assert (bb(ids, other, visible) - bb(ids, values, visible)).abs().max() > 1e-6  # later layers do attend


def test_unknown_fill_is_a_user_error():
    with pytest.raises(HingeError):
        tiny_hinge("gaussian")
