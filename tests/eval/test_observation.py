"""The observation model in eval: a prediction of normalised expression meets a measured value through count noise
at that spot's own depth, so its calibration holds at 100 UMI per spot as at 10,000."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from hinge_cli.data.expression import NO_COUNTS, PLAIN, POISSON, Transform, expression_unit, read_truth
from hinge_cli.errors import HingeError
from hinge_cli.eval import observation, score_slide
from hinge_cli.eval.align import Aligned, Prediction, align, read_prediction
from hinge_cli.eval.probabilistic import Calibration, score_calibration
from hinge_cli.eval.proper_scores import coverage_std

UNITS = Transform.of("total")


def model_world(depth: float, n: int = 1500, genes: int = 12, draws: int = 63, seed: int = 11) -> tuple[Aligned, np.ndarray]:
    """Predicted rate draws and a truth counted from one more draw of the same distribution at `depth` UMI per spot
    (seeded apart from eval's fixed PIT seed, 0, whose tie-breaking draws would otherwise follow these)."""
    rng = np.random.default_rng(seed)
    log_rate = rng.uniform(math.log(2e-3), math.log(6e-2), (n, 1, genes))
    rates = np.exp(log_rate + 0.35 * rng.standard_normal((n, draws + 1, genes)))
    predicted = np.log1p(rates[:, :draws] * 1e4).astype(np.float32)
    totals = np.full(n, depth)
    counts = rng.poisson(rates[:, draws] * depth).astype(np.float64)
    aligned = Aligned("s", [f"G{j}" for j in range(genes)], predicted.mean(1), predicted.std(1), counts, totals, np.zeros((n, 2)), 1.0,
                      {}, {}, draws=predicted)
    return aligned, UNITS.apply(counts, totals).astype(np.float64)


@pytest.mark.parametrize("depth", [100.0, 10_000.0])
def test_coverage_through_the_observation_model_holds_at_any_depth(depth: float) -> None:
    aligned, truth = model_world(depth)
    scored = score_calibration(aligned, truth, UNITS)
    assert scored is not None and scored.calibration.observation == POISSON
    assert abs(scored.calibration.within_1std - 0.683) <= 0.03
    assert abs(scored.calibration.within_90_interval - 0.90) <= 0.03
    plain = coverage_std(aligned.pred, aligned.std, truth, 1.0)
    if depth == 100.0:
        assert plain < 0.45  # the rate's own spread ignores counting noise, which dominates at 100 UMI


def test_count_units_are_scored_plainly() -> None:
    aligned, truth = model_world(10_000.0, n=200)
    scored = score_calibration(aligned, truth, Transform("none"))
    assert scored is not None and scored.calibration.observation == PLAIN
    assert Calibration(0.5, 0.9).observation == PLAIN  # metrics.json of earlier versions read as plain


def test_normalised_units_round_trip_to_counts() -> None:
    counts = np.array([[0.0, 3.0, 97.0], [10.0, 0.0, 590.0]])
    totals = counts.sum(1)
    values = UNITS.apply(counts, totals)
    np.testing.assert_allclose(values, np.log1p(counts / totals[:, None] * 1e4), rtol=1e-6)  # scanpy's normalize_total + log1p
    rates = np.expm1(values.astype(np.float64)) / 1e4
    np.testing.assert_allclose(rates * totals[:, None], counts, atol=1e-3)
    assert expression_unit(**UNITS.to_dict()) == "ln(counts per 10000 + 1)"
    assert expression_unit(**Transform.of("none").to_dict()) == "log2(counts + 1)"


def test_observed_draws_count_at_each_spots_depth() -> None:
    draws = np.full((2, 4000, 1), math.log1p(0.01 * 1e4), np.float32)  # a rate of 1% of the spot's counts
    out = observation.observed_draws(draws, UNITS, np.array([100.0, 10_000.0]), np.random.default_rng(0))
    counts = np.expm1(out.astype(np.float64)) * np.array([100.0, 10_000.0])[:, None, None] / 1e4
    np.testing.assert_allclose(counts.mean(1).ravel(), [1.0, 100.0], rtol=0.05)  # Poisson means rate x depth
    np.testing.assert_allclose(counts.var(1).ravel(), [1.0, 100.0], rtol=0.1)


def test_predictions_beyond_what_the_units_hold_are_read_at_the_ceiling() -> None:
    """A model far outside its training data can predict 1e5 in ln(CP10k + 1): eval reads it as all of a spot's counts
    (a gene takes at most all of them) rather than overflowing, and still scores the slide."""
    absurd = np.array([[1e5, -1e5, 3.0]])
    np.testing.assert_allclose(UNITS.linear(absurd), [[1e4, 0.0, math.e**3 - 1]])
    assert np.isfinite(Transform.of("none").linear(absurd)).all()
    counts = observation.observed_draws(np.full((4, 3, 2), 1e5, np.float32), UNITS, np.full(4, 500.0), np.random.default_rng(0))
    whole = UNITS.apply(np.array([[500.0]]), np.array([500.0]))[0, 0]  # all 500 of the spot's counts
    assert np.isfinite(counts).all() and np.abs(counts - whole).max() < 0.3  # Poisson around the whole spot


def test_a_file_without_units_reads_as_log2_counts_with_a_note(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    adata = ad.AnnData(X=np.ones((3, 2), np.float32), obs=pd.DataFrame(index=["a", "b", "c"]), var=pd.DataFrame(index=["G0", "G1"]))
    adata.obsm["spatial"] = np.zeros((3, 2))
    adata.write_h5ad(tmp_path / "old.h5ad")
    with caplog.at_level(logging.WARNING):
        pred = read_prediction(tmp_path / "old.h5ad")
    assert pred.transform == Transform("none") and "does not record its units" in caplog.text


@pytest.mark.parametrize(("value", "depth"), [(2.5, 800.0), (5.0, 10_000.0)])  # about 1 count expected (summed), 147 (delta method)
def test_count_noise_variance_matches_poisson_counting(value: float, depth: float) -> None:
    """The variance the spread calibration sets beside the spread, against simulated counting."""
    rng = np.random.default_rng(3)
    rate = np.expm1(value) / 1e4
    counted = UNITS.apply(rng.poisson(rate * depth, (40000, 1)), np.full(40000, depth))
    assert UNITS.count_noise_variance(np.array([[value]]), np.array([[depth]]))[0, 0] == pytest.approx(counted.var(), rel=0.05)
    assert Transform.of("none").count_noise_variance(np.array([[value]]), np.array([[depth]]))[0, 0] == 0.0


def _section(n: int = 80, genes: int = 30, seed: int = 5) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Raw counts of a measured section (spot depths 300-6000), its spot and gene names."""
    rng = np.random.default_rng(seed)
    rates = rng.dirichlet(np.full(genes, 0.5), n)
    counts = rng.poisson(rates * rng.uniform(300, 6000, (n, 1))).astype(np.float32)
    return counts, pd.DataFrame(index=[f"s{i}" for i in range(n)]), pd.DataFrame(index=[f"G{j}" for j in range(genes)])


def _write(path, x: np.ndarray, obs: pd.DataFrame, var: pd.DataFrame):
    adata = ad.AnnData(X=x.astype(np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = np.c_[np.arange(len(obs)) * 100.0, np.zeros(len(obs))]
    adata.write_h5ad(path)
    return path


def _predicting(obs: pd.DataFrame, var: pd.DataFrame, transform: Transform, seed: int = 6) -> Prediction:
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.5, 6.0, (len(obs), len(var))).astype(np.float32)
    return Prediction(Path("pred.h5ad"), "s", list(obs.index), list(var.index), values, np.full(values.shape, 0.8, np.float32),
                      np.c_[np.arange(len(obs)) * 100.0, np.zeros(len(obs))], transform, spot_diameter=50.0)


def test_a_truth_of_normalised_expression_is_scored_plainly_with_a_warning(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    counts, obs, var = _section()
    normalised = UNITS.apply(counts, counts.sum(1))  # what scanpy's normalize_total + log1p writes
    path = _write(tmp_path / "normalised.h5ad", normalised, obs, var)
    with caplog.at_level(logging.WARNING):
        truth = read_truth(path)
    assert not truth.raw and np.allclose(truth.totals, 1e4) and "holds normalised expression (ln" in caplog.text
    scored = score_slide(align(_predicting(obs, var, UNITS), truth, truth_path=path), UNITS)
    np.testing.assert_allclose(scored.truth, normalised, atol=1e-4)  # the truth in the prediction's units is the file's values
    assert scored.metrics.calibration.observation == NO_COUNTS
    correlation = scored.metrics.correlation
    assert correlation.depth_partial.pearson.mean == pytest.approx(correlation.model.pearson.mean, abs=1e-9)  # no depth to partial out
    with pytest.raises(HingeError, match="holds normalised expression but .* log counts at the training data's depth"):
        align(_predicting(obs, var, Transform.of("none")), truth, truth_path=path)


def test_counts_that_are_not_whole_numbers_are_warned_and_counted(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    counts, obs, var = _section()
    corrected = counts * 0.93 + 0.01  # ambient RNA taken out: fractional counts
    path = _write(tmp_path / "corrected.h5ad", corrected, obs, var)
    with caplog.at_level(logging.WARNING):
        truth = read_truth(path)
    assert truth.raw and "not whole numbers" in caplog.text
    np.testing.assert_allclose(truth.totals, corrected.sum(1), rtol=1e-5)
    assert score_slide(align(_predicting(obs, var, UNITS), truth, truth_path=path), UNITS).metrics.calibration.observation == POISSON


def test_a_truth_that_is_neither_counts_nor_normalised_expression_is_refused(tmp_path) -> None:
    counts, obs, var = _section()
    with pytest.raises(HingeError, match="neither raw counts nor ln or log2 of counts per 10,000"):
        read_truth(_write(tmp_path / "log.h5ad", np.log1p(counts), obs, var))  # log counts, not normalised first
    with pytest.raises(HingeError, match="negative or non-finite values"):
        read_truth(_write(tmp_path / "scaled.h5ad", counts - counts.mean(0), obs, var))
    assert read_truth(_write(tmp_path / "raw.h5ad", counts, obs, var)).raw
