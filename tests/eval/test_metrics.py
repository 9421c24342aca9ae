"""Metric functions against values worked out by hand on arrays small enough to check on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hinge_cli.eval import metrics, proper_scores


def test_pearson_hand_values_constant_and_nan_genes() -> None:
    truth = np.array([[1.0, 2.0, 5.0, 1.0], [2.0, 2.0, 5.0, 2.0], [3.0, 2.0, 5.0, np.nan]])
    pred = np.array([[2.0, 1.0, 1.0, 1.0], [4.0, 2.0, 2.0, 2.0], [6.0, 3.0, 3.0, 3.0]])
    r = metrics.pearson_per_gene(pred, truth)
    assert r[0] == pytest.approx(1.0)
    assert np.isnan(r[1]) and np.isnan(r[2])  # constant truth
    assert np.isnan(r[3])  # NaN in the truth
    anti = metrics.pearson_per_gene(np.array([[1.0], [2.0], [4.0]]), np.array([[3.0], [2.0], [0.0]]))
    assert anti[0] == pytest.approx(-1.0)
    # centred x = (-1, 0, 1), y = (-1, 1, 0): sum xy = 1, sum x² = sum y² = 2, so r = 1/2
    assert metrics.pearson_per_gene(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [3.0], [2.0]]))[0] == pytest.approx(0.5)


def test_rounding_noise_is_constant() -> None:
    """A float32 constant column has rounding spread; it must not correlate at random."""
    pred = np.full((50, 1), np.float32(0.1)) * np.float32(3.0)
    truth = np.arange(50.0)[:, None]
    assert np.isnan(metrics.pearson_per_gene(pred, truth)[0])


def test_spearman_ranks_with_ties() -> None:
    pred = np.array([[1.0], [2.0], [3.0], [100.0]])
    truth = np.array([[10.0], [20.0], [30.0], [40.0]])
    assert metrics.spearman_per_gene(pred, truth)[0] == pytest.approx(1.0)  # monotone but not linear
    assert metrics.pearson_per_gene(pred, truth)[0] < 0.9
    # centred ranks (-1.5, 0, 0, 1.5) and (-1.5, -0.5, 0.5, 1.5): sum xy = 4.5, sum x² = 4.5, sum y² = 5
    tied = metrics.spearman_per_gene(np.array([[1.0], [2.0], [2.0], [3.0]]), truth)[0]
    assert tied == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))


def test_depth_partial_removes_depth_and_flags_depth_only_predictions() -> None:
    rng = np.random.default_rng(0)
    log_depth = rng.normal(size=200)
    signal = rng.normal(size=200)
    truth = np.column_stack([2 * log_depth + signal, 3 * log_depth + rng.normal(size=200)])
    pred = np.column_stack([log_depth + signal, 1.0 + 0.5 * log_depth])  # gene 1: depth only
    raw = metrics.pearson_per_gene(pred, truth)
    partial = metrics.depth_partial_pearson(pred, truth, log_depth)
    assert raw[1] > 0.9  # depth alone looks excellent on raw correlation
    assert partial[0] == pytest.approx(1.0)  # residuals are exactly the shared signal
    assert np.isnan(partial[1])  # residuals of a depth-only prediction are rounding noise
    assert np.isnan(metrics.depth_partial_spearman(pred, truth, log_depth)[1])


def test_errors_and_nan_propagation() -> None:
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    truth = np.array([[0.0, 2.0], [3.0, 6.0]])
    assert metrics.mse(pred, truth) == pytest.approx((1 + 0 + 0 + 4) / 4)
    assert metrics.mae(pred, truth) == pytest.approx((1 + 0 + 0 + 2) / 4)
    assert math.isnan(metrics.mse(np.array([[np.nan]]), np.array([[1.0]])))


def test_summaries_exclude_and_count_nan() -> None:
    r = np.array([0.9, np.nan, 0.1, 0.5, np.nan])
    summary = metrics.summarise_correlations(r, top=np.array([0, 1]), ks=(2, 10))
    assert summary["mean"] == pytest.approx(0.5)
    assert summary["n_excluded"] == 2 and summary["n_genes"] == 5
    assert summary["mean_top_variable"] == pytest.approx(0.9)  # the NaN of gene 1 is left out
    assert summary["pcc_at_2"] == pytest.approx(0.7)
    assert math.isnan(summary["pcc_at_10"])  # panel smaller than k
    assert math.isnan(metrics.finite_mean(np.array([np.nan])))


def test_relative_variance_distance() -> None:
    truth = np.array([[0.0, 0.0, 1.0], [2.0, 4.0, 1.0]])  # variances 1, 4, 0 (constant: left out)
    pred = np.array([[0.0, 0.0, 0.0], [2.0, 2.0, 3.0]])  # variances 1, 1, 1
    rvd, terms = metrics.relative_variance_distance(pred, truth)
    assert terms[0] == 0 and terms[1] == pytest.approx(9 / 16) and np.isnan(terms[2])
    assert rvd == pytest.approx(9 / 32)
    flat, _ = metrics.relative_variance_distance(np.ones_like(truth), truth)
    assert flat == pytest.approx(1.0)  # a prediction without spread scores 1


def test_coexpression_consistency() -> None:
    truth = np.array([[1.0, 2.0, 0.0, 7.0], [2.0, 4.0, 1.0, 7.0], [3.0, 5.0, 0.0, 7.0], [4.0, 9.0, 1.0, 7.0]])
    summary, cp, ct, used = metrics.coexpression(truth * 2 + 1, truth)
    assert list(used) == [0, 1, 2]  # the constant gene 3 has no correlations
    assert summary["consistency"] == pytest.approx(1.0) and summary["mean_abs_diff"] == pytest.approx(0.0)
    assert ct[0, 1] == pytest.approx(metrics.pearson_per_gene(truth[:, :1], truth[:, 1:2])[0])
    # gene 0 and 1 swap roles in the prediction: triangle (r01, r02, r12) becomes (r01, r12, r02)
    swapped, *_ = metrics.coexpression(truth[:, [1, 0, 2]], truth[:, :3])
    a = np.array([ct[0, 1], ct[0, 2], ct[1, 2]])
    b = np.array([ct[0, 1], ct[1, 2], ct[0, 2]])
    assert swapped["consistency"] == pytest.approx(np.corrcoef(a, b)[0, 1])
    assert swapped["mean_abs_diff"] == pytest.approx(np.abs(a - b).mean())


def test_morans_i_hand_values() -> None:
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [11.0, 0.0]])  # two pairs of neighbours
    w = metrics.knn_weights(coords, k=1)
    values = np.array([[1.0, 1.0, 3.0], [1.0, 0.0, 3.0], [0.0, 1.0, 3.0], [0.0, 0.0, 3.0]])
    i = metrics.morans_i(values, w)
    assert i[0] == pytest.approx(1.0)  # neighbours alike
    assert i[1] == pytest.approx(-1.0)  # neighbours opposite
    assert np.isnan(i[2])  # constant


def test_calibration_fractions() -> None:
    pred = np.zeros((4, 1))
    std = np.ones((4, 1))
    truth = np.array([[0.5], [1.5], [-3.0], [np.nan]])
    cal = {f"within_{k}std": proper_scores.coverage_std(pred, std, truth, k) for k in (1, 2)}
    assert cal["within_1std"] == pytest.approx(1 / 3) and cal["within_2std"] == pytest.approx(2 / 3)


def test_cp10k_log() -> None:
    out = metrics.cp10k_log(np.array([[1.0, 0.0]]), np.array([10.0]))
    assert out[0, 0] == pytest.approx(math.log1p(1000.0)) and out[0, 1] == 0
