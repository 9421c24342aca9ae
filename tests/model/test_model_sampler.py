"""The reverse process: exact with an oracle, one reveal per gene, seeded, batch-size independent."""

import pytest
import torch
from stand_in import TINY_GENES as G
from stand_in import tiny_hinge as tiny_model

from hinge_cli.config import DiffusionConfig, load_config
from hinge_cli.errors import HingeError
from hinge_cli.model import Hinge, MaskSchedule, sample


def test_oracle_samples_equal_x0():
    s = MaskSchedule(20, G)
    x0 = torch.rand(5, G, dtype=torch.float64)
    out = sample(lambda v, vis, t, img: x0.repeat_interleave(3, 0), torch.zeros(5, 2, dtype=torch.float64), s,
                 n_samples=3, keep_samples=True)
    assert torch.equal(out.samples, x0[:, None].expand(-1, 3, -1))
    torch.testing.assert_close(out.mean, x0, rtol=0, atol=1e-15)  # a mean of equal numbers, up to rounding
    torch.testing.assert_close(out.std, torch.zeros_like(x0), rtol=0, atol=1e-15)


@pytest.mark.parametrize("steps", [None, 7])
def test_every_gene_is_revealed_once_at_its_step(steps):
    s = MaskSchedule(20, G)
    seen = []

    def step_oracle(values, visible, t, image):
        seen.append(visible.clone())
        return t[:, None].to(values.dtype).expand(-1, G)  # "predict" the step number

    out = sample(step_oracle, torch.zeros(4, 1), s, n_samples=2, steps=steps, keep_samples=True)
    grid = s.grid(steps)
    counts = s.hidden_counts
    expected = {t: int(counts[t] - counts[t_next]) for t, t_next in zip(grid[:-1], grid[1:], strict=True) if counts[t] > counts[t_next]}
    for draw in out.samples.flatten(0, 1):
        got = {int(t): int((draw == t).sum()) for t in draw.unique()}
        assert got == expected  # each gene holds the step that revealed it; all revealed
    assert len(seen) == len(expected)
    assert not seen[0].any()
    for before, after in zip(seen[:-1], seen[1:], strict=True):
        assert torch.all(before <= after)  # revealed genes stay revealed


def test_same_seed_same_output_and_seed_matters():
    model = tiny_model()
    image = torch.randn(4, 6)
    a = model.generate(image, n_samples=3, seed=5)
    b = model.generate(image, n_samples=3, seed=5)
    c = model.generate(image, n_samples=3, seed=6)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    assert not torch.equal(a.mean, c.mean)
    assert a.std.abs().sum() > 0  # different orders and noise give a spread


def test_batch_size_independence():
    model = tiny_model()
    image = torch.randn(6, 6)
    whole = model.generate(image, n_samples=2, seed=1)
    parts = [model.generate(image[i:i + 2], n_samples=2, seed=1, spot_index=torch.arange(i, i + 2)) for i in (0, 2, 4)]
    torch.testing.assert_close(torch.cat([p.mean for p in parts]), whole.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p.std for p in parts]), whole.std, rtol=1e-5, atol=1e-5)


def test_generate_restores_training_mode_and_checks_input():
    model = tiny_model().train()
    model.generate(torch.randn(2, 6), n_samples=1)
    assert model.training
    with pytest.raises(HingeError):
        model.generate(torch.randn(2, 6), n_samples=0)
    with pytest.raises(HingeError):
        model.generate(torch.randn(2, 5))


class GaussianToy:
    """A known predictive Gaussian per spot and gene: mean and log-variance from the image feature alone."""

    has_spread = True

    def __init__(self, weights: torch.Tensor):
        self.weights = weights  # (2, G): the mean's and the log-variance's slope on the one image feature

    def __call__(self, values, visible, t, image, spread=False):
        mean, log_var = image[:, :1] * self.weights[0], image[:, :1] * self.weights[1]
        return (mean, log_var) if spread else mean


def test_draws_from_a_known_gaussian_cover_its_truth_at_the_nominal_rate():
    g = torch.Generator().manual_seed(0)
    n, genes = 300, G
    image = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    toy = GaussianToy(torch.stack([torch.linspace(-2, 2, genes), torch.linspace(-1, 1, genes)]).double())
    mean, log_var = toy(None, None, None, image, spread=True)
    truth = mean + torch.exp(0.5 * log_var) * torch.randn(n, genes, generator=g, dtype=torch.float64)
    out = sample(toy, image, MaskSchedule(10, genes), n_samples=64, temperature=1.0)
    error = (truth - out.mean).abs()
    assert abs(float((error <= out.std).double().mean()) - 0.683) < 0.05
    assert abs(float((error <= 2 * out.std).double().mean()) - 0.954) < 0.05
    hot = sample(toy, image, MaskSchedule(10, genes), n_samples=64, temperature=2.0)
    torch.testing.assert_close(hot.std.mean() / out.std.mean(), torch.tensor(2.0, dtype=torch.float64), rtol=0.05, atol=0)


def spread_model():
    """The tiny model with a spread that varies by spot and gene."""
    model = tiny_model()
    with torch.no_grad():
        model.spread.token[-1].weight.normal_(0, 0.3)
        model.spread.condition.weight.normal_(0, 0.3)
    return model


def test_temperature_zero_is_the_mean_reveal_bit_for_bit():
    model = spread_model()
    image = torch.randn(5, 6)
    zero = model.generate(image, n_samples=3, seed=2, temperature=0.0, keep_samples=True)
    hot = model.generate(image, n_samples=3, seed=2, temperature=1.0, keep_samples=True)
    model.spread = None  # the same network without its spread: a mean-revealing sampler
    plain = model.generate(image, n_samples=3, seed=2, temperature=1.0, keep_samples=True)
    assert torch.equal(zero.samples, plain.samples)
    assert not torch.allclose(hot.samples, zero.samples) and hot.std.mean() > zero.std.mean()


def test_drawn_samples_do_not_depend_on_batch_size():
    model = spread_model()
    image = torch.randn(6, 6)
    whole = model.generate(image, n_samples=2, seed=1, temperature=1.0, keep_samples=True)
    parts = [model.generate(image[i:i + 3], n_samples=2, seed=1, temperature=1.0, spot_index=torch.arange(i, i + 3),
                            keep_samples=True) for i in (0, 3)]
    torch.testing.assert_close(torch.cat([p.samples for p in parts]), whole.samples, rtol=1e-5, atol=1e-5)


def test_negative_temperature_is_refused():
    with pytest.raises(HingeError, match="temperature"):
        tiny_model().generate(torch.randn(2, 6), temperature=-1.0)


@pytest.mark.slow
def test_a_trained_spread_head_draws_calibrated_samples_on_a_gaussian_toy():
    """Features -> a known mean and a feature-dependent std: after NLL training, sampled mean ± std covers ~68% of new data."""
    torch.manual_seed(0)
    genes, dim = 4, 3
    g = torch.Generator().manual_seed(1)
    slopes = torch.tensor([[1.0, -0.5, 0.0, 0.3], [0.5, 0.5, -1.0, 0.0], [0.0, 0.2, 0.4, -0.6]])

    def data(n):
        x = torch.randn(n, dim, generator=g)
        std = 0.3 + 0.7 * torch.sigmoid(2 * x[:, :1]).expand(-1, genes)
        return x, x @ slopes + std * torch.randn(n, genes, generator=g)

    x, y = data(4000)
    model = Hinge.build(load_config("tiny").model, genes + 1, torch.arange(1, genes + 1), dim,
                        DiffusionConfig(steps=4, likelihood="gaussian"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(250):
        rows = torch.randint(len(x), (256,), generator=g)
        loss = model.loss(y[rows], x[rows], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    new_x, new_y = data(500)
    out = model.generate(new_x, n_samples=24, temperature=1.0)
    error = (new_y - out.mean).abs()
    assert abs(float((error <= out.std).float().mean()) - 0.683) < 0.05
    assert abs(float((error <= 2 * out.std).float().mean()) - 0.954) < 0.05
