"""Visium HD in: Space Ranger's binned_outputs/ read as written, bins pooled into pseudo-spots whose counts are the
sums of their bins, and `hinge tile --visium-hd` in one command; each bad input is one line or a warning."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.data.bins import pool_bins
from hinge_cli.errors import HingeError
from hinge_cli.formats.visium_hd import PARQUET_POSITIONS, bin_folder, bin_sizes, read_bins
from hinge_cli.run.directory import Run
from hinge_cli.slide.writer import write_pyramidal_tiff
from hinge_cli.synthetic.fixtures import SyntheticHD, make_visium_hd


@pytest.fixture(scope="module")
def hd(tmp_path_factory: pytest.TempPathFactory) -> SyntheticHD:
    root = tmp_path_factory.mktemp("hd")
    return make_visium_hd(root / "sample" / "outs", fullres=root / "sample" / "fullres.tif")


def _copy(hd: SyntheticHD, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hd.outs, tmp_path / "outs"))


def test_every_bin_size_is_read_as_space_ranger_writes_it(hd: SyntheticHD, tmp_path: Path) -> None:
    (hd.outs / "segmented_outputs").mkdir(exist_ok=True)  # Space Ranger 4's cells: left alone
    assert bin_sizes(hd.outs) == [2, 8, 16]
    bins = read_bins(hd.outs, 8)
    assert all(re.fullmatch(r"s_008um_\d{5}_\d{5}-1", b) for b in bins.barcodes[:50])
    assert bins.scalefactors.bin_size_um == 8 and bins.scalefactors.microns_per_pixel == hd.mpp
    assert set(bins.counts.obs_names) == set(bins.barcodes[bins.in_tissue])  # the filtered matrix: bins under tissue
    fine = hd.counts_2um.sum(axis=(0, 1))
    assert np.array_equal(np.asarray(read_bins(hd.outs, 2).counts.X.sum(0)).ravel(), fine)


def test_pseudo_spots_sum_their_bins(hd: SyntheticHD) -> None:
    bins = read_bins(hd.outs, 8)
    pooled = pool_bins(bins, pool_um=32.0)  # 4 x 4 bins of 8 µm, 16 x 16 of the 2 µm truth
    membership = pooled.uns["pooling"]
    row = {b: i for i, b in enumerate(bins.counts.obs_names)}
    by_bins = np.zeros(pooled.shape, np.int64)
    np.add.at(by_bins, membership["spot"], bins.counts.X.toarray()[[row[b] for b in membership["bins"]]])
    assert np.array_equal(pooled.X.toarray(), by_bins)  # the membership says exactly which bins were summed
    whole = np.flatnonzero(pooled.obs["tissue_fraction"].to_numpy() == 1.0)
    assert len(whole) > 5
    for name in pooled.obs_names[whole]:  # a square wholly in tissue holds its 2 µm bins' counts exactly
        r, c = (int(v) for v in name.split("_")[1:])
        truth = hd.counts_2um[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].sum(axis=(0, 1))
        assert np.array_equal(pooled[name].X.toarray().ravel(), truth), name
    assert (pooled.obs["tissue_fraction"] >= 0.5).all() and (pooled.obs["n_bins"] <= 16).all()
    fewer = pool_bins(bins, pool_um=32.0, min_tissue_fraction=1.0)
    assert len(whole) == fewer.n_obs < pooled.n_obs


def test_tile_pools_an_hd_folder_in_one_command(hd: SyntheticHD, tmp_path: Path) -> None:
    run = Run(tmp_path / "run")
    result = CliRunner().invoke(app, ["tile", "--visium-hd", str(hd.outs), "--image", str(hd.fullres), "--run", str(run.root),
                                      "--config", "tiny", "--bin-um", "16", "-q"])
    assert result.exit_code == 0, result.output
    spots = run.input_spots("sample")
    import anndata as ad

    pooled = ad.read_h5ad(spots)
    assert pooled.uns["pooling"]["bin_um"] == 16 and pooled.n_obs > 10 and pooled.uns["spaceranger"]["mpp"] == hd.mpp
    assert run.is_done("sample", "tile", run.tiles("sample"))
    cfg = run.config()
    assert cfg.tile.pitch_um == cfg.tile.spot_um == 55.0  # the pseudo-spots' lattice, recorded for later stages


def test_an_absent_bin_size_lists_those_present(hd: SyntheticHD, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["tile", "--visium-hd", str(hd.outs), "--bin-um", "4", "--run", str(tmp_path / "run")])
    assert result.exit_code == 2 and "has no 4 µm bins (present: 2 µm, 8 µm, 16 µm)" in result.output
    assert "pass --bin-um with one of them" in result.output and not (tmp_path / "run" / "tiles").exists()


def test_positions_in_the_csv_layout_are_read_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    made = make_visium_hd(tmp_path / "outs", sizes=(16,), csv_positions=True)
    with caplog.at_level(logging.INFO, logger="hinge_cli"):
        bins = read_bins(made.outs, 16)
    assert "positions in the CSV layout" in caplog.text and len(bins.barcodes) == (480 // 16) ** 2


def test_a_parquet_without_its_columns_names_them(hd: SyntheticHD, tmp_path: Path) -> None:
    outs = _copy(hd, tmp_path)
    path = bin_folder(outs, 16) / "spatial" / PARQUET_POSITIONS
    pq.write_table(pq.read_table(path).drop(["array_col", "in_tissue"]), path)
    with pytest.raises(HingeError, match=r"lacks the columns in_tissue, array_col"):
        read_bins(outs, 16)


def test_a_fullres_image_of_another_size_says_which_disagree(hd: SyntheticHD, tmp_path: Path) -> None:
    wrong = write_pyramidal_tiff(tmp_path / "other.tif", np.full((300, 400, 3), 200, np.uint8), hd.mpp)
    result = CliRunner().invoke(app, ["tile", "--visium-hd", str(hd.outs), "--image", str(wrong), "--run", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "is 400 x 300 px, but the scale factors (tissue_hires_scalef 0.5" in result.output and "480 x 480 px" in result.output


def test_bins_off_the_image_are_left_out_with_a_warning(hd: SyntheticHD, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    outs = _copy(hd, tmp_path)
    path = bin_folder(outs, 16) / "spatial" / PARQUET_POSITIONS
    table = pq.read_table(path)
    x = table.column("pxl_col_in_fullres").to_numpy().copy()
    x[table.column("array_col").to_numpy() >= 20] += 10_000  # the right third of the bins beyond the image
    pq.write_table(table.set_column(table.column_names.index("pxl_col_in_fullres"), "pxl_col_in_fullres", pa.array(x)), path)
    from hinge_cli.data.bins import visium_hd_sample

    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        spec = visium_hd_sample(Run(tmp_path / "run"), outs, "hires", 16)
    assert re.search(r"\d+ of \d+ pseudo-spots lie off tissue_hires_image.png and are left out", caplog.text)
    import anndata as ad

    kept = ad.read_h5ad(spec.spots)
    assert (kept.obsm["spatial"][:, 0] < 240).all()  # every kept centre on the 240 px hires image


@pytest.mark.slow  # importing spatialdata-io takes seconds
def test_spatialdata_io_reads_the_fixture_as_space_ranger_output(hd: SyntheticHD) -> None:
    """An independent reader (spatialdata-io's visium_hd, in the `formats` test extra) finds every bin size, its bins
    by barcode with their centres, and the images: the fixture is the real layout, not one hinge alone reads."""
    import warnings

    spatialdata_io = pytest.importorskip("spatialdata_io", reason="spatialdata-io is not installed (pip install '.[formats]')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = spatialdata_io.visium_hd(hd.outs, dataset_id="sample", bin_size=[8, 16], fullres_image_file=hd.fullres)
    assert {"sample_full_image", "sample_hires_image", "sample_lowres_image"} <= set(data.images)
    for size in (8, 16):
        theirs, ours = data.tables[f"square_{size:03d}um"], read_bins(hd.outs, size)
        assert list(theirs.obs_names) == list(ours.counts.obs_names)
        assert np.array_equal(theirs.X.toarray(), ours.counts.X.toarray())
        where = {b: i for i, b in enumerate(ours.barcodes)}
        np.testing.assert_allclose(theirs.obsm["spatial"], ours.centres_fullres[[where[b] for b in theirs.obs_names]])
