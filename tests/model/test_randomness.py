"""The counter-based generator: a pure function of (seed, stream, spot, sample, gene), and the right distributions."""

import numpy as np
import pytest
import torch
from scipy import stats

from hinge_cli.model.randomness import (
    FILL_STREAM,
    ORDER_STREAM,
    REVEAL_STREAM,
    RIDGE_STREAM,
    normals,
    spot_randomness,
    uniforms,
)

N, G = 3, 7


def rows_of(draws: np.ndarray, position: int) -> np.ndarray:
    """The n_samples rows of the spot at `position` in the batch (rows are spot-major)."""
    return draws[position * N : (position + 1) * N]


@pytest.mark.parametrize("draw", [uniforms, normals])
def test_a_spot_draws_the_same_whatever_else_is_in_the_batch(draw) -> None:
    alone = draw(11, [5], N, G, stream=2)
    for batch in ([5, 0, 1], [9, 3, 5], [5], [7, 5, 6, 1000]):
        together = draw(11, np.array(batch), N, G, stream=2)
        assert together.shape == (len(batch) * N, G) and together.dtype == np.float64
        np.testing.assert_array_equal(rows_of(together, batch.index(5)), alone)
    assert np.array_equal(draw(11, torch.tensor([5]), N, G, 2), alone)  # a tensor of indices works the same


@pytest.mark.parametrize("draw", [uniforms, normals])
def test_seeds_spots_samples_genes_and_streams_all_change_the_draws(draw) -> None:
    base = draw(0, [4], N, G, stream=1)
    others = [draw(1, [4], N, G, 1), draw(0, [5], N, G, 1), draw(0, [4], N, G, 2), draw(-1, [4], N, G, 1)]
    for other in others:
        assert not np.isclose(other, base).any()
    assert len(np.unique(base)) == base.size  # no two samples or genes share a draw
    np.testing.assert_array_equal(draw(0, [4], N + 2, G + 1, 1)[:N, :G], base)  # more samples or genes extend, not reshuffle


def test_the_streams_are_distinct_constants() -> None:
    assert len({ORDER_STREAM, FILL_STREAM, REVEAL_STREAM, RIDGE_STREAM}) == 4


def test_uniforms_are_uniform_and_strictly_inside_the_unit_interval() -> None:
    draws = uniforms(3, np.arange(500), 20, 10, stream=ORDER_STREAM).ravel()  # 100k draws
    assert 0 < draws.min() and draws.max() < 1
    assert abs(draws.mean() - 0.5) < 0.005 and abs(draws.var() - 1 / 12) < 0.002
    assert stats.kstest(draws, "uniform").pvalue > 1e-3
    assert np.all(np.modf(draws * 2.0**53)[0] == 0)  # on the 53-bit grid


def test_normals_are_standard_normal_and_independent_across_streams() -> None:
    fill = normals(3, np.arange(500), 20, 10, stream=FILL_STREAM).ravel()
    reveal = normals(3, np.arange(500), 20, 10, stream=REVEAL_STREAM).ravel()
    for draws in (fill, reveal):
        assert abs(draws.mean()) < 0.015 and abs(draws.std() - 1) < 0.015
        assert abs(stats.skew(draws)) < 0.03 and abs(stats.kurtosis(draws)) < 0.06
        assert stats.kstest(draws, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(fill, reveal)[0, 1]) < 0.015
    assert abs(np.corrcoef(fill[:-1], fill[1:])[0, 1]) < 0.015  # neighbouring genes do not move together


def test_spot_randomness_gives_permutation_ranks_and_two_independent_noises() -> None:
    spots = torch.tensor([8, 2, 30])
    ranks, fill, reveal = spot_randomness(spots, 4, N, G)
    assert ranks.shape == fill.shape == reveal.shape == (3 * N, G)
    assert ranks.dtype == torch.long and fill.dtype == reveal.dtype == torch.float64
    assert torch.equal(ranks.sort(dim=1).values, torch.arange(G).expand(3 * N, G))
    keys = torch.from_numpy(uniforms(4, spots, N, G, ORDER_STREAM))
    assert torch.equal(ranks, keys.argsort(dim=1).argsort(dim=1))
    assert torch.equal(fill, torch.from_numpy(normals(4, spots, N, G, FILL_STREAM)))
    assert torch.equal(reveal, torch.from_numpy(normals(4, spots, N, G, REVEAL_STREAM)))
    assert not torch.equal(fill, reveal)
    single = spot_randomness(torch.tensor([2]), 4, N, G)
    for part, alone in zip((ranks, fill, reveal), single, strict=True):
        assert torch.equal(part[N : 2 * N], alone)


def test_ranks_are_uniform_over_orders() -> None:
    ranks, _, _ = spot_randomness(torch.arange(4000), 0, 1, 3)
    orders, counts = np.unique(ranks.numpy(), axis=0, return_counts=True)
    assert len(orders) == 6
    assert stats.chisquare(counts).pvalue > 1e-3


def test_negative_spot_indices_are_refused() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        uniforms(0, [-1], N, G, 1)
