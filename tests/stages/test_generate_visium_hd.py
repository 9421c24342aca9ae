"""Visium HD out: `generate --visium-hd` predicts every in-tissue bin under Space Ranger's barcode, in the bin size's
own frame, and `eval` scores it against the HD folder at bin level and pooled to 32, 55 and 112 µm."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.data.bins import bin_grid, visium_hd_bins
from hinge_cli.data.expression import Transform
from hinge_cli.errors import HingeError
from hinge_cli.eval.align import Aligned
from hinge_cli.eval.pooling import pool_aligned
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


def test_pooling_sums_counts_and_averages_predictions_in_linear_units(tmp_path: Path) -> None:
    hd = make_visium_hd(tmp_path / "outs", sizes=(16,), n_genes=4)
    bins = read_bins(hd.outs, 16)
    barcodes = list(bins.counts.obs_names)
    counts = bins.counts.X.toarray().astype(np.float64)
    transform = Transform()
    rates = np.random.default_rng(0).gamma(2.0, 50.0, counts.shape)
    aligned = Aligned("s", [f"G{j}" for j in range(4)], transform.apply(rates, np.full(len(rates), transform.target_sum)), None,
                      counts, counts.sum(1) + 5, np.zeros((len(counts), 2)), 16.0, {}, {}, barcodes=barcodes)
    pooled = pool_aligned(aligned, transform, 16, 32)
    assert pooled.counts.sum() == counts.sum() and pooled.totals.sum() == aligned.totals.sum()
    square = bin_grid(barcodes) // 2  # 32 µm squares of 16 µm bins: 2 x 2
    members = (square == square[0]).all(1)
    row = pooled.barcodes.index(f"p32um_{square[0, 0]:05d}_{square[0, 1]:05d}")
    np.testing.assert_allclose(pooled.counts[row], counts[members].sum(0))
    np.testing.assert_allclose(np.power(transform.log_base, pooled.pred[row]) - 1, rates[members].mean(0), rtol=1e-6)  # float32 units
    assert pooled.std is None and pooled.draws is None and pooled.spot_diameter == 32.0


def test_a_barcode_that_is_not_a_bin_is_named() -> None:
    with pytest.raises(HingeError, match="spot AAAC-1 is not a Visium HD bin barcode"):
        bin_grid(["s_016um_00001_00002-1", "AAAC-1"])
