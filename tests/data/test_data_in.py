"""Traps on the way in: blank images, blurred patches, and the HEST/TRIDENT/Visium conventions of the outputs."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from PIL import Image

from hinge_cli.config import load_config
from hinge_cli.data.samples import SampleSpec
from hinge_cli.errors import HingeError
from hinge_cli.formats.embeddings import EmbeddingAttrs, read_embeddings, write_embeddings
from hinge_cli.formats.prediction import PredictedBatch, PredictionSpots, SpatialFrame, write_skeleton
from hinge_cli.run.directory import Run
from hinge_cli.slide.tiling import tile_sample


def test_a_blank_image_is_refused_and_its_thumbnail_written(tmp_path: Path) -> None:
    blank = tmp_path / "black.png"
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(blank)
    run = Run(tmp_path / "run")
    with pytest.raises(HingeError, match="is blank") as info:
        tile_sample(run, SampleSpec("b", blank, mpp=2.0), load_config("tiny").tile)
    assert "--tissue-threshold" not in str(info.value) and str(run.thumbnail("b")) in str(info.value)
    assert run.thumbnail("b").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_tissue_found_still_writes_the_thumbnail(tmp_path: Path) -> None:
    grey = np.linspace(180, 240, 800).astype(np.uint8)
    glass = np.repeat(np.repeat(grey[None, :, None], 600, axis=0), 3, axis=2)  # a grey ramp: an image, nothing stained
    path = tmp_path / "glass.png"
    Image.fromarray(glass).save(path)
    run = Run(tmp_path / "run")
    with pytest.raises(HingeError, match="no tissue found") as info:
        tile_sample(run, SampleSpec("g", path, mpp=2.0), load_config("tiny").tile)
    assert str(run.thumbnail("g")) in str(info.value) and run.thumbnail("g").exists()


def test_magnified_patches_are_warned_about(tmp_path: Path, synth, caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config("tiny").tile
    cfg.target_mpp, cfg.images = 0.2, False  # the slide has 0.5 µm/px: 2.5x magnification
    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("s0", synth.slide, synth.spots), cfg)
    assert any("magnified 2.5x" in r.getMessage() for r in caplog.records)


def test_features_are_found_under_tridents_and_hests_names(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    with write_embeddings(path, EmbeddingAttrs(encoder="default"), ["a", "b", "c"], np.zeros((3, 2), np.int64), (3, 4)) as out:
        out.write(features)
    with h5py.File(path, "r") as h5:
        np.testing.assert_array_equal(h5["features"][()], features)
        np.testing.assert_array_equal(h5["embeddings"][()], features)  # readers of the old name
        assert h5["features"].id == h5["embeddings"].id  # one dataset, two names: no extra disk
    with h5py.File(path, "r+") as h5:  # a file from before the rename has only `embeddings`
        del h5["features"]
    np.testing.assert_array_equal(read_embeddings(path).features, features)


def test_in_tissue_is_visiums_zero_or_one(tmp_path: Path) -> None:
    spots = PredictionSpots(["a", "b", "c"], np.zeros((3, 2)), np.array([0.2, 0.5, 1.0], np.float32))
    write_skeleton(tmp_path / "p.h5ad", "s", spots, ["G1"], SpatialFrame.of_slide(np.zeros((4, 4, 3), np.uint8), 1.0, 10.0), {})
    obs = ad.read_h5ad(tmp_path / "p.h5ad").obs
    assert obs["in_tissue"].tolist() == [0, 1, 1]
    np.testing.assert_allclose(obs["tissue_fraction"], [0.2, 0.5, 1.0])


def hinge(*args: str) -> str:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    result = CliRunner().invoke(app, [*args, "-q"])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("legacy", "image"), [(False, "fullres"), (True, "hires")])
def test_visium_outs_tile_in_one_command(tmp_path: Path, legacy: bool, image: str) -> None:
    from hinge_cli.formats.tiles import read_tiles
    from hinge_cli.synthetic.fixtures import make_spaceranger_outs

    sample = tmp_path / "slide1"
    visium = make_spaceranger_outs(sample / "outs", legacy_positions=legacy, seed=2,
                                   fullres=sample / "fullres.tif" if image == "fullres" else None)
    run = tmp_path / "run"
    chosen = str(visium.fullres) if image == "fullres" else image
    hinge("tile", "--visium", str(visium.outs), "--image", chosen, "--run", str(run), "--config", "tiny", "--no-images")
    tiles = read_tiles(Run(run).tiles("slide1"))  # the sample is named after the folder above outs/
    assert len(tiles.barcodes) == visium.n_in_tissue
    scale = 1.0 if image == "fullres" else 0.5  # the fixture's tissue_hires_scalef
    assert tiles.attrs.mpp_source == pytest.approx(visium.mpp_fullres / scale)
    centre, radius = np.array(visium.tissue.centre), visium.tissue.radius + 1 / scale  # tiles round to whole pixels
    assert (np.hypot(*(tiles.coords / scale - centre).T) < radius).all()  # back in full-resolution px: all on the tissue
    registered = Run(run).sample("slide1")["expression"]["path"]
    assert ad.read_h5ad(registered).X.sum() > 0


def test_hest_folder_tiles_with_the_metadata_mpp(tmp_path: Path) -> None:
    from hinge_cli.formats.tiles import read_tile_attrs
    from hinge_cli.synthetic.fixtures import make_hest_folder

    hest = make_hest_folder(tmp_path / "hest")
    run = Run(tmp_path / "run")
    hinge("tile", "--hest", str(hest.root), "--ids", hest.ids[1], "--run", str(run.root), "--config", "tiny", "--no-images")
    assert not run.tiles(hest.ids[0]).exists()
    assert read_tile_attrs(run.tiles(hest.ids[1])).mpp_source == pytest.approx(hest.mpps[hest.ids[1]])  # not the TIFF's wrong tag


@pytest.mark.slow
def test_trident_features_import_and_train(tmp_path: Path, synth) -> None:
    from hinge_cli.encoders.registry import get_spec
    from hinge_cli.formats.embeddings import read_embeddings
    from hinge_cli.synthetic.fixtures import make_trident_features

    run = Run(tmp_path / "run")
    hinge("tile", str(synth.slide), "--spots", str(synth.spots), "--run", str(run.root), "--config", "tiny", "--no-images")
    folder = tmp_path / "trident"
    folder.mkdir()
    made = make_trident_features(folder / "s0.h5", synth.spots, 0.5, dim=get_spec("uni").dim, hest_barcodes=False)
    hinge("embed", "--import-features", str(folder), "--encoder", "uni", "--run", str(run.root))
    imported = read_embeddings(run.embeddings("uni", "s0"))
    order = [made.barcodes.index(b) for b in imported.barcodes]  # paired by centre: the file's barcodes are coordinates
    np.testing.assert_array_equal(imported.features, made.features[order])
    hinge("pretrain-warmup", "--run", str(run.root), "--n-genes", "8", "--warmup-epochs", "1")
    hinge("train", "--run", str(run.root), "--epochs", "1")
    assert run.checkpoint("best").exists()


def _logged_counts(tmp_path: Path, synth) -> Path:
    """The synthetic spots as scanpy users often save them: log values in X, the counts in a layer."""
    spots = ad.read_h5ad(synth.spots)
    spots.layers["raw"] = spots.X.copy()
    spots.X = np.log1p(np.asarray(spots.X, dtype=np.float32))
    path = tmp_path / "logged.h5ad"
    spots.write_h5ad(path)
    return path


def test_counts_in_a_named_layer(tmp_path: Path, synth) -> None:
    path = _logged_counts(tmp_path, synth)
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app

    args = ["tile", str(synth.slide), "--spots", str(path), "--run", str(tmp_path / "run"), "--config", "tiny", "--no-images"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "--layer" in refused.output
    hinge(*args, "--layer", "raw")
    assert Run(tmp_path / "run").sample("s0")["expression"]["layer"] == "raw"


def test_corpus_and_truth_take_a_layer(tmp_path: Path, synth) -> None:
    from hinge_cli.data.corpus import load_corpus
    from hinge_cli.data.expression import Transform
    from hinge_cli.eval import evaluate
    from hinge_cli.formats.prediction import write_prediction

    logged = _logged_counts(tmp_path, synth)
    with pytest.raises(HingeError, match="--layer"):
        load_corpus([logged], Transform(), 50)
    assert len(load_corpus([logged], Transform(), 50, layer="raw").vocab) == 50
    truth = ad.read_h5ad(synth.spots)
    genes = list(truth.var_names[:5])
    spots = PredictionSpots(list(truth.obs_names), np.asarray(truth.obsm["spatial"]), np.ones(truth.n_obs, np.float32))
    pred = tmp_path / "pred.h5ad"
    provenance = {"transform": Transform().to_dict(), "sample_id": "s0"}
    with write_prediction(pred, "s0", spots, genes, SpatialFrame.of_slide(np.zeros((8, 8, 3), np.uint8), 1.0, 20.0),
                          provenance) as out:
        values = Transform().apply(np.asarray(truth[:, genes].X))
        out.write(0, truth.n_obs, PredictedBatch(values, np.ones_like(values), values - 1, values + 1))
    with pytest.raises(HingeError, match="--layer"):
        evaluate([pred], [logged], out=tmp_path / "e1")
    summary = evaluate([pred], [logged], out=tmp_path / "e2", layer="raw")
    assert summary.slides[0].metrics.correlation.model.pearson.mean == pytest.approx(1.0)  # the truth, transformed


def test_a_hest_folder_given_as_a_sample_sheet_is_pointed_to_hest(tmp_path: Path) -> None:
    from hinge_cli.data.sources import read_sample_sheet
    from hinge_cli.synthetic.fixtures import make_hest_folder

    hest = make_hest_folder(tmp_path / "hest", side_px=256)
    with pytest.raises(HingeError, match="--hest"):
        read_sample_sheet(hest.root)


def test_spots_at_the_wrong_scale_are_warned_about(tmp_path: Path, synth, caplog: pytest.LogCaptureFixture) -> None:
    spots = ad.read_h5ad(synth.spots)
    spots.obsm["spatial"] = np.asarray(spots.obsm["spatial"]) * 0.5  # a scale factor applied twice, say
    halved = tmp_path / "halved.h5ad"
    spots.write_h5ad(halved)
    cfg = load_config("tiny").tile
    cfg.images = False
    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("s0", synth.slide, halved), cfg)  # most still land on tissue
    assert any("50 µm apart but --pitch-um is 100" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        tile_sample(Run(tmp_path / "right"), SampleSpec("s0", synth.slide, synth.spots), cfg)
    assert not any("apart" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_imported_features_that_are_not_finite_are_refused(tmp_path: Path, synth, bad: float) -> None:
    from typer.testing import CliRunner

    from hinge_cli.cli.app import app
    from hinge_cli.encoders.registry import get_spec
    from hinge_cli.formats.hest import write_patch_file
    from hinge_cli.synthetic.fixtures import make_trident_features

    run = Run(tmp_path / "run")
    hinge("tile", str(synth.slide), "--spots", str(synth.spots), "--run", str(run.root), "--config", "tiny", "--no-images")
    folder = tmp_path / "trident"
    folder.mkdir()
    made = make_trident_features(folder / "s0.h5", synth.spots, 0.5, dim=get_spec("uni").dim, hest_barcodes=False)
    made.features[[1, 4], 3] = bad
    (folder / "s0.h5").unlink()
    write_patch_file(folder / "s0.h5", made, "features", False)
    result = CliRunner().invoke(app, ["embed", "--import-features", str(folder), "--encoder", "uni", "--run", str(run.root)])
    assert result.exit_code == 2 and "2 of the" in result.output and "hold NaN or infinite values" in result.output, result.output
    assert not run.embeddings("uni", "s0").exists()
