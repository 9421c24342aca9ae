"""The ridge baseline inside the product: fitted by `train`, predicted by `generate --model ridge`, compared by `eval`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from stand_in import write_features
from typer.testing import CliRunner

from hinge_cli.cli import app
from hinge_cli.config import GenerateConfig
from hinge_cli.data.dataset import assemble
from hinge_cli.errors import HingeError
from hinge_cli.formats.embeddings import read_embeddings
from hinge_cli.formats.ridge_model import read_ridge_model
from hinge_cli.generate import Target, generate
from hinge_cli.model import load_checkpoint
from hinge_cli.model.ridge import PENALTIES, best_penalty, search_penalty
from hinge_cli.run import Run
from hinge_cli.slide.tiling import SampleSpec, tile_sample
from hinge_cli.synthetic import make_synthetic_sample
from hinge_cli.train import pretrain_warmup, train
from hinge_cli.train_data import split_rows

runner = CliRunner()
FAST = GenerateConfig(n_samples=1, steps=2, device="cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, dict[str, Path]]:
    """Two training samples, a one-epoch tiny model and its ridge; and each sample's measured spots."""
    root = tmp_path_factory.mktemp("ridge")
    run = Run(root / "run")
    cfg = run.config("tiny")
    cfg.tile.images = False
    truths = {}
    for i in range(2):
        s = make_synthetic_sample(root / "data", f"t{i}", size_px=384, mpp=2.0, seed=40 + i, n_genes=40)
        tile_sample(run, SampleSpec(s.sample_id, s.slide, s.spots), cfg.tile)
        write_features(run, s.sample_id, i, views=2)
        truths[s.sample_id] = s.spots
    cfg.warmup.n_genes, cfg.warmup.epochs, cfg.warmup.val_fraction = 12, 1, 0.2
    cfg.train.epochs = 1
    pretrain_warmup(run, cfg)
    train(run, cfg)
    return run, truths


def test_ridge_inside_train_matches_a_direct_closed_form_solve(trained: tuple[Run, dict[str, Path]]) -> None:
    run, _ = trained
    card = load_checkpoint(run.checkpoint("best")).card
    ridge = read_ridge_model(run.checkpoint("ridge"))
    table = assemble(run, card.encoder_key, card.samples, card.genes, card.transform, card.fill_missing)
    rows, _ = split_rows(card.split, table)
    z = ((table.features[rows] - card.feature_norm.mean) / card.feature_norm.std).mean(1).astype(np.float64)
    y = table.targets[rows].astype(np.float64)
    zc, yc = z - z.mean(0), y - y.mean(0)
    expected = np.linalg.solve(zc.T @ zc + ridge.penalty * len(z) * np.eye(z.shape[1]), zc.T @ yc)
    np.testing.assert_allclose(ridge.weights, expected, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ridge.predict(table.features[rows]), zc @ expected + y.mean(0), atol=1e-5)
    assert ridge.genes == card.genes and ridge.encoder_key == card.encoder_key
    assert ridge.n_spots == len(rows) < len(table) and ridge.samples == ["t0", "t1"]
    assert ridge.penalty in PENALTIES and ridge.search.folds == "samples" and ridge.search.n_folds == 2


def test_the_penalty_is_the_best_inner_cv_value() -> None:
    rng = np.random.default_rng(0)
    n = 200  # two nearly collinear features and an exact contrast of them: only a small penalty recovers it
    base = rng.normal(size=(n, 1))
    z = np.hstack([base + 0.2 * rng.normal(size=(n, 2)), rng.normal(size=(n, 3))])
    y = (z[:, :1] - 0.8 * z[:, 1:2]) + 0.01 * rng.normal(size=(n, 4))
    exact = search_penalty(z, y, rng.uniform(1000, 20000, n), np.array(["a", "b"] * (n // 2)), seed=0)
    assert exact.folds == "samples" and best_penalty(exact) <= 0.01
    rng = np.random.default_rng(0)
    n = 40  # few spots, nearly as many dimensions, a weak signal: a small penalty overfits
    z = rng.normal(size=(n, 30))
    y = z[:, :3].sum(1, keepdims=True) + 2 * rng.normal(size=(n, 6))
    noisy = search_penalty(z, y, rng.uniform(1000, 20000, n), np.array(["a"] * n), seed=0)
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
    assert "std" not in adata.layers and "spatial" in adata.obsm and "t0" in adata.uns["spatial"]
    assert adata.uns["hinge"]["model"] == "ridge" and adata.uns["hinge"]["penalty"] == ridge.penalty
    np.testing.assert_allclose(adata.X, ridge.predict(features.features), rtol=1e-5, atol=1e-5)
    assert not run.prediction("t0").exists()  # HINGE's own default file is another one
    assert run.stage("t0", "generate:ridge")["status"] == "ok" and not run.stage("t0", "generate")


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
