"""`hinge generate`: a tiny model trained on default-encoder features predicts a new synthetic slide.

The AnnData is checked the way scanpy reads it (scanpy is not a dependency), against
the tiles it came from; then determinism, caching, sample spread, the refusals and
sharding. Memory against spot count is measured by benchmarks/generate_speed.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from kills import Killed, count_writes, kill_at
from PIL import Image
from stand_in import trained_tiny, write_features
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import GenerateConfig
from hinge_cli.data.expression import Transform
from hinge_cli.data.features import FeatureNorm
from hinge_cli.data.samples import SampleSpec
from hinge_cli.errors import HingeError
from hinge_cli.eval import evaluate, read_prediction
from hinge_cli.model import Hinge, load_checkpoint, save_checkpoint
from hinge_cli.model.checkpoint import sidecar_path
from hinge_cli.predict.trained import load_trained_model
from hinge_cli.run.directory import Run, Shard
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.slide.writer import write_pyramidal_tiff
from hinge_cli.stages.generate import Target, generate
from hinge_cli.synthetic.slides import make_synthetic_sample

pytestmark = pytest.mark.slow  # trains a model to predict with

runner = CliRunner()
FAST = {"n_samples": 2, "steps": 4, "device": "cpu"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Run, Path]:
    """A run with two training samples and a briefly trained tiny model; and a new slide (2 µm/px: cheap to embed)."""
    root = tmp_path_factory.mktemp("generate")
    run, _ = trained_tiny(root, pitch_um=150.0)  # the grid of new slides: few spots
    new = make_synthetic_sample(root / "data", "new", size_px=256, mpp=2.0, seed=30, n_genes=40)
    return run, new.slide


@pytest.fixture(scope="module")
def predicted(trained: tuple[Run, Path]) -> tuple[Run, Path, Path]:
    """`hinge generate --slide new.tif` through the CLI, grid mode, with plots."""
    run, slide = trained
    out = run.root.parent / "out" / "new.h5ad"
    genes = load_checkpoint(run.checkpoint("best")).card.genes
    result = runner.invoke(app, ["generate", "--slide", str(slide), "--out", str(out), "--run", str(run.root),
                                 "--samples", "3", "--steps", "4", "--device", "cpu", "--plot", ",".join(genes[:2]), "-q"])
    assert result.exit_code == 0, result.output
    return run, slide, out


def test_output_is_valid_anndata_consistent_with_the_tiles(predicted: tuple[Run, Path, Path]) -> None:
    run, _, out = predicted
    adata = ad.read_h5ad(out)
    adata._check_dimensions()
    adata._check_uniqueness()
    copy = ad.AnnData(adata.X, adata.obs, adata.var, adata.uns, obsm=dict(adata.obsm), layers=dict(adata.layers))
    copy.write_h5ad(out.with_name("copy.h5ad"))  # what anndata itself builds from it writes again
    card = load_checkpoint(run.checkpoint("best")).card
    with h5py.File(run.tiles("new"), "r") as h5:
        barcodes = [b.decode() for b in h5["barcode"][:, 0]]
        coords, frac, attrs = h5["coords"][()], h5["tissue_frac"][()], dict(h5.attrs)
    assert attrs["mode"] == "grid" and attrs["pitch_um"] == card.tiling.pitch_um
    assert list(adata.obs_names) == barcodes and list(adata.var_names) == card.genes
    assert adata.X.dtype == np.float32 and adata.X.shape == (len(barcodes), len(card.genes)) and np.isfinite(adata.X).all()
    assert adata.layers["std"].shape == adata.X.shape and (adata.layers["std"] > 0).any() and (adata.layers["std"] >= 0).all()
    np.testing.assert_array_equal(adata.obsm["spatial"], coords.astype(np.float64))
    assert adata.obsm["spatial"].dtype == np.float64
    np.testing.assert_array_equal(adata.obs["tissue_fraction"].to_numpy(), frac)
    np.testing.assert_array_equal(adata.obs["in_tissue"].to_numpy(), (frac >= 0.5).astype(int))  # Visium's 0/1
    hinge = adata.uns["hinge"]
    assert hinge["checkpoint_sha256"] == card.sha256 and list(hinge["encoders"]) == ["default"]
    assert (hinge["sampler"], hinge["samples"], hinge["seed"], hinge["n_genes"]) == ("coupled", 3, 0, len(card.genes))
    assert "steps" not in hinge  # one pass: the reverse process's steps do not apply
    assert dict(hinge["transform"]) == card.transform.to_dict() and hinge["version"]
    assert run.stage("new", "generate")["status"] == "ok"


def test_uns_spatial_has_what_scanpy_reads(predicted: tuple[Run, Path, Path]) -> None:
    _, slide, out = predicted
    adata = ad.read_h5ad(out)
    (library,) = adata.uns["spatial"]
    entry = adata.uns["spatial"][library]
    assert library == "new" and set(entry) == {"images", "scalefactors"}
    assert set(entry["images"]) == {"hires"} and set(entry["scalefactors"]) == {"tissue_hires_scalef", "spot_diameter_fullres"}
    hires = entry["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and hires.shape[2] == 3
    scalef, diameter = entry["scalefactors"]["tissue_hires_scalef"], entry["scalefactors"]["spot_diameter_fullres"]
    assert isinstance(scalef, float) and isinstance(diameter, float)
    assert hires.shape[1] == round(256 * scalef) and diameter == pytest.approx(55 / 2.0)
    xy = adata.obsm["spatial"] * scalef  # spots land on tissue in the image: darker than the white glass
    assert hires[xy[:, 1].astype(int), xy[:, 0].astype(int)].mean() < 225


def test_plots_show_he_mean_and_std(predicted: tuple[Run, Path, Path]) -> None:
    run, _, out = predicted
    genes = load_checkpoint(run.checkpoint("best")).card.genes[:2]
    for gene in genes:
        png = np.asarray(Image.open(out.with_name(f"new_{gene}.png")).convert("RGB"))
        assert png.shape[1] > 2 * png.shape[0]  # three panels side by side
        assert len(np.unique(png.reshape(-1, 3), axis=0)) > 50


def test_same_seed_same_file_cached_inputs_and_batch_independence(predicted: tuple[Run, Path, Path], tmp_path: Path) -> None:
    run, slide, out = predicted
    tiles_mtime, emb_mtime = run.tiles("new").stat().st_mtime_ns, run.embeddings("default", "new").stat().st_mtime_ns
    again = tmp_path / "again.h5ad"
    generate(run, [Target("new", slide)], GenerateConfig(**{**FAST, "n_samples": 3, "batch_size": 5}), out=again)
    assert run.tiles("new").stat().st_mtime_ns == tiles_mtime  # cached, not redone
    assert run.embeddings("default", "new").stat().st_mtime_ns == emb_mtime
    a, b = ad.read_h5ad(out), ad.read_h5ad(again)
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)  # batch size 5 vs 64: same draws per spot
    np.testing.assert_allclose(a.layers["std"], b.layers["std"], rtol=1e-5, atol=1e-6)
    twin = tmp_path / "twin.h5ad"
    generate(run, [Target("new")], GenerateConfig(**{**FAST, "n_samples": 3, "batch_size": 5}), out=twin)
    c = ad.read_h5ad(twin)
    assert np.array_equal(b.X, c.X) and np.array_equal(b.layers["std"], c.layers["std"])
    other = tmp_path / "other.h5ad"
    generate(run, [Target("new")], GenerateConfig(**{**FAST, "n_samples": 3, "seed": 1}), out=other)
    assert not np.array_equal(ad.read_h5ad(other).X, c.X)


def test_keep_samples_and_single_sample_zero_fill(trained: tuple[Run, Path], tmp_path: Path) -> None:
    run, _ = trained
    kept = tmp_path / "kept.h5ad"
    reverse = {**FAST, "sampler": "reverse", "n_samples": 3}
    generate(run, [Target("t0")], GenerateConfig(**{**reverse, "keep_samples": True, "point": "samples"}), out=kept)
    adata = ad.read_h5ad(kept)
    draws = adata.obsm["samples"]
    assert draws.shape == (adata.n_obs, 3, adata.n_vars)
    assert draws.min() == 0.0 and adata.layers["q05"].min() >= 0.0  # censored at the floor (this model draws below it)
    np.testing.assert_allclose(draws.mean(1), adata.X, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(draws.std(1), adata.layers["std"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.quantile(draws, 0.05, axis=1), adata.layers["q05"], rtol=1e-5, atol=1e-5)
    assert np.all(adata.layers["q05"] <= adata.layers["q95"]) and np.all(adata.layers["q95"] <= draws.max(1) + 1e-6)
    one_shot = tmp_path / "one_shot.h5ad"
    generate(run, [Target("t0")], GenerateConfig(**{**reverse, "keep_samples": False}), out=one_shot)
    lean = ad.read_h5ad(one_shot)
    assert "samples" not in lean.obsm and lean.uns["hinge"]["point"] == "one-shot"
    np.testing.assert_allclose(lean.layers["std"], adata.layers["std"], rtol=1e-5, atol=1e-5)  # the draws are the same
    assert not np.allclose(lean.X, adata.X)
    checkpoint = load_checkpoint(run.checkpoint("best"))
    checkpoint.net.diffusion = dataclasses.replace(checkpoint.net.diffusion, fill="zero")
    zero = tmp_path / "zero.safetensors"
    save_checkpoint(zero, checkpoint.net, checkpoint.card)
    one = tmp_path / "one.h5ad"
    generate(run, [Target("t0")], GenerateConfig(**{**reverse, "n_samples": 1}), checkpoint=zero, out=one)
    single = ad.read_h5ad(one)
    assert single.uns["hinge"]["fill"] == "zero" and np.all(single.layers["std"] == 0)
    assert np.isfinite(single.X).all() and single.X.std() > 0
    coupled = tmp_path / "coupled.h5ad"
    generate(run, [Target("t0")], GenerateConfig(**{**FAST, "n_samples": 1}), checkpoint=zero, out=coupled)
    gaussian = ad.read_h5ad(coupled)  # one draw, but the std and quantiles are the predictive Gaussian's
    assert np.all(gaussian.layers["std"] > 0)
    np.testing.assert_allclose(gaussian.layers["q95"] - gaussian.X, 1.6448536 * gaussian.layers["std"], rtol=1e-4, atol=1e-5)


def _tampered(run: Run, tmp_path: Path, name: str, **changes: object) -> Path:
    path = tmp_path / f"{name}.safetensors"
    shutil.copy(run.checkpoint("best"), path)
    meta = json.loads(sidecar_path(run.checkpoint("best")).read_text())
    sidecar_path(path).write_text(json.dumps({**meta, **changes}))
    return path


def test_view_writes_the_page_beside_the_prediction(trained: tuple[Run, Path], tmp_path: Path) -> None:
    run, _ = trained
    out = tmp_path / "t1.h5ad"
    generate(run, [Target("t1")], GenerateConfig(**{**FAST, "view": True}), out=out)
    page = out.with_suffix(".html")
    assert page.exists() and 'id="hinge-meta"' in page.read_text() and str(page) in run.stage("t1", "generate")["plots"]


def test_the_shift_report_goes_from_the_card_to_the_prediction_and_eval(trained: tuple[Run, Path], tmp_path: Path) -> None:
    run, slide = trained
    out = tmp_path / "t1.h5ad"
    generate(run, [Target("t1")], GenerateConfig(**FAST), out=out)
    shift = ad.read_h5ad(out).uns["hinge"]["shift"]
    assert float(shift["score"]) == 0 and not bool(shift["outside"]) and int(shift["training_slides"]) == 2  # a training slide
    result = evaluate([out], [Path(run.sample("t1")["expression"]["path"])], out=tmp_path / "eval")
    assert result.slides[0].shift["outside"] is False
    assert "shift from the training slides: inside what training saw. Feature score 0.000" in (tmp_path / "eval" / "report.md").read_text()
    generate(run, [Target("new", slide)], GenerateConfig(**FAST), out=tmp_path / "new.h5ad")  # real features, unlike the stand-ins
    assert float(ad.read_h5ad(tmp_path / "new.h5ad").uns["hinge"]["shift"]["score"]) > 0


def test_refusals(trained: tuple[Run, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, slide = trained
    out = tmp_path / "t1.h5ad"
    generate(run, [Target("t1")], GenerateConfig(**{**FAST, "n_samples": 1, "steps": 1}), out=out)
    before = out.read_bytes()
    with pytest.raises(HingeError, match="--overwrite"):
        generate(run, [Target("t1")], GenerateConfig(**FAST), out=out)
    assert out.read_bytes() == before
    meta = json.loads(sidecar_path(run.checkpoint("best")).read_text())
    bad_panel = _tampered(run, tmp_path, "panel", genes=meta["genes"][:-1])
    with pytest.raises(HingeError, match="its card lists 11 genes but its architecture 12"):
        generate(run, [Target("t1")], GenerateConfig(**FAST), checkpoint=bad_panel, out=tmp_path / "x.h5ad")
    bad_encoder = _tampered(run, tmp_path, "encoder", encoders=["conch"], encoder_key="conch")
    with pytest.raises(HingeError, match="512-dim features"):
        generate(run, [Target("t1")], GenerateConfig(**FAST), checkpoint=bad_encoder, out=tmp_path / "x.h5ad")
    with pytest.raises(HingeError, match="not in the model's panel"):
        generate(run, [Target("t1")], GenerateConfig(**FAST), genes_to_plot=["NOPE"], out=tmp_path / "x.h5ad")
    with pytest.raises(HingeError, match="one file"):
        generate(run, [Target("t0"), Target("t1")], GenerateConfig(**FAST), out=tmp_path / "x.h5ad")
    with pytest.raises(HingeError, match="not tiled"):
        generate(run, [Target("ghost")], GenerateConfig(**FAST), out=tmp_path / "x.h5ad")
    with pytest.raises(HingeError, match="cached tiles differ"):  # t0 was tiled at its spots; a grid would replace them
        generate(run, [Target("t0", slide)], GenerateConfig(**FAST), out=tmp_path / "x.h5ad")
    blank = write_pyramidal_tiff(tmp_path / "blank.tif", np.full((512, 512, 3), 242, np.uint8), 0.5)
    with pytest.raises(HingeError, match="no tissue"):
        generate(run, [Target("blank", blank)], GenerateConfig(**FAST), out=tmp_path / "x.h5ad")
    assert not (tmp_path / "x.h5ad").exists()


def test_missing_encoder_weights_name_the_encoder(trained: tuple[Run, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run, slide = trained
    for var in ("HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    checkpoint = load_checkpoint(run.checkpoint("best"))
    arch = checkpoint.card.architecture
    uni = Hinge.build(checkpoint.net.cfg, arch.vocab_size, arch.gene_ids, 1024, arch.diffusion)
    norm = FeatureNorm.from_dict({"mean": [0.0] * 1024, "std": [1.0] * 1024})
    path = tmp_path / "uni.safetensors"
    save_checkpoint(path, uni, dataclasses.replace(checkpoint.card, vocab=None, encoders=["uni"], encoder_key="uni", feature_norm=norm))
    result = runner.invoke(app, ["generate", "--slide", str(slide), "--sample-id", "viauni", "--checkpoint", str(path),
                                 "--run", str(run.root), "--out", str(tmp_path / "u.h5ad"), "-q"])
    assert result.exit_code == 2
    assert "no weights found for encoder 'uni'" in result.output and "--weights uni=FILE" in result.output
    assert not run.tiles("viauni").exists()  # refused before any work


def test_far_mpp_warns_and_shards_split_samples(trained: tuple[Run, Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    run, slide = trained
    tile_sample(run, SampleSpec("coarse", slide, mpp=2.8), load_trained_model(run.checkpoint("best")).tile_config())
    write_features(run, "coarse", 5)
    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        generate(run, [Target("coarse")], GenerateConfig(**{**FAST, "n_samples": 1, "steps": 1}), out=tmp_path / "c.h5ad")
    assert any("2.8 µm/px" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hinge_cli"):
        generate(run, [Target("t0")], GenerateConfig(**{**FAST, "n_samples": 1, "steps": 1}), out=tmp_path / "t0.h5ad")
    assert not any("µm/px" in r.getMessage() for r in caplog.records)

    folder = tmp_path / "sharded"
    targets = [Target("t0"), Target("t1")]
    cfg = GenerateConfig(**{**FAST, "n_samples": 1, "steps": 1})
    first = generate(run, targets, cfg, out=folder, shard=Shard(0, 2))
    second = generate(run, targets, cfg, out=folder, shard=Shard(1, 2))
    assert list(first.done) == ["t0"] and list(second.done) == ["t1"]
    assert sorted(p.name for p in folder.glob("*.h5ad")) == ["t0.h5ad", "t1.h5ad"]
    assert list(generate(run, targets, cfg, out=folder).skipped) == ["t0", "t1"]  # a re-run resumes, it does not redo


def test_visium_outs_are_predicted_at_their_spots(trained: tuple[Run, Path], tmp_path: Path) -> None:
    from hinge_cli.synthetic.fixtures import make_spaceranger_outs

    run, _ = trained
    visium = make_spaceranger_outs(tmp_path / "v1" / "outs", side_px=600, seed=5)
    out = tmp_path / "v1.h5ad"
    result = runner.invoke(app, ["generate", "--visium", str(visium.outs), "--out", str(out), "--run", str(run.root),
                                 "--samples", "1", "--steps", "2", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(out)
    assert adata.n_obs == visium.n_in_tissue and "expression" not in run.sample("v1")  # predicted, not training data
    hires = 0.5  # the fixture's tissue_hires_scalef: coordinates are in the hires image's pixels
    centre, radius = np.array(visium.tissue.centre), visium.tissue.radius + 1 / hires
    assert (np.hypot(*(adata.obsm["spatial"] / hires - centre).T) < radius).all()


def test_generate_killed_at_every_write_resumes_to_the_uninterrupted_result(trained: tuple[Run, Path], tmp_path: Path) -> None:
    run, _ = trained
    cfg = GenerateConfig(**{**FAST, "n_samples": 1, "steps": 2})

    def predict(folder: Path) -> None:
        generate(run, [Target("t0"), Target("t1")], cfg, out=folder)

    writes = count_writes(lambda: predict(tmp_path / "ref"))
    assert writes >= 6  # per sample: the running record, the .h5ad, the done record
    expected = ad.read_h5ad(tmp_path / "ref" / "t1.h5ad")
    for n in range(writes):
        folder = tmp_path / f"kill{n}"
        with kill_at(n), pytest.raises(Killed):
            predict(folder)
        predict(folder)  # no --overwrite: a file left without its done record is this run's own unfinished work
        for sample in ("t0", "t1"):
            assert run.is_done(sample, "generate", (folder / f"{sample}.h5ad").resolve()), (n, sample)
        again = ad.read_h5ad(folder / "t1.h5ad")
        np.testing.assert_array_equal(again.X, expected.X)
        np.testing.assert_array_equal(again.layers["std"], expected.layers["std"])


def test_a_read_only_run_predicts_to_another_folder(trained: tuple[Run, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = trained
    manifest, config = run.manifest_path.read_bytes(), run.config_path.read_bytes()
    monkeypatch.setattr(Run, "read_only", property(lambda self: True))  # root cannot chmod a folder read-only
    result = runner.invoke(app, ["generate", "--sample-id", "t1", "--run", str(run.root), "--out", str(tmp_path / "t1.h5ad"),
                                 "--n-samples", "1", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "read-only" in result.output and (tmp_path / "t1.h5ad").exists()
    assert run.manifest_path.read_bytes() == manifest and run.config_path.read_bytes() == config


def test_train_fits_a_spread_scale_that_widens_the_draws(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """`hinge train` records a per-gene scale fitted on the validation spots; generate applies it unless told not to."""
    run, _ = trained
    card = load_checkpoint(run.checkpoint("best")).card
    scale = np.array(card.calibration.scale)
    assert scale.shape == (len(card.genes),) and np.all(scale > 0) and card.calibration.n_spots > 0
    assert card.calibration.within_1std >= 0.683 and card.calibration.within_1std_raw != card.calibration.within_1std
    settings = {**FAST, "n_samples": 4}
    paths = {flag: tmp_path / f"{flag}.h5ad" for flag in (True, False)}
    for flag, path in paths.items():
        generate(run, [Target("t0")], GenerateConfig(**settings, calibrated=flag), out=path)
    on, off = (ad.read_h5ad(paths[flag]) for flag in (True, False))
    assert np.array_equal(on.X, off.X) and on.uns["hinge"]["spread_scale"] == "validation"
    spread = off.layers["std"] > 1e-4
    np.testing.assert_allclose((on.layers["std"] / np.where(spread, off.layers["std"], 1))[spread],
                               np.broadcast_to(scale, on.shape)[spread], rtol=1e-3)


def test_train_refits_on_every_spot_and_keeps_the_validated_model(trained: tuple[Run, Path]) -> None:
    run, _ = trained
    best, selected = (load_checkpoint(run.checkpoint(name)) for name in ("best", "selected"))
    assert best.card.refit is not None and selected.card.refit is None
    assert best.card.refit.epochs == selected.card.training.best_epoch
    assert best.card.refit.n_train_spots == selected.card.training.n_train_spots + selected.card.training.n_val_spots
    assert best.card.refit.n_val_spots == 0 and not any("val_loss" in r for r in best.card.refit.history)  # none held out
    assert best.card.calibration == selected.card.calibration and best.card.split == selected.card.split
    deflation = selected.card.coupling.joint_deflation  # measured once, on the validated model, and carried over
    assert 0.0 <= deflation <= 1.0 and best.card.coupling.joint_deflation == deflation
    weights = zip(best.net.state_dict().values(), selected.net.state_dict().values(), strict=True)
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in weights)


def test_train_couples_the_genes_and_calibrate_fits_scale_and_coupling_again(trained: tuple[Run, Path], tmp_path: Path) -> None:
    run, _ = trained
    card = load_checkpoint(run.checkpoint("best")).card
    correlation = np.asarray(card.coupling.correlation)
    assert correlation.shape == (len(card.genes),) * 2 and card.calibration.sampler == "coupled"
    np.testing.assert_allclose(correlation, correlation.T)
    np.testing.assert_allclose(np.diag(correlation), 1.0)
    assert np.linalg.eigvalsh(correlation).min() > 0  # a valid correlation: the sampler's Cholesky factor exists
    result = runner.invoke(app, ["calibrate", "--run", str(run.root), "--sampler", "reverse", "-q"])
    assert result.exit_code == 0, result.output
    again = load_checkpoint(run.checkpoint("best")).card
    assert again.calibration.sampler == "reverse" and again.sha256 == card.sha256  # the weights are untouched
    np.testing.assert_allclose(np.asarray(again.coupling.correlation), correlation)
    result = runner.invoke(app, ["calibrate", "--run", str(run.root), "--sampler", "coupled", "-q"])  # hinge.yaml now says reverse
    restored = load_checkpoint(run.checkpoint("best")).card.calibration
    assert result.exit_code == 0 and (restored.scale, restored.within_1std) == (card.calibration.scale, card.calibration.within_1std)
    empty = runner.invoke(app, ["calibrate", "--run", str(tmp_path / "nothing"), "-q"])
    assert empty.exit_code == 2 and "hinge train" in empty.output


def test_slide_standardised_features_undo_a_slide_wide_stain_shift(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """A slide whose every feature is scaled and offset (a stain or scanner shift) predicts as the original does, by
    default; a model standardised by its training spots alone (the old behaviour) reads the shift as expression."""
    run, _ = trained
    assert load_trained_model(run.checkpoint("best"), "cpu").card.per_slide
    shifted = Run(shutil.copytree(run.root, tmp_path / "run"))
    with h5py.File(shifted.embeddings("default", "t1"), "r+") as h5:
        features = h5["features"][()]
        h5["features"][...] = features * np.linspace(0.5, 2.0, features.shape[-1]) + np.linspace(-3.0, 3.0, features.shape[-1])
    cfg = GenerateConfig(**{**FAST, "n_samples": 1})
    runs = {"original": run, "shifted": shifted}
    card = json.loads(sidecar_path(run.checkpoint("best")).read_text())
    training_only = _tampered(run, tmp_path, "training-only", feature_norm={**card["feature_norm"], "per_slide": False})
    for name, r in runs.items():
        generate(r, [Target("t1")], cfg, out=tmp_path / f"{name}.h5ad")
        generate(r, [Target("t1")], cfg, checkpoint=training_only, out=tmp_path / f"old-{name}.h5ad")
    slide = {name: ad.read_h5ad(tmp_path / f"{name}.h5ad") for name in runs}
    old = {name: ad.read_h5ad(tmp_path / f"old-{name}.h5ad") for name in runs}
    np.testing.assert_allclose(slide["shifted"].X, slide["original"].X, rtol=1e-4, atol=1e-4)
    assert slide["original"].uns["hinge"]["feature_norm"] == "slide"
    assert old["original"].uns["hinge"]["feature_norm"] == "training"
    assert np.abs(old["shifted"].X - old["original"].X).max() > 0.1


def test_thinning_the_measured_counts_leaves_the_prediction_bit_identical(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """A prediction never sees the slide's counts: a section sequenced 10x shallower gets the same file's values."""
    run, slide = trained
    spots = make_synthetic_sample(tmp_path / "data", "deep", size_px=256, mpp=2.0, seed=30, n_genes=40).spots
    deep = ad.read_h5ad(spots)
    shallow = deep.copy()
    counts = np.asarray(deep.X.toarray() if hasattr(deep.X, "toarray") else deep.X)
    shallow.X = np.random.default_rng(0).binomial(counts.astype(np.int64), 0.1).astype(np.float32)
    assert shallow.X.sum() < 0.2 * counts.sum()
    shallow.write_h5ad(tmp_path / "shallow.h5ad")
    layers = {}
    for name, path in (("deep", spots), ("shallow", tmp_path / "shallow.h5ad")):
        out = tmp_path / "out" / f"{name}.h5ad"
        result = runner.invoke(app, ["generate", "--slide", str(slide), "--spots", str(path), "--sample-id", name, "--out", str(out),
                                     "--run", str(run.root), "--n-samples", "3", "--keep-samples", "--device", "cpu", "-q"])
        assert result.exit_code == 0, result.output
        adata = ad.read_h5ad(out)
        layers[name] = [adata.X, *(adata.layers[k] for k in ("std", "q05", "q95")), adata.obsm["samples"]]
    for a, b in zip(*layers.values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_old_card_predicts_in_its_own_units_bit_for_bit(predicted: tuple[Run, Path, Path], tmp_path: Path) -> None:
    """A card from before normalised units (log2 counts, no shift statistics) predicts what its weights predict, in
    log2(counts + 1), and eval reads the file in those units."""
    run, slide, new = predicted
    old = tmp_path / "old" / "best.safetensors"
    old.parent.mkdir()
    shutil.copy(run.checkpoint("best"), old)
    card = json.loads(sidecar_path(run.checkpoint("best")).read_text())
    assert card["transform"]["normalize"] == "total"  # this run's model is of the new kind
    card["transform"] = {"normalize": "none", "target_sum": 10000.0, "log_base": 2.0}
    card.pop("shift")
    sidecar_path(old).write_text(json.dumps(card))
    out = tmp_path / "old.h5ad"
    result = runner.invoke(app, ["generate", "--slide", str(slide), "--sample-id", "new", "--out", str(out), "--run", str(run.root),
                                 "--checkpoint", str(old), "--n-samples", "3", "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    before, after = ad.read_h5ad(new), ad.read_h5ad(out)
    for layer in ("std", "q05", "q95"):
        np.testing.assert_array_equal(before.layers[layer], after.layers[layer])
    np.testing.assert_array_equal(before.X, after.X)
    assert dict(after.uns["hinge"]["transform"]) == card["transform"] and "shift" not in after.uns["hinge"]
    assert read_prediction(out).transform == Transform("none", 1e4, 2.0)


def test_a_slide_with_extreme_standardised_features_is_warned_and_still_predicted(trained: tuple[Run, Path], tmp_path: Path,
                                                                                    caplog: pytest.LogCaptureFixture) -> None:
    run, _ = trained
    card = json.loads(sidecar_path(run.checkpoint("best")).read_text())
    training_only = _tampered(run, tmp_path, "training-only", feature_norm={**card["feature_norm"], "per_slide": False})
    far = Run(shutil.copytree(run.root, tmp_path / "run"))
    with h5py.File(far.embeddings("default", "t1"), "r+") as h5:
        h5["features"][...] = h5["features"][()] * 40.0 + 25.0  # another scanner's features, beyond anything trained on
    cfg = GenerateConfig(**{**FAST, "n_samples": 1})
    for name, r in (("near", run), ("far", far)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            generate(r, [Target("t1")], cfg, checkpoint=training_only, out=tmp_path / f"{name}.h5ad")
        assert ("lie beyond ±8 training stds" in caplog.text) == (name == "far")
        assert np.isfinite(ad.read_h5ad(tmp_path / f"{name}.h5ad").X).all()


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_folder_named_like_a_prediction_is_one_line(trained: tuple[Run, Path], tmp_path: Path, overwrite: bool) -> None:
    run, _ = trained
    folder = tmp_path / "pred.h5ad"
    folder.mkdir()
    with pytest.raises(HingeError, match="is a folder, though named like a prediction file"):
        generate(run, [Target("t1")], GenerateConfig(**FAST), out=folder, overwrite=overwrite)
    assert folder.is_dir() and not any(folder.iterdir())


def test_a_second_job_keeps_the_prediction_another_job_finished_while_it_waited(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """Two `generate` jobs for one output: the one that takes the lock second finds it finished and recorded, and keeps it."""
    from hinge_cli.core.files import OutputFinished
    from hinge_cli.predict.trained import load_trained_model
    from hinge_cli.stages.generate import predict_sample

    run, _ = trained
    model = load_trained_model(run.checkpoint("best"), "cpu")
    out = tmp_path / "t1.h5ad"
    predict_sample(run, "t1", model, out, GenerateConfig(**{**FAST, "seed": 1}), overwrite=False)
    first = out.read_bytes()
    with pytest.raises(OutputFinished):
        predict_sample(run, "t1", model, out, GenerateConfig(**{**FAST, "seed": 2}), overwrite=False)
    assert out.read_bytes() == first
    predict_sample(run, "t1", model, out, GenerateConfig(**{**FAST, "seed": 2}), overwrite=True)  # --overwrite replaces it
    assert out.read_bytes() != first


def test_generate_of_a_new_slide_killed_at_every_write_ends_as_an_uninterrupted_run(trained: tuple[Run, Path], tmp_path: Path) -> None:
    """Tiles and features a killed job left without their records are redone, not reused; nothing stays 'running'."""
    from kills import rerun_after_each_kill

    run, slide = trained
    cfg = GenerateConfig(**{**FAST, "n_samples": 1, "steps": 2})
    for n, again, ref in rerun_after_each_kill(run.root, tmp_path, lambda r: generate(r, [Target("fresh", slide)], cfg)):
        assert again.is_done("fresh", "tile", again.tiles("fresh")) and again.is_done("fresh", "embed:default", again.embeddings("default", "fresh"))
        assert {s["status"] for s in again.sample("fresh")["stages"].values()} == {"ok"}, n
        assert again.tiles("fresh").with_suffix(".png").exists(), n  # the thumbnail too
        np.testing.assert_array_equal(ad.read_h5ad(again.prediction("fresh")).X, ad.read_h5ad(ref.prediction("fresh")).X)


def test_a_read_only_run_predicts_a_new_slide_with_its_work_beside_the_output(trained: tuple[Run, Path], tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run, slide = trained
    before = sorted(p.relative_to(run.root) for p in run.root.rglob("*"))
    monkeypatch.setattr(Run, "read_only", property(lambda self: self.root == run.root))  # root cannot chmod it read-only
    out = tmp_path / "mine" / "brand.h5ad"
    result = runner.invoke(app, ["generate", str(slide), "--sample-id", "brand", "--run", str(run.root), "--out", str(out),
                                 "--n-samples", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.exists() and (out.parent / ".hinge-work" / "tiles" / "brand.h5").exists()
    assert sorted(p.relative_to(run.root) for p in run.root.rglob("*")) == before  # nothing written into the run
