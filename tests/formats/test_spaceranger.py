"""Space Ranger outs/ folders: counts, both positions formats, and spot coordinates in every image."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import sparse

from hinge_cli.core.files import atomic_path
from hinge_cli.data.expression import read_expression
from hinge_cli.errors import HingeError
from hinge_cli.formats.spaceranger import read_positions, read_spaceranger, spot_expression, visium_image
from hinge_cli.synthetic.fixtures import SyntheticVisium, make_spaceranger_outs


@pytest.fixture(scope="module")
def visium(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVisium:
    """Space Ranger >= 2.0 layout, with the full-resolution image beside outs/."""
    root = tmp_path_factory.mktemp("visium")
    return make_spaceranger_outs(root / "outs", fullres=root / "fullres.tif", seed=1)


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> SyntheticVisium:
    """The same run written with the older headerless tissue_positions_list.csv, no full-resolution image."""
    return make_spaceranger_outs(tmp_path_factory.mktemp("legacy") / "outs", legacy_positions=True, seed=1)


def _on_tissue(pixels: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Whether each (x, y) falls on the drawn tissue (pink: green channel well below the white background's)."""
    x, y = np.floor(coords).astype(int).T
    return pixels[y, x, 1] < 190


def test_reads_counts_positions_and_scale_factors(visium: SyntheticVisium, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = read_spaceranger(visium.outs)
    counts = data.counts
    assert counts.n_obs == visium.n_in_tissue and sparse.isspmatrix_csr(counts.X) and np.issubdtype(counts.X.dtype, np.integer)
    assert counts.var_names.is_unique and "GENE0-1" in counts.var_names and counts.var["gene_ids"].is_unique
    assert "1 duplicated gene symbols renamed" in caplog.text
    assert len(data.positions.barcodes) == visium.n_spots and int(data.positions.in_tissue.sum()) == visium.n_in_tissue
    assert set(counts.obs_names) == set(data.positions.barcodes[data.positions.in_tissue == 1])
    assert data.mpp_fullres == pytest.approx(visium.mpp_fullres)


def test_both_positions_formats_read_the_same(visium: SyntheticVisium, legacy: SyntheticVisium) -> None:
    new_file = visium.outs / "spatial" / "tissue_positions.csv"
    old_file = legacy.outs / "spatial" / "tissue_positions_list.csv"
    assert new_file.read_text().startswith("barcode,in_tissue,") and not old_file.read_text().startswith("barcode")
    new, old = read_positions(new_file.parent), read_positions(old_file.parent)
    assert list(new.barcodes) == list(old.barcodes)
    np.testing.assert_array_equal(new.in_tissue, old.in_tissue)
    np.testing.assert_array_equal(new.centres_fullres, old.centres_fullres)


@pytest.mark.parametrize("which", ["visium", "legacy"])
@pytest.mark.parametrize("image", ["hires", "lowres"])
def test_shipped_images_rescale_coordinates_and_mpp(which: str, image: str, request: pytest.FixtureRequest) -> None:
    sample: SyntheticVisium = request.getfixturevalue(which)
    data = read_spaceranger(sample.outs)
    chosen = visium_image(sample.outs, image)
    scalef = data.scalefactors.scale(image)
    assert chosen.path.name == f"tissue_{image}_image.png" and chosen.scale == scalef
    assert chosen.mpp == pytest.approx(sample.mpp_fullres / scalef)
    assert len(chosen.barcodes) == sample.n_in_tissue and (chosen.in_tissue == 1).all()
    on = data.positions.in_tissue == 1
    np.testing.assert_allclose(chosen.coords, data.positions.centres_fullres[on] * scalef)
    pixels = np.asarray(Image.open(chosen.path).convert("RGB"))
    assert _on_tissue(pixels, chosen.coords).all()
    every = visium_image(sample.outs, image, in_tissue_only=False)
    assert len(every.barcodes) == sample.n_spots and not _on_tissue(pixels, every.coords[every.in_tissue == 0]).any()


def test_full_resolution_image_keeps_coordinates(visium: SyntheticVisium) -> None:
    chosen = visium_image(visium.outs, visium.fullres)
    data = read_spaceranger(visium.outs)
    assert chosen.path == visium.fullres and chosen.scale == 1.0 and chosen.mpp == pytest.approx(visium.mpp_fullres)
    np.testing.assert_array_equal(chosen.coords, data.positions.centres_fullres[data.positions.in_tissue == 1])
    assert _on_tissue(tifffile.imread(visium.fullres, level=0), chosen.coords).all()
    assert visium.tissue.contains(chosen.coords).all()


def test_spot_expression_pairs_counts_with_image_coordinates(visium: SyntheticVisium, tmp_path: Path) -> None:
    data = read_spaceranger(visium.outs)
    chosen = visium_image(visium.outs, "hires")
    adata = spot_expression(data, chosen)
    assert list(adata.obs_names) == list(chosen.barcodes) and (adata.obs["in_tissue"] == 1).all()
    np.testing.assert_array_equal(adata.obsm["spatial"], chosen.coords)
    row = {b: i for i, b in enumerate(data.counts.obs_names)}
    some = chosen.barcodes[:5]
    np.testing.assert_array_equal(adata[list(some)].X.toarray(), data.counts.X[[row[b] for b in some]].toarray())
    with atomic_path(tmp_path / "spots.h5ad") as tmp:
        adata.write_h5ad(tmp)
    expression = read_expression(tmp_path / "spots.h5ad")
    assert expression.totals.sum() == data.counts.X.sum()
    np.testing.assert_array_equal(expression.coords, chosen.coords)


def test_missing_pieces_are_named(visium: SyntheticVisium, tmp_path: Path) -> None:
    with pytest.raises(HingeError, match="does not exist"):
        read_spaceranger(tmp_path / "nowhere")
    outs = tmp_path / "outs"
    shutil.copytree(visium.outs, outs)
    with pytest.raises(HingeError, match="does not exist.*full-resolution"):
        visium_image(outs, tmp_path / "missing.tif")
    (outs / "spatial" / "tissue_hires_image.png").unlink()
    with pytest.raises(HingeError, match="no tissue_hires_image.png.*--image"):
        visium_image(outs, "hires")
    (outs / "spatial" / "tissue_positions.csv").unlink()
    with pytest.raises(HingeError, match="neither tissue_positions.csv nor tissue_positions_list.csv"):
        visium_image(outs, "lowres")
    (outs / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(HingeError, match="no filtered_feature_bc_matrix.h5.*outs/"):
        read_spaceranger(outs)
    shutil.rmtree(outs / "spatial")
    with pytest.raises(HingeError, match="no spatial/ folder"):
        read_spaceranger(outs)
