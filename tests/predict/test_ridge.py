"""The ridge baseline inside the product: fitted by `train`, predicted by `generate --model ridge`, compared by `eval`."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file
from scipy.special import ndtr
from stand_in import tiled_synthetic, write_features
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.data.dataset import SpotTable
from hinge_cli.data.features import FeatureNorm
from hinge_cli.errors import HingeError
from hinge_cli.formats.embeddings import read_embeddings
from hinge_cli.model import load_checkpoint
from hinge_cli.predict.ridge import GAUSSIAN_Q95, PENALTIES, best_penalty, cross_validate, fit_ridge, inner_folds
from hinge_cli.predict.ridge_model import METADATA_KEY, read_ridge_model
from hinge_cli.run.directory import Run
from hinge_cli.stages.generate import Target, generate
from hinge_cli.stages.train import pretrain_warmup, train
from hinge_cli.training.data import card_table, split_rows

pytestmark = pytest.mark.slow  # each trains a model

runner = CliRunner()
FAST = GenerateConfig(n_samples=1, steps=2, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, Path]]:
    """Two training samples, a one-epoch tiny model and its ridge; and each sample's measured spots."""
    run, samples = tiled_synthetic(tmp_path_factory.mktemp("ridge"), "t", 2, 40, size_px=384, mpp=2.0, n_genes=40)
    for i, s in enumerate(samples):
        write_features(run, s.sample_id, i, views=2)
    truths = {s.sample_id: s.spots for s in samples}
    cfg = run.config("tiny")
    cfg.warmup.n_genes, cfg.warmup.epochs, cfg.warmup.val_fraction = 12, 1, 0.2
    cfg.train.epochs = 1
    pretrain_warmup(run, cfg)
    train(run, cfg)
    return run, truths


def test_ridge_inside_train_matches_a_direct_closed_form_solve(trained: tuple[Run, dict[str, Path]]) -> None:
    run, _ = trained
    card = load_checkpoint(run.checkpoint("best")).card
    ridge = read_ridge_model(run.checkpoint("ridge"))
    table = card_table(run, card)
    assert card.refit is not None  # the default refit trains on every spot, and so does the ridge beside it
    rows = np.arange(len(table.targets))
    z = ((table.features[rows] - card.feature_norm.mean) / card.feature_norm.std).mean(1).astype(np.float64)
    y = table.targets[rows].astype(np.float64)
    zc, yc = z - z.mean(0), y - y.mean(0)
    expected = np.linalg.solve(zc.T @ zc + ridge.penalty * len(z) * np.eye(z.shape[1]), zc.T @ yc)
    np.testing.assert_allclose(ridge.weights, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ridge.predict(table.features[rows]), zc @ expected + y.mean(0), atol=1e-5)
    assert ridge.genes == card.genes and ridge.encoder_key == card.encoder_key
    assert ridge.n_spots == len(rows) > len(split_rows(card.split, table)[0]) and ridge.samples == ["t0", "t1"]
    assert ridge.penalty in PENALTIES and ridge.search.folds == "samples" and ridge.search.n_folds == 2


def test_the_penalty_is_the_best_inner_cv_value() -> None:
    rng = np.random.default_rng(0)
    n = 200  # two nearly collinear features and an exact contrast of them: only a small penalty recovers it
    base = rng.normal(size=(n, 1))
    z = np.hstack([base + 0.2 * rng.normal(size=(n, 2)), rng.normal(size=(n, 3))])
    y = (z[:, :1] - 0.8 * z[:, 1:2]) + 0.01 * rng.normal(size=(n, 4))
    exact, _ = cross_validate(z, y, rng.uniform(1000, 20000, n), np.array(["a", "b"] * (n // 2)), seed=0)
    assert exact.folds == "samples" and best_penalty(exact) <= 0.01
    rng = np.random.default_rng(0)
    n = 40  # few spots, nearly as many dimensions, a weak signal: a small penalty overfits
    z = rng.normal(size=(n, 30))
    y = z[:, :3].sum(1, keepdims=True) + 2 * rng.normal(size=(n, 6))
    noisy, _ = cross_validate(z, y, rng.uniform(1000, 20000, n), np.array(["a"] * n), seed=0)
    assert noisy.folds == "spots" and noisy.n_folds == 5 and best_penalty(noisy) >= 1
    assert max(noisy.scores) > noisy.scores[0] + 0.1
    for search in (exact, noisy):
        assert best_penalty(search) == search.penalties[int(np.argmax(search.scores))]


def test_generate_ridge_writes_the_prediction_format(trained: tuple[Run, dict[str, Path]]) -> None:
    run, _ = trained
    generate(run, [Target("t0")], FAST, model="ridge")
    path = run.root / "predictions" / "t0.ridge.h5ad"
    adata = ad.read_h5ad(path)
    ridge = read_ridge_model(run.checkpoint("ridge"))
    features = read_embeddings(run.embeddings("default", "t0"))
    assert list(adata.var_names) == ridge.genes and list(adata.obs_names) == features.barcodes
    assert ridge.norm.per_slide  # the default: each slide's features standardised by its own spots first
    assert "spatial" in adata.obsm and "t0" in adata.uns["spatial"]
    assert adata.obsm["samples"].shape == (adata.n_obs, FAST.n_samples, adata.n_vars)  # draws are kept by default
    assert adata.uns["hinge"]["model"] == "ridge" and adata.uns["hinge"]["penalty"] == ridge.penalty
    np.testing.assert_allclose(adata.layers["std"], np.broadcast_to(ridge.residual_std, adata.shape), rtol=1e-6)
    np.testing.assert_allclose(adata.X, ridge.predict(slide_standardised(features.features)), rtol=1e-5, atol=1e-5)
    assert not run.prediction("t0").exists()  # HINGE's own default file is another one
    assert run.stage("t0", "generate:ridge")["status"] == "ok" and not run.stage("t0", "generate")


def slide_standardised(features: np.ndarray) -> np.ndarray:
    """One slide's features standardised by the direct mean and std over all its spots and views."""
    flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
    return ((features - flat.mean(0)) / np.maximum(flat.std(0), 1e-6)).astype(np.float32)


def out_of_fold_rms(z: np.ndarray, y: np.ndarray, penalty: float, held_out: list[np.ndarray]) -> np.ndarray:
    """Per gene, the root mean square residual of each held-out part under a closed-form solve on the rest."""
    squared = np.zeros(y.shape[1])
    for test in held_out:
        train = np.setdiff1d(np.arange(len(z)), test)
        zt, yt = z[train], y[train]
        zc, yc = zt - zt.mean(0), yt - yt.mean(0)
        weights = np.linalg.solve(zc.T @ zc + penalty * len(zt) * np.eye(z.shape[1]), zc.T @ yc)
        squared += ((y[test] - ((z[test] - zt.mean(0)) @ weights + yt.mean(0))) ** 2).sum(0)
    return np.sqrt(squared / len(z))


def test_the_stored_residual_std_is_the_out_of_fold_one(trained: tuple[Run, dict[str, Path]]) -> None:
    run, _ = trained
    card = load_checkpoint(run.checkpoint("best")).card
    ridge = read_ridge_model(run.checkpoint("ridge"))
    table = card_table(run, card)
    rows = np.arange(len(table.targets))
    z = ((table.features[rows] - card.feature_norm.mean) / card.feature_norm.std).mean(1).astype(np.float64)
    y = table.targets[rows].astype(np.float64)
    samples = np.asarray(table.sample)[rows]
    out_of_fold = out_of_fold_rms(z, y, ridge.penalty, [np.flatnonzero(samples == s) for s in ("t0", "t1")])
    # normalised units: less the count noise of each training spot's depth (at least 1% of the variance kept)
    noise = card.transform.count_noise_variance(np.maximum(z @ ridge.weights + ridge.intercept, 0), table.depth[rows, None]).mean(0)
    expected = np.sqrt(np.maximum(out_of_fold**2 - noise, 0.01 * out_of_fold**2))
    np.testing.assert_allclose(ridge.residual_std, expected, rtol=1e-6)
    assert np.all(ridge.residual_std < out_of_fold) and noise.min() > 0
    assert "leave one sample out" in ridge.residual_source and "less the count noise" in ridge.residual_source


def test_with_one_sample_the_residual_std_comes_from_the_spot_folds() -> None:
    rng = np.random.default_rng(3)
    n, d, g = 60, 4, 3
    features = rng.normal(size=(n, d))
    targets = features @ rng.normal(size=(d, g)) + rng.normal(scale=[0.1, 0.5, 2.0], size=(n, g))
    table = SpotTable(np.array(["only"] * n), [f"s{i}" for i in range(n)], np.zeros((n, 2)), features.astype(np.float32),
                      targets.astype(np.float32), rng.uniform(1000, 5000, n))
    ridge = fit_ridge(table, FeatureNorm(np.zeros(d, np.float32), np.ones(d, np.float32)), ["a", "b", "c"], "k", seed=7)
    held_out, kind = inner_folds(table.sample, 7)
    z, y = features.astype(np.float32).astype(np.float64), targets.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(ridge.residual_std, out_of_fold_rms(z, y, ridge.penalty, held_out), rtol=1e-6)
    assert kind == "spots" and "seeded folds of spots" in ridge.residual_source
    assert ridge.residual_std[0] < ridge.residual_std[1] < ridge.residual_std[2]  # it follows each gene's own noise


def test_ridge_draws_follow_its_gaussian_whatever_the_batch(trained: tuple[Run, dict[str, Path]], tmp_path: Path) -> None:
    run, _ = trained
    many = GenerateConfig(n_samples=400, seed=3, device="cpu", keep_samples=True)
    generate(run, [Target("t0")], many, out=tmp_path / "whole.h5ad", model="ridge")
    adata = ad.read_h5ad(tmp_path / "whole.h5ad")
    mean, std, draws = adata.X, adata.layers["std"], adata.obsm["samples"]
    assert draws.shape == (adata.n_obs, 400, adata.n_vars) and np.all(std > 0)
    # the Gaussian N(mean, std²) censored at the model space's floor, 0: quantiles and draws below it sit at it
    np.testing.assert_allclose(adata.layers["q95"], np.maximum(mean + GAUSSIAN_Q95 * std, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(adata.layers["q05"], np.maximum(mean - GAUSSIAN_Q95 * std, 0), rtol=1e-4, atol=1e-5)
    assert abs(GAUSSIAN_Q95 - 1.6449) < 1e-4
    censored = ndtr(-mean / std)  # each entry's chance of a draw at the floor
    assert draws.min() == 0 and censored.max() > 0.01
    assert abs((draws == 0).mean() - censored.mean()) < 0.01
    clear = mean - 4 * std > 0  # entries the floor leaves alone: their draws are the plain Gaussian's
    z = ((draws - mean[:, None]) / std[:, None])[np.broadcast_to(clear[:, None], draws.shape)]
    assert clear.mean() > 0.2 and abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    inside = (draws >= adata.layers["q05"][:, None]) & (draws <= adata.layers["q95"][:, None])
    assert inside.mean() >= 0.9 - 0.01
    provenance = adata.uns["hinge"]
    assert "out-of-fold" in provenance["residual_std_source"] and provenance["seed"] == 3 and provenance["samples"] == 400
    generate(run, [Target("t0")], replace(many, batch_size=3), out=tmp_path / "batched.h5ad", model="ridge")
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "batched.h5ad").obsm["samples"], draws)
    generate(run, [Target("t0")], replace(many, seed=4), out=tmp_path / "other.h5ad", model="ridge")
    assert not np.allclose(ad.read_h5ad(tmp_path / "other.h5ad").obsm["samples"], draws)


def test_an_old_ridge_file_without_a_residual_std_predicts_a_mean_only(trained: tuple[Run, dict[str, Path]],
                                                                      tmp_path: Path) -> None:
    run = Run(shutil.copytree(trained[0].root, tmp_path / "run"))
    path = run.checkpoint("ridge")
    with safe_open(str(path), framework="np") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        arrays = {k: f.get_tensor(k) for k in f.keys() if k != "residual_std"}  # noqa: SIM118
    del meta["residual_source"]
    save_file(arrays, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    old = read_ridge_model(path)
    assert old.residual_std is None and old.residual_source is None
    generate(run, [Target("t0")], GenerateConfig(n_samples=4, device="cpu", keep_samples=True), out=tmp_path / "old.h5ad",
             model="ridge")
    adata = ad.read_h5ad(tmp_path / "old.h5ad")
    assert not adata.layers and "samples" not in adata.obsm and "residual_std_source" not in adata.uns["hinge"]
    features = read_embeddings(run.embeddings("default", "t0"))
    np.testing.assert_allclose(adata.X, old.predict(slide_standardised(features.features)), rtol=1e-5, atol=1e-5)


def test_eval_prints_hinge_against_the_ridge_beside_it(trained: tuple[Run, dict[str, Path]], tmp_path: Path) -> None:
    run, truths = trained
    folder = tmp_path / "preds"
    generate(run, [Target("t1")], FAST, out=folder)
    generate(run, [Target("t1")], FAST, out=folder, model="ridge")
    assert sorted(p.name for p in folder.glob("*.h5ad")) == ["t1.h5ad", "t1.ridge.h5ad"]
    result = runner.invoke(app, ["eval", "--pred", str(folder / "t1.h5ad"), "--truth", str(truths["t1"]),
                                 "--out", str(tmp_path / "eval"), "--no-maps"])
    assert result.exit_code == 0, result.output
    assert "hinge vs ridge baseline" in result.output
    for name in ("depth-partial Pearson", "co-expression consistency", "RVD", "MSE"):
        assert name in result.output
    assert "## hinge vs ridge baseline" in (tmp_path / "eval" / "report.md").read_text()
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["baseline"]["model"] == "ridge" and "errors.mse" in metrics["baseline"]["metrics"]
    alone = runner.invoke(app, ["eval", "--pred", str(folder / "t1.ridge.h5ad"), "--truth", str(truths["t1"]),
                                "--out", str(tmp_path / "alone"), "--no-maps"])
    assert alone.exit_code == 0 and "baseline" not in alone.output
    generate(run, [Target("t0")], FAST, out=folder)
    generate(run, [Target("t0")], FAST, out=folder, model="ridge")
    both = runner.invoke(app, ["eval", "--pred", str(folder / "t0.h5ad"), "--truth", str(truths["t0"]), "--pred",
                               str(folder / "t1.h5ad"), "--truth", str(truths["t1"]), "--out", str(tmp_path / "both"), "--no-maps"])
    assert both.exit_code == 0 and both.output.count("hinge vs ridge baseline") == 2
    assert "Means over the 2 slides with a baseline" in (tmp_path / "both" / "report.md").read_text()
    renamed = shutil.copy(folder / "t1.ridge.h5ad", tmp_path / "other.h5ad")
    given = runner.invoke(app, ["eval", "--pred", str(folder / "t1.h5ad"), "--truth", str(truths["t1"]), "--baseline",
                                str(renamed), "--out", str(tmp_path / "given"), "--no-maps"])
    assert given.exit_code == 0 and "hinge vs ridge baseline" in given.output


def test_a_missing_ridge_says_to_train_again_and_train_refits_it(trained: tuple[Run, dict[str, Path]], tmp_path: Path) -> None:
    run = Run(shutil.copytree(trained[0].root, tmp_path / "run"))
    run.checkpoint("ridge").unlink()
    with pytest.raises(HingeError, match="no ridge baseline .*run `hinge train` again"):
        generate(run, [Target("t0")], FAST, out=tmp_path / "x.h5ad", model="ridge")
    result = runner.invoke(app, ["generate", "--run", str(run.root), "--sample-id", "t1", "--model", "ridge", "-q"])
    assert result.exit_code == 2 and "hinge train" in result.output and len(result.output.strip().splitlines()) == 1
    train(run, run.config(record=False))  # resuming a finished run fits the ridge again
    assert read_ridge_model(run.checkpoint("ridge")).genes == load_checkpoint(run.checkpoint("best")).card.genes
