"""The HER2ST benchmark's baselines and results table, on small synthetic arrays."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "her2st"))

import baselines  # noqa: E402
import benchmark  # noqa: E402
import machine  # noqa: E402
import ridge  # noqa: E402

from hinge_cli.data.expression import Transform  # noqa: E402
from hinge_cli.predict.ridge import GAUSSIAN_Q95  # noqa: E402


def sections(n_sections: int = 3, n: int = 120, d: int = 6, g: int = 4, nonlinear: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, g))
    out = []
    for _ in range(n_sections + 1):
        x = rng.normal(size=(n, d))
        signal = np.tanh(x @ w) * 2 if nonlinear else x @ w
        depth = np.exp(rng.normal(8, 0.3, size=n))  # total counts, ~3,000 per spot
        out.append((x, signal + 0.1 * rng.normal(size=(n, g)), depth))
    return out[:-1], out[-1]


def per_gene_r(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])])


def test_train_mean_predicts_the_training_mean_everywhere():
    train, (x, _, _) = sections()
    pred, info = baselines.train_mean(train, x)
    assert pred.shape == (len(x), 4) and info == {}
    np.testing.assert_allclose(pred, np.broadcast_to(np.concatenate([y for _, y, _ in train]).mean(0), pred.shape))


def test_ridge_recovers_a_linear_signal_and_reports_its_penalty():
    train, (x, y, _) = sections()
    pred, info = baselines.ridge(train, x)
    assert per_gene_r(pred, y).min() > 0.99
    assert info["lambda"] in ridge.LAMBDAS
    assert info["inner_depth_partial"] > 0.95


def test_ridge_spread_is_the_out_of_fold_residual_std_and_makes_a_gaussian_prediction():
    train, (x, y, _) = sections()
    _, info = baselines.ridge(train, x)
    xs, ys = [s[0] for s in train], [s[1] for s in train]
    held = []
    for i in range(len(xs)):  # every training section predicted by a fit on the others, by hand
        model = ridge.fit_ridge(np.concatenate(xs[:i] + xs[i + 1:]), np.concatenate(ys[:i] + ys[i + 1:]), info["lambda"])
        held.append(ys[i] - ridge.predict_ridge(model, xs[i]))
    np.testing.assert_allclose(info["residual_std"], np.concatenate(held).std(0), rtol=0.05)  # residual means are ~0
    inputs = benchmark.BaselineInputs(train, [f"s{i}" for i in range(len(x))], x, np.zeros((len(x), 2)), Transform("total"))
    around_zero, _ = benchmark.run_baseline("ridge", inputs, "test", ["a", "b", "c", "d"], n_draws=400)
    assert around_zero.draws.min() == 0 and around_zero.q05.min() == 0  # censored at the model space's floor
    lifted = [(xs, ys + 10, depth) for xs, ys, depth in train]  # levels the floor never reaches: the plain Gaussian
    pred, _ = benchmark.run_baseline("ridge", replace(inputs, train=lifted), "test", ["a", "b", "c", "d"], n_draws=400)
    np.testing.assert_allclose(pred.q95 - pred.values, GAUSSIAN_Q95 * pred.std, rtol=1e-5, atol=1e-6)  # float32 values near 10
    targets, depth = np.concatenate([y for _, y, _ in lifted]), np.concatenate([d for _, _, d in lifted])
    rate_std = np.sqrt(Transform("total").less_count_noise(np.square(info["residual_std"]), targets, depth))
    assert (rate_std < np.asarray(info["residual_std"])).all()  # the training spots' count noise came off the spread
    np.testing.assert_allclose(pred.draws.std(1).mean(0), rate_std, rtol=0.1)
    assert pred.draws.shape == (len(x), 400, 4) and pred.transform == Transform("total")  # scored in the inputs' space


def test_mlp_learns_a_nonlinear_signal_from_training_sections_only():
    train, (x, y, _) = sections(nonlinear=True)
    pred, info = baselines.mlp(train, x, max_epochs=150, patience=20)
    assert pred.shape == y.shape
    assert per_gene_r(pred, y).mean() > 0.9
    assert 1 <= info["epochs"] <= 150


def fold_numbers(partial: float | None, mse: float, seconds: float) -> dict:
    """One fold's scores as the benchmark stores them: `hinge eval`'s metric table by key, and the wall time."""
    return {"correlation.depth_partial.pearson.mean": partial, "errors.mse": mse, "seconds": seconds}


def test_summary_is_mean_and_std_over_folds_and_skips_undefined_values():
    results = {"hvg50": {"ridge": {"C2": [fold_numbers(0.4, 1.0, 2)], "C3": [fold_numbers(0.6, 3.0, 4)]},
                         "train-mean": {"C2": [fold_numbers(None, 2.0, 0)], "C3": [fold_numbers(None, 4.0, 0)]}}}
    summary = benchmark.summarise(results)
    partial = summary["hvg50"]["ridge"]["correlation.depth_partial.pearson.mean"]
    assert partial["mean"] == pytest.approx(0.5) and partial["std"] == pytest.approx(0.1)
    assert partial["folds"] == {"C2": 0.4, "C3": 0.6} and partial["seed_std"] is None
    assert summary["hvg50"]["train-mean"]["correlation.depth_partial.pearson.mean"]["mean"] is None
    assert summary["hvg50"]["train-mean"]["errors.mse"]["mean"] == pytest.approx(3.0)


def test_seeds_are_averaged_within_a_fold_and_their_spread_is_over_fold_means():
    # seed 0: folds 0.2, 0.4 (mean 0.3); seed 1: folds 0.4, 0.6 (mean 0.5)
    results = {"hvg50": {"hinge": {"C2": [fold_numbers(0.2, 1.0, 2), fold_numbers(0.4, 1.0, 2)],
                                   "C3": [fold_numbers(0.4, 1.0, 2), fold_numbers(0.6, 1.0, 2)]}}}
    partial = benchmark.summarise(results)["hvg50"]["hinge"]["correlation.depth_partial.pearson.mean"]
    assert partial["folds"] == {"C2": pytest.approx(0.3), "C3": pytest.approx(0.5)}
    assert partial["mean"] == pytest.approx(0.4) and partial["std"] == pytest.approx(0.1)
    assert partial["seed_std"] == pytest.approx(0.1)


def test_paired_lines_give_each_hinge_method_minus_ridge_per_fold():
    results = {"hvg50": {"ridge": {"C2": [fold_numbers(0.4, 1.0, 2)], "C3": [fold_numbers(0.6, 1.0, 2)]},
                         "hinge": {"C2": [fold_numbers(0.5, 1.0, 2)], "C3": [fold_numbers(0.5, 1.0, 2)]}}}
    lines = benchmark.paired_lines(benchmark.summarise(results)["hvg50"])
    assert lines[-1] == "- `hinge`: +0.000 (C2 +0.100, C3 -0.100)"


def test_every_ablation_changes_the_default_config():
    s = benchmark.Settings(Path("."), Path("."), benchmark.load_config("small", None, {}), ("C2",), benchmark.PANELS[:1], 1, 5,
                           [], False)
    default = s.variant_config("hinge")
    for method in ("hinge-paper", "hinge-curriculum-flip", "hinge-revealed", "hinge-no-direct", "hinge-mse"):
        assert s.variant_config(method) != default, method
    assert s.variant_config("hinge-no-direct").model.direct_path is False
    assert s.variant_config("hinge-curriculum-flip").warmup.epochs != default.warmup.epochs
    assert not benchmark.HINGE_VARIANTS["hinge-random"].pretrained
    assert s.variant_config("hinge-mse").diffusion.likelihood == "mse" != default.diffusion.likelihood


def test_the_default_grid_leaves_out_the_opt_in_methods_which_methods_can_name(tmp_path: Path):
    for name in ("patient_c.csv", "corpus.txt"):
        (tmp_path / name).write_text("")
    default = benchmark.settings(["--data", str(tmp_path)]).panels[0].methods
    assert "hinge-mse" not in default and {"ridge", "hinge", "hinge-paper", "hinge-no-direct"} <= set(default)
    assert benchmark.settings(["--data", str(tmp_path), "--methods", "ridge,hinge-mse"]).panels[0].methods == ("ridge", "hinge-mse")


def test_markdown_bolds_the_best_mean_and_shows_only_errors_of_the_training_mean(tmp_path: Path):
    results = {"hvg50": {"ridge": {"C2": [fold_numbers(0.4, 1.0, 2)], "C3": [fold_numbers(0.6, 3.0, 4)]},
                         "train-mean": {"C2": [fold_numbers(0.9, 2.0, 0)], "C3": [fold_numbers(0.9, 4.0, 0)]}}}
    panel = benchmark.Panel("hvg50", 50, "hvg", ("train-mean", "ridge"))
    s = benchmark.Settings(tmp_path, tmp_path, benchmark.load_config("tiny", None, {}), ("C2", "C3"), (panel,), 4, 10, [], False,
                           {"pre-training": 12.0})
    table = benchmark.markdown(benchmark.summarise(results), s)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["depth-partial Pearson (headline)"].endswith("| — | **0.500 ± 0.100** |")
    assert rows["MSE"].endswith("| 3.000 ± 1.000 | **2.000 ± 1.000** |")  # lower is better
    assert "| metric | train-mean | ridge |" in table
    assert "- pre-training: 12 s" in table


def test_others_busy_is_the_machines_busy_time_less_this_processs_own_per_second_of_wall_time():
    before, after = machine.CpuSnapshot(100.0, 10.0, 0.0), machine.CpuSnapshot(130.0, 25.0, 10.0)
    assert machine.others_busy(before, after) == pytest.approx(1.5)  # 30 CPU-s busy, 15 of them ours, over 10 s
    assert machine.others_busy(before, machine.CpuSnapshot(110.0, 25.0, 10.0)) == 0.0  # tick rounding never goes negative
    assert machine.others_busy(None, after) is None and machine.others_busy(after, before) is None


def test_a_cpu_snapshot_counts_busy_ticks_but_not_idle_or_iowait(tmp_path: Path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 7 50 1000 20 5 3 2 0 0\ncpu0 50 3 25 500 10 2 1 1 0 0\n")
    snapshot = machine.CpuSnapshot.now(stat)
    assert snapshot.busy_s == pytest.approx((100 + 7 + 50 + 5 + 3 + 2) / os.sysconf("SC_CLK_TCK"))
    assert machine.CpuSnapshot.now(tmp_path / "absent") is None


def test_the_load_is_weighted_by_each_runs_seconds_and_the_table_flags_a_shared_machine(tmp_path: Path):
    runs = [{"seconds": 10.0, "others_busy": 1.0}, {"seconds": 30.0, "others_busy": 0.0}, {"seconds": 5.0}]
    assert machine.mean_busy(runs) == pytest.approx(0.25)
    assert machine.mean_busy([{"seconds": 5.0, "others_busy": None}]) is None
    panel = benchmark.Panel("hvg50", 50, "hvg", ("ridge",))
    s = benchmark.Settings(tmp_path, tmp_path, benchmark.load_config("tiny", None, {}), ("C2",), (panel,), 4, 10, [], False)
    results = {"hvg50": {"ridge": {"C2": [fold_numbers(0.4, 1.0, 2)]}}}
    assert "CPUs busy" not in benchmark.markdown(benchmark.summarise(results), s)
    for busy, verdict in ((0.25, "read high"), (0.01, "the benchmark's own")):
        table = benchmark.markdown(benchmark.summarise(results), replace(s, others_busy=busy))
        assert f"Other processes kept {busy:.2f} of the" in table and verdict in table
