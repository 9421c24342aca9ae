"""HEST-1k folders and TRIDENT/HEST patch files: µm/px from metadata, top-left corners made into centres."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest

from hinge_cli.errors import HingeError
from hinge_cli.formats.hest import hest_ids, read_hest, read_patch_file, write_hest_metadata
from hinge_cli.slide.reader import open_slide
from hinge_cli.synthetic.fixtures import SyntheticHest, make_hest_folder, make_trident_features


@pytest.fixture(scope="module")
def hest(tmp_path_factory: pytest.TempPathFactory) -> SyntheticHest:
    return make_hest_folder(tmp_path_factory.mktemp("hest") / "hest_data", side_px=384)


def test_reads_every_sample_with_the_metadata_mpp(hest: SyntheticHest) -> None:
    samples = read_hest(hest.root)
    assert [s.sample_id for s in samples] == sorted(hest.ids) == hest_ids(hest.root)
    for sample in samples:
        assert sample.slide == hest.root / "wsis" / f"{sample.sample_id}.tif" and sample.spots.is_file()
        assert sample.mpp == hest.mpps[sample.sample_id]
        with open_slide(sample.slide) as slide:  # the slide's own tags disagree: the metadata must win
            assert slide.mpp != pytest.approx(sample.mpp)
        assert ad.read_h5ad(sample.spots).n_obs == hest.n_spots[sample.sample_id] == sample.metadata["spots_under_tissue"]
    only = read_hest(hest.root, ids=[hest.ids[1]])
    assert [s.sample_id for s in only] == [hest.ids[1]]


def test_mpp_falls_back_to_the_embedded_pixel_size(hest: SyntheticHest, tmp_path: Path) -> None:
    root = tmp_path / "hest"
    shutil.copytree(hest.root, root)
    sample_id = hest.ids[0]
    metadata = json.loads((root / "metadata" / f"{sample_id}.json").read_text())
    del metadata["pixel_size_um_estimated"]
    write_hest_metadata(root, sample_id, metadata)
    assert read_hest(root, [sample_id])[0].mpp == metadata["pixel_size_um_embedded"]
    del metadata["pixel_size_um_embedded"]
    write_hest_metadata(root, sample_id, metadata)
    with pytest.raises(HingeError, match="gives no µm/px.*add pixel_size_um_estimated"):
        read_hest(root, [sample_id])
    (root / "metadata" / f"{sample_id}.json").unlink()
    with pytest.raises(HingeError, match=f"no {sample_id}.json"):
        read_hest(root, [sample_id])


def test_folder_errors_name_what_is_missing(hest: SyntheticHest, tmp_path: Path) -> None:
    with pytest.raises(HingeError, match="does not exist"):
        read_hest(tmp_path / "nowhere")
    with pytest.raises(HingeError, match="no wsis/ folder.*st/ and metadata/"):
        read_hest(tmp_path)
    with pytest.raises(HingeError, match=f"for NOPE.*available ids: {', '.join(sorted(hest.ids))}"):
        read_hest(hest.root, ["NOPE"])


def test_trident_features_import_with_centres_and_hest_barcodes(hest: SyntheticHest, tmp_path: Path) -> None:
    sample = read_hest(hest.root, [hest.ids[0]])[0]
    path = tmp_path / f"{sample.sample_id}.h5"
    written = make_trident_features(path, sample.spots, sample.mpp, dim=8, patch_px=224, target_mpp=0.5)
    with h5py.File(path, "r") as h5:
        assert h5["barcode"].shape == (len(written.barcodes), 1) and "embeddings" not in h5
        topleft = h5["coords"][()]
    patches = read_patch_file(path)
    assert patches.patch_size_level0 == pytest.approx(224 * 0.5 / sample.mpp)
    np.testing.assert_allclose(patches.centres, topleft + patches.patch_size_level0 / 2)
    np.testing.assert_allclose(patches.centres, ad.read_h5ad(sample.spots).obsm["spatial"], atol=0.5)
    assert patches.barcodes == written.barcodes == list(ad.read_h5ad(sample.spots).obs_names)
    np.testing.assert_array_equal(patches.features, written.features)


def test_embeddings_without_barcodes_get_coordinate_names(hest: SyntheticHest, tmp_path: Path) -> None:
    sample = read_hest(hest.root, [hest.ids[0]])[0]
    path = tmp_path / "old.h5"
    make_trident_features(path, sample.spots, sample.mpp, features_name="embeddings", hest_barcodes=False)
    patches = read_patch_file(path)
    x, y = np.rint(patches.topleft[0]).astype(int)
    assert patches.barcodes[0] == f"{x}_{y}" and len(set(patches.barcodes)) == len(patches.barcodes)
    assert patches.features is not None and patches.features.shape[0] == len(patches.barcodes)


def test_patch_size_comes_from_attributes_or_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "hest_patches.h5"
    with h5py.File(path, "w") as h5:  # HEST's patch file: img + coords + (N,) str barcodes, size on img
        h5["coords"] = np.array([[100, 200], [356, 200]])
        h5.create_dataset("img", data=np.zeros((2, 4, 4, 3), np.uint8)).attrs["patch_size_src"] = 112
        h5["barcode"] = np.array(["AAAC-1", "AAAG-1"], dtype=h5py.string_dtype())
    patches = read_patch_file(path)
    assert patches.features is None and patches.barcodes == ["AAAC-1", "AAAG-1"]
    np.testing.assert_allclose(patches.centres, [[156, 256], [412, 256]])
    with h5py.File(path, "a") as h5:
        del h5["img"].attrs["patch_size_src"]
        h5["coords"].attrs.update({"patch_size": 256, "level0_magnification": 40, "target_magnification": 20})
    assert read_patch_file(path).patch_size_level0 == 512
    with h5py.File(path, "a") as h5:
        h5["coords"].attrs["level0_magnification"] = -1  # TRIDENT's "unknown"
    with pytest.raises(HingeError, match="patch size in level-0 pixels.*--patch-size-level0"):
        read_patch_file(path)
    np.testing.assert_allclose(read_patch_file(path, patch_size_level0=64).centres, [[132, 232], [388, 232]])
