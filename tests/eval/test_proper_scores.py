"""Proper scores and calibration checks against values worked out by hand on tiny arrays."""

from __future__ import annotations

import numpy as np
import pytest

from hinge_cli.eval import proper_scores
from hinge_cli.eval.proper_scores import (
    coverage_interval,
    coverage_std,
    crps_from_samples,
    crps_gaussian,
    energy_score,
    pit_gaussian,
    pit_histogram,
    pit_values,
)


def test_sample_crps_by_hand() -> None:
    # draws [0, 2] at y = 3: E|X - y| = (3 + 1) / 2, E|X - X'| over the two distinct (ordered) pairs = (2 + 2) / 2
    assert crps_from_samples(np.array([[[0.0], [2.0]]]), np.array([[3.0]])) == pytest.approx(2.0 - 1.0)
    # draws [0, 1, 3] at y = 3: E|X - y| = (3 + 2 + 0) / 3, E|X - X'| = 2 (1 + 3 + 2) / 6
    draws = np.array([[[3.0, 5.0], [0.0, 5.0], [1.0, 5.0]]])
    scores = crps_from_samples(draws, np.array([[3.0, 4.0]]))
    np.testing.assert_allclose(scores, [[5 / 3 - 6 / 6, 1.0]])  # a single repeated draw scores its absolute error
    assert crps_from_samples(np.array([[[2.0]]]), np.array([[3.5]])) == pytest.approx(1.5)  # one draw: a point


def test_sample_crps_matches_the_pairwise_definition_and_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    draws, truth = rng.normal(size=(7, 5, 3)).astype(np.float32), rng.normal(size=(7, 3))
    d = draws.astype(np.float64)
    pairwise = np.abs(d[:, :, None, :] - d[:, None, :, :]).sum((1, 2)) / (5 * 4)  # the diagonal is 0
    expected = np.abs(d - truth[:, None, :]).mean(1) - 0.5 * pairwise
    np.testing.assert_allclose(crps_from_samples(draws, truth), expected, atol=1e-12)
    monkeypatch.setattr(proper_scores, "CHUNK_ELEMENTS", 16)  # one or two spots a chunk
    np.testing.assert_allclose(crps_from_samples(draws, truth), expected, atol=1e-12)
    np.testing.assert_allclose(energy_score(draws[:, :, :1], truth[:, :1]), expected[:, 0], atol=1e-12)


def test_gaussian_crps_closed_form() -> None:
    assert crps_gaussian(np.array(0.0), np.array(1.0), np.array(0.0)) == pytest.approx((np.sqrt(2) - 1) / np.sqrt(np.pi))
    np.testing.assert_allclose(crps_gaussian(np.array([1.0, 2.0]), np.zeros(2), np.array([4.0, 0.5])), [3.0, 1.5])
    tiny = crps_gaussian(np.array([1.0]), np.array([1e-9]), np.array([4.0]))
    assert tiny[0] == pytest.approx(3.0)  # std -> 0 is the absolute error
    rng = np.random.default_rng(1)
    draws = rng.normal(0.5, 2.0, size=(1, 20000, 1))
    estimate = crps_from_samples(draws, np.array([[1.7]]))[0, 0]
    assert crps_gaussian(np.array(0.5), np.array(2.0), np.array(1.7)) == pytest.approx(estimate, rel=0.02)


def test_energy_score_in_two_dimensions_by_hand() -> None:
    # draws (0, 0) and (3, 4) at y = (0, 4): distances to y are 4 and 3, between the two distinct draws 5
    draws = np.array([[[0.0, 0.0], [3.0, 4.0]]])
    assert energy_score(draws, np.array([[0.0, 4.0]])) == pytest.approx(3.5 - 0.5 * 5.0)


def test_sample_scores_do_not_depend_on_the_number_of_draws() -> None:
    """Draws from the forecast N(0, 1) of a truth from N(0, 1): whether 2 or 32 draws are taken, the mean CRPS is the
    closed form's expectation, 1/√π ≈ 0.564 (averaging over all S² pairs would add 1/(S√π): 0.28 at S = 2); likewise
    the energy score of one gene."""
    rng = np.random.default_rng(4)
    truth = rng.normal(size=(40000, 1))
    closed = 1 / np.sqrt(np.pi)
    assert crps_gaussian(np.zeros(40000), np.ones(40000), truth[:, 0]).mean() == pytest.approx(closed, abs=0.01)
    for n_draws in (2, 32):
        draws = rng.normal(size=(40000, n_draws, 1))
        assert crps_from_samples(draws, truth).mean() == pytest.approx(closed, abs=0.01)
        assert energy_score(draws, truth).mean() == pytest.approx(closed, abs=0.01)


def test_energy_score_rewards_gene_dependence() -> None:
    """Two genes that always move together: draws that keep the link beat draws with the same marginals that break it."""
    rng = np.random.default_rng(2)
    truth = np.repeat(rng.normal(size=(2000, 1)), 2, axis=1)
    linked = np.repeat(rng.normal(size=(2000, 16, 1)), 2, axis=2)
    independent = rng.normal(size=(2000, 16, 2))
    assert energy_score(linked, truth).mean() < energy_score(independent, truth).mean() - 0.02
    np.testing.assert_allclose(crps_from_samples(linked, truth).mean(), crps_from_samples(independent, truth).mean(), atol=0.03)


def test_pit_ranks_and_ties() -> None:
    rng = np.random.default_rng(3)
    pit = pit_values(np.repeat(np.array([[[0.0], [2.0]]]), 500, axis=0), np.ones((500, 1)), rng)
    assert pit.min() >= 1 / 3 and pit.max() <= 2 / 3  # one draw below, none equal: rank 1 of {0, 1, 2}
    ties = pit_values(np.zeros((4000, 3, 1)), np.zeros((4000, 1)), rng)
    assert ties.min() >= 0 and ties.max() <= 1
    np.testing.assert_allclose(pit_histogram(ties), np.full(10, 0.1), atol=0.02)  # all tied: spread evenly
    above = pit_values(np.zeros((100, 3, 1)), np.full((100, 1), 5.0), rng)
    assert above.min() >= 3 / 4 and above.max() <= 1  # every draw below: the top rank


def test_pit_is_uniform_when_well_specified() -> None:
    rng = np.random.default_rng(4)
    mean, std = rng.normal(size=(3000, 4)), rng.uniform(0.5, 2.0, size=(3000, 4))
    truth = rng.normal(mean, std)
    np.testing.assert_allclose(pit_histogram(pit_gaussian(mean, std, truth, rng)), np.full(10, 0.1), atol=0.015)
    draws = rng.normal(mean[:, None, :], std[:, None, :], size=(3000, 9, 4))
    np.testing.assert_allclose(pit_histogram(pit_values(draws, truth, rng)), np.full(10, 0.1), atol=0.015)
    narrow = pit_histogram(pit_gaussian(mean, std / 3, truth, rng))
    assert narrow[0] + narrow[-1] > 0.5  # too narrow: a U
    wide = pit_histogram(pit_gaussian(mean, std * 3, truth, rng))
    assert wide[4] + wide[5] > 0.35 and wide[0] + wide[-1] < 0.05  # too wide: a hump


def test_gaussian_pit_without_spread() -> None:
    pit = pit_gaussian(np.zeros(3), np.zeros(3), np.array([-1.0, 1.0, 0.0]), np.random.default_rng(5))
    assert pit[0] == 0.0 and pit[1] == 1.0 and 0.0 <= pit[2] <= 1.0


def test_coverage_of_a_known_case() -> None:
    mean, std = np.zeros((2, 2)), np.ones((2, 2))
    truth = np.array([[0.5, 1.5], [2.5, np.nan]])
    assert coverage_std(mean, std, truth, 1.0) == pytest.approx(1 / 3)  # the NaN is left out
    assert coverage_std(mean, std, truth, 2.0) == pytest.approx(2 / 3)
    np.testing.assert_allclose(coverage_std(mean, std, truth, 1.0, axis=0), [0.5, 0.0])
    assert coverage_interval(np.full((2, 2), -1.0), np.full((2, 2), 2.0), truth) == pytest.approx(2 / 3)
    assert coverage_interval(np.array([0.0]), np.array([1.0]), np.array([1.0])) == 1.0  # the bounds are inside
    assert np.isnan(coverage_std(np.zeros(1), np.ones(1), np.array([np.nan])))
