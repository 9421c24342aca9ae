"""Visium HD out: `generate --visium-hd` predicts every in-tissue bin under Space Ranger's barcode, in the bin size's
own frame, and `eval` scores it against the HD folder at bin level and pooled to 32, 55 and 112 µm."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.data.bins import bin_grid, pool_windows, visium_hd_bins
from hinge_cli.data.expression import Transform
from hinge_cli.errors import HingeError
from hinge_cli.eval.align import Aligned
from hinge_cli.eval.pooling import pool_aligned, pooling_curve
from hinge_cli.formats.visium_hd import PARQUET_POSITIONS, SCALEFACTORS_FILE, bin_folder, read_bins
from hinge_cli.run.directory import Run
from hinge_cli.synthetic.fixtures import SyntheticHD, make_visium_hd


def _hinge(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[SyntheticHD, Path, Path]:
    """A model trained on one HD capture area's 55 µm pseudo-spots; its bins predicted at 16 µm into pred.h5ad."""
    root = tmp_path_factory.mktemp("hd-out")
    hd = make_visium_hd(root / "area" / "outs", side_um=960, fullres=root / "area" / "fullres.tif")
    run = root / "run"
    _hinge("tile", "--visium-hd", str(hd.outs), "--image", str(hd.fullres), "--bin-um", "8", "--run", str(run), "--config", "tiny")
    _hinge("embed", "--run", str(run))
    _hinge("pretrain-warmup", "--run", str(run), "--n-genes", "12", "--warmup-epochs", "1", "--val-fraction", "0.2")
    _hinge("train", "--run", str(run), "--epochs", "8")
    pred = root / "pred.h5ad"
    _hinge("generate", "--visium-hd", str(hd.outs), "--image", str(hd.fullres), "--bin-um", "16", "--run", str(run),
           "--out", str(pred))
    return hd, run, pred


@pytest.mark.slow  # a training run
def test_every_in_tissue_bin_is_predicted_in_its_own_frame(trained: tuple[SyntheticHD, Path, Path]) -> None:
    hd, run, path = trained
    pred = ad.read_h5ad(path)
    measured = read_bins(hd.outs, 16)
    assert list(pred.obs_names) == list(measured.barcodes[measured.in_tissue])  # every in-tissue bin, in Space Ranger's order
    assert set(pred.obs_names) == set(measured.counts.obs_names)  # joins the bin matrix by barcode
    where = {b: i for i, b in enumerate(measured.barcodes)}
    np.testing.assert_array_equal(pred.obsm["spatial"], measured.centres_fullres[[where[b] for b in pred.obs_names]])
    (library,) = pred.uns["spatial"]
    assert library == "area_016um"  # apart from the pseudo-spots of the same capture area the model trained on
    frame = pred.uns["spatial"][library]
    written = json.loads((bin_folder(hd.outs, 16) / "spatial" / SCALEFACTORS_FILE).read_text())
    assert {k: float(v) for k, v in frame["scalefactors"].items()} == written
    assert frame["images"]["hires"].shape == (480, 480, 3) and frame["images"]["lowres"].shape == (96, 96, 3)
    bins = pred.uns["hinge"]["visium_hd"]
    assert bins["bin_um"] == 16 and bins["trained_spot_um"] == 55.0 and "55 µm neighbourhood" in bins["means"]
    assert np.isfinite(pred.X).all() and (pred.layers["std"] > 0).all()
    assert (pred.obs["in_tissue"] == 1).all()  # Space Ranger's call: only in-tissue bins are predicted
    assert Run(run).tiles("area_016um").exists()


@pytest.mark.slow  # a training run, and importing spatialdata-io
def test_the_prediction_joins_spatialdata_ios_bin_table(trained: tuple[SyntheticHD, Path, Path]) -> None:
    import warnings

    spatialdata_io = pytest.importorskip("spatialdata_io", reason="spatialdata-io is not installed (pip install '.[formats]')")
    hd, _, path = trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = spatialdata_io.visium_hd(hd.outs, dataset_id="area", bin_size=16, fullres_image_file=hd.fullres).tables["square_016um"]
    pred = ad.read_h5ad(path)
    joined = table[pred.obs_names]  # by barcode: every predicted bin is a row of theirs
    np.testing.assert_allclose(joined.obsm["spatial"], pred.obsm["spatial"])


@pytest.mark.slow  # a training run
def test_eval_scores_bins_against_the_hd_folder_and_pooled(trained: tuple[SyntheticHD, Path, Path], tmp_path: Path) -> None:
    hd, _, pred = trained
    _hinge("eval", "--pred", str(pred), "--truth", str(hd.outs), "--out", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["alignment"]["matched_by"] == "barcode"
    assert metrics["calibration"]["observation"] == "poisson"  # bins are scored through the count noise at their depth
    curve = metrics["pooling"]
    assert [level["pool_um"] for level in curve] == [16.0, 32.0, 55.0, 112.0]
    spots = [level["n_spots"] for level in curve]
    assert spots[0] == metrics["alignment"]["n_matched"] and spots == sorted(spots, reverse=True)
    umi = [level["median_umi"] for level in curve]
    assert umi == sorted(umi)  # pooled squares are deeper
    assert curve[0]["depth_partial_pearson"] == pytest.approx(metrics["correlation"]["depth_partial"]["pearson"]["mean"])
    assert "## Pooling: the score as bins are pooled" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.slow  # a training run
def test_a_spot_prediction_is_not_scored_against_an_hd_folder(trained: tuple[SyntheticHD, Path, Path], tmp_path: Path) -> None:
    from hinge_cli.synthetic.slides import make_synthetic_prediction

    hd, _, _ = trained
    spots = make_synthetic_prediction(tmp_path / "spots.h5ad")
    result = CliRunner().invoke(app, ["eval", "--pred", str(spots), "--truth", str(hd.outs), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "is a Visium HD folder, but" in result.output and "generate --visium-hd" in result.output
    assert not (tmp_path / "e").exists()


@pytest.mark.slow  # a training run
def test_a_training_samples_name_is_refused_for_bins(trained: tuple[SyntheticHD, Path, Path], tmp_path: Path) -> None:
    hd, run, _ = trained
    spots = Run(run).input_spots("area")
    before = spots.read_bytes()
    result = CliRunner().invoke(app, ["generate", "--visium-hd", str(hd.outs), "--sample-id", "area", "--run", str(run),
                                      "--out", str(tmp_path / "p.h5ad")])
    assert result.exit_code == 2 and "holds training spots" in result.output and "--sample-id" in result.output
    assert spots.read_bytes() == before and not (tmp_path / "p.h5ad").exists()


@pytest.mark.slow  # a training run
def test_bins_whose_positions_changed_are_tiled_again(trained: tuple[SyntheticHD, Path, Path], tmp_path: Path) -> None:
    """Space Ranger run again on the capture area (here: fewer bins in tissue): the cached tiles of the sample no longer
    match its positions, so they are refused, and --overwrite tiles the bins again."""
    hd, run, _ = trained
    outs = Path(shutil.copytree(hd.outs, tmp_path / "outs"))
    call = ["generate", "--visium-hd", str(outs), "--sample-id", "again", "--run", str(run)]
    _hinge(*call, "--out", str(tmp_path / "first.h5ad"))
    path = bin_folder(outs, 16) / "spatial" / PARQUET_POSITIONS
    table = pq.read_table(path)
    inside = table.column("in_tissue").to_numpy().copy()
    inside[table.column("array_row").to_numpy() < 20] = 0
    pq.write_table(table.set_column(table.column_names.index("in_tissue"), "in_tissue", pa.array(inside)), path)
    result = CliRunner().invoke(app, [*call, "--out", str(tmp_path / "second.h5ad")])
    assert result.exit_code == 2 and "changed since they were tiled" in result.output and "--overwrite" in result.output
    _hinge(*call, "--out", str(tmp_path / "second.h5ad"), "--overwrite")
    assert ad.read_h5ad(tmp_path / "second.h5ad").n_obs == int(inside.sum()) < ad.read_h5ad(tmp_path / "first.h5ad").n_obs


def test_an_absent_bin_size_is_named_before_anything_runs(tmp_path: Path) -> None:
    hd = make_visium_hd(tmp_path / "outs", sizes=(8,))
    result = CliRunner().invoke(app, ["generate", "--visium-hd", str(hd.outs), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has no 16 µm bins (present: 8 µm)" in result.output
    assert not (tmp_path / "run" / "inputs").exists()


def test_bins_off_the_image_are_left_out_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hd = make_visium_hd(tmp_path / "area" / "outs", sizes=(16,))
    path = bin_folder(hd.outs, 16) / "spatial" / PARQUET_POSITIONS
    table = pq.read_table(path)
    x = table.column("pxl_col_in_fullres").to_numpy().copy()
    x[table.column("array_col").to_numpy() >= 20] += 10_000
    pq.write_table(table.set_column(table.column_names.index("pxl_col_in_fullres"), "pxl_col_in_fullres", pa.array(x)), path)
    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        spec = visium_hd_bins(Run(tmp_path / "run"), hd.outs, "hires", 16)
    assert re.search(r"\d+ of \d+ bins lie off tissue_hires_image.png and are left out", caplog.text)
    kept = ad.read_h5ad(spec.spots)
    assert spec.sample_id == "area_016um" and (bin_grid(list(kept.obs_names))[:, 1] < 20).all()


def test_bins_without_tissue_are_refused(tmp_path: Path) -> None:
    hd = make_visium_hd(tmp_path / "outs", sizes=(16,))
    path = bin_folder(hd.outs, 16) / "spatial" / PARQUET_POSITIONS
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.column_names.index("in_tissue"), "in_tissue", pa.array(np.zeros(table.num_rows, np.int32))), path)
    with pytest.raises(HingeError, match="no 16 µm bin of .* is marked in_tissue"):
        visium_hd_bins(Run(tmp_path / "run"), hd.outs, "hires", 16)


def _aligned(hd: SyntheticHD, rates: np.ndarray, transform: Transform) -> Aligned:
    bins = read_bins(hd.outs, 16)
    counts = bins.counts.X.toarray().astype(np.float64)
    values = transform.apply(rates, np.full(len(rates), transform.target_sum))
    return Aligned("s", [f"G{j}" for j in range(counts.shape[1])], values, None, counts, counts.sum(1) + 5,
                   np.zeros((len(counts), 2)), 16.0, {}, {}, barcodes=list(bins.counts.obs_names))


@pytest.mark.parametrize("normalize", ["total", "none"])
def test_pooling_sums_counts_and_pools_predictions_in_linear_units(tmp_path: Path, normalize: str) -> None:
    """Counts are summed; a prediction of normalised expression is its bins' mean rate, one of counts their sum."""
    hd = make_visium_hd(tmp_path / "outs", sizes=(16,), n_genes=4)
    transform = Transform.of(normalize)
    n = read_bins(hd.outs, 16).counts.n_obs
    rates = np.random.default_rng(0).gamma(2.0, 50.0, (n, 4))
    aligned = _aligned(hd, rates, transform)
    pooled = pool_aligned(aligned, transform, 16, 32)
    square = bin_grid(aligned.barcodes) // 2  # 32 µm squares of 16 µm bins: 2 x 2
    keys, size = np.unique(square, axis=0, return_counts=True)
    key = keys[np.argmax(size == 4)]  # a square wholly in tissue
    members = (square == key).all(1)
    row = pooled.barcodes.index(f"p32um_{key[0]:05d}_{key[1]:05d}")
    np.testing.assert_allclose(pooled.counts[row], aligned.counts[members].sum(0))
    expected = rates[members].mean(0) if normalize == "total" else rates[members].sum(0)
    np.testing.assert_allclose(transform.linear(pooled.pred[row]), expected, rtol=1e-5)  # float32 units
    assert pooled.std is None and pooled.draws is None and pooled.spot_diameter == 32.0


def test_a_pooled_square_needs_half_its_bins_and_a_level_three_squares(tmp_path: Path) -> None:
    hd = make_visium_hd(tmp_path / "outs", sizes=(16,), n_genes=4)
    transform = Transform.of("total")
    aligned = _aligned(hd, np.ones((read_bins(hd.outs, 16).counts.n_obs, 4)), transform)
    pooled = pool_aligned(aligned, transform, 16, 55)
    per_square = np.bincount(pool_windows(bin_grid(aligned.barcodes), 16, 55)[1])
    assert len(pooled.pred) < len(per_square) and (pooled.counts.sum() < aligned.counts.sum())  # edge squares left out
    few = replace(aligned, pred=aligned.pred[:6], counts=aligned.counts[:6], totals=aligned.totals[:6],
                  coords=aligned.coords[:6], barcodes=aligned.barcodes[:6])
    curve = pooling_curve(few, SimpleNamespace(correlation=SimpleNamespace(  # the bin level's metrics stand in
        low_count_spots=0, depth_partial=SimpleNamespace(pearson=SimpleNamespace(mean=0.1), coexpression=SimpleNamespace(consistency=0.2)),
        model=SimpleNamespace(pearson=SimpleNamespace(mean=0.3)))), transform, 16)
    assert [level.pool_um for level in curve] == [16.0]  # no level of fewer than 3 squares: left out, not a traceback


def test_a_barcode_that_is_not_a_bin_is_named() -> None:
    with pytest.raises(HingeError, match="spot AAAC-1 is not a Visium HD bin barcode"):
        bin_grid(["s_016um_00001_00002-1", "AAAC-1"])
