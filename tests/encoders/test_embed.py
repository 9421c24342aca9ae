"""`hinge embed`: outputs aligned with the tiles, views, resume/overwrite/shard, slide reads, CLI errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import EmbedConfig, load_config
from hinge_cli.data.samples import SampleSpec
from hinge_cli.encoders import registry as enc
from hinge_cli.encoders.embedding import parse_weights, read_plan_tiles
from hinge_cli.encoders.registry import ARCHS, REGISTRY, build_encoder, get_spec, parse_encoders
from hinge_cli.encoders.vit import VisionTransformer
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run, Shard
from hinge_cli.slide.reader import open_slide
from hinge_cli.stages.embed import embed_samples
from hinge_cli.stages.tile import tile_samples
from hinge_cli.synthetic.slides import make_synthetic_sample

runner = CliRunner()


def tile_run(root: Path, synth, images: bool = True, sample: str = "s0") -> Run:
    run = Run(root)
    cfg = load_config("tiny").tile
    cfg.images = images
    tile_samples(run, [SampleSpec(sample, synth.slide, synth.spots, None)], cfg)
    return run


def read(path: Path) -> dict:
    with h5py.File(path, "r") as h5:
        return {k: h5[k][()] for k in h5} | {"attrs": dict(h5.attrs)}


@pytest.fixture
def small_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default encoder's code on smaller fields and tiles: the bookkeeping tests need not pay for 448 px fields."""
    fields = (enc.Field(64, 4.0), enc.Field(64, 8.0))
    spec = dataclasses.replace(REGISTRY["default"], fields=fields, build=lambda: enc.MultiFieldHandcrafted(fields, tile_px=64))
    monkeypatch.setitem(REGISTRY, "default", spec)


def test_default_embeddings_align_with_tiles_and_resume(tmp_path: Path, synth, small_default: None) -> None:
    run = tile_run(tmp_path / "run", synth)
    summary = embed_samples(run, EmbedConfig(device="cpu", batch_size=8))
    assert summary.done == ["s0"]
    out = read(run.embeddings("default", "s0"))
    tiles = read(run.tiles("s0"))
    assert out["embeddings"].shape == (len(tiles["barcode"]), get_spec("default").dim)
    assert out["embeddings"].dtype == np.float32 and np.isfinite(out["embeddings"]).all()
    assert list(out["barcodes"]) == list(tiles["barcode"])
    np.testing.assert_array_equal(out["coords"], tiles["coords"])
    assert out["attrs"]["views"] == 1 and out["attrs"]["encoders"] == '["default"]'
    assert run.stage("s0", "embed:default")["status"] == "ok"
    # Each row is that spot's own features: re-embedding a subset in another order gives the same rows.
    encoder = build_encoder("default")
    pick = np.array([3, 0, 5])
    with open_slide(synth.slide) as slide:
        plans = encoder.plan_slide(tiles["coords"][pick].astype(float), slide.mpp)
        again = encoder.encode_slide(plans, lambda fld, plan: read_plan_tiles(slide, fld, plan, 1))
    np.testing.assert_allclose(again[:, 0], out["embeddings"][pick], rtol=1e-5, atol=1e-6)

    mtime = run.embeddings("default", "s0").stat().st_mtime_ns
    again = embed_samples(run, EmbedConfig(device="cpu"))
    assert again.skipped == ["s0"] and run.embeddings("default", "s0").stat().st_mtime_ns == mtime
    redo = embed_samples(run, EmbedConfig(device="cpu"), overwrite=True)
    assert redo.done == ["s0"]


@pytest.fixture
def tiny_uni(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """'uni' at toy size with a weights file: exercises the learned-encoder path end to end."""
    arch = ARCHS["uni"].scaled(32, 1, 4, img_size=64)
    spec = dataclasses.replace(REGISTRY["uni"], build=lambda: VisionTransformer(arch), dim=32, fields=(enc.Field(64),), preprocess=None)
    monkeypatch.setitem(REGISTRY, "uni", spec)
    path = tmp_path / "uni.safetensors"
    from safetensors.torch import save_file

    save_file(VisionTransformer(arch).state_dict(), str(path))
    return path


def test_views_kept_or_averaged(tmp_path: Path, synth, tiny_uni: Path) -> None:
    run = tile_run(tmp_path / "run", synth)
    embed_samples(run, EmbedConfig(encoder="uni", views=8, device="cpu"), weights=[str(tiny_uni)])
    kept = read(run.embeddings("uni", "s0"))
    n = len(kept["barcodes"])
    assert kept["embeddings"].shape == (n, 8, 32) and kept["attrs"]["views_kept"]
    # View k of spot i is the encoder applied to that spot's tile rotated k quarter turns (transposed for k >= 4).
    patch = read(run.tiles("s0"))["img"][:1]
    encoder = build_encoder("uni", weights=tiny_uni)
    for k in (1, 6):
        turned = np.rot90(patch.transpose(0, 2, 1, 3) if k >= 4 else patch, k % 4, axes=(1, 2))
        np.testing.assert_allclose(kept["embeddings"][0, k], encoder([np.ascontiguousarray(turned)])[0, 0], rtol=1e-4, atol=1e-5)
    embed_samples(run, EmbedConfig(encoder="uni", views=8, average_views=True, device="cpu"), weights=[str(tiny_uni)],
                  overwrite=True)
    mean = read(run.embeddings("uni", "s0"))
    assert mean["embeddings"].shape == (n, 32) and not mean["attrs"]["views_kept"]
    np.testing.assert_allclose(mean["embeddings"], kept["embeddings"].mean(1), rtol=1e-4, atol=1e-5)


def test_encoders_concatenate_in_order(tmp_path: Path, synth, tiny_uni: Path, small_default: None) -> None:
    run = tile_run(tmp_path / "run", synth)
    embed_samples(run, EmbedConfig(encoder="uni", device="cpu"), weights=[str(tiny_uni)])
    embed_samples(run, EmbedConfig(encoder="default,uni", device="cpu"), weights=[f"uni={tiny_uni}"])
    both = read(run.embeddings("default+uni", "s0"))
    alone = read(run.embeddings("uni", "s0"))["embeddings"]
    d = get_spec("default").dim
    assert both["embeddings"].shape == (len(alone), d + 32)
    np.testing.assert_allclose(both["embeddings"][:, d:], alone, rtol=1e-5, atol=1e-6)
    assert both["attrs"]["dims"] == f"[{d}, 32]"


def test_no_images_reads_the_slide_and_gives_the_same_features(tmp_path: Path, synth, tiny_uni: Path) -> None:
    with_img = tile_run(tmp_path / "a", synth, images=True)
    without = tile_run(tmp_path / "b", synth, images=False)
    with h5py.File(without.tiles("s0"), "r") as h5:
        assert "img" not in h5
    for run in (with_img, without):
        embed_samples(run, EmbedConfig(encoder="uni", device="cpu", batch_size=4), weights=[str(tiny_uni)])
    a = read(with_img.embeddings("uni", "s0"))["embeddings"]
    b = read(without.embeddings("uni", "s0"))["embeddings"]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_default_views_and_no_images(tmp_path: Path, synth, small_default: None) -> None:
    """--views 8 keeps 8 copies of the default's view-invariant features; tiles without pixels give the same features."""
    run = tile_run(tmp_path / "run", synth)
    embed_samples(run, EmbedConfig(device="cpu"))
    one = read(run.embeddings("default", "s0"))["embeddings"]
    embed_samples(run, EmbedConfig(device="cpu", views=8), overwrite=True)
    kept = read(run.embeddings("default", "s0"))
    assert kept["embeddings"].shape == (len(one), 8, one.shape[1]) and kept["attrs"]["views_kept"]
    np.testing.assert_array_equal(kept["embeddings"], np.repeat(one[:, None], 8, axis=1))
    bare = tile_run(tmp_path / "bare", synth, images=False)
    embed_samples(bare, EmbedConfig(device="cpu"))
    np.testing.assert_array_equal(read(bare.embeddings("default", "s0"))["embeddings"], one)


def test_shard_splits_samples(tmp_path: Path, synth, small_default: None) -> None:
    run = tile_run(tmp_path / "run", synth)
    tile_run(tmp_path / "run", synth, sample="s1")
    first = embed_samples(run, EmbedConfig(device="cpu"), shard=Shard(0, 2))
    second = embed_samples(run, EmbedConfig(device="cpu"), shard=Shard(1, 2))
    assert first.done == ["s0"] and second.done == ["s1"]


def test_default_encoder_separates_tissue_classes(tmp_path: Path) -> None:
    """Leave-one-out nearest-centroid on the real default encoder's features beats the majority class by far."""
    import anndata as ad

    s = make_synthetic_sample(tmp_path / "c", "c", size_px=1024, mpp=1.0, seed=11, pitch_um=100, n_genes=30)
    run = tile_run(tmp_path / "run", s, images=False, sample="c")
    embed_samples(run, EmbedConfig(device="cpu"))
    out = read(run.embeddings("default", "c"))
    labels = ad.read_h5ad(s.spots).obs.loc[[b.decode() for b in out["barcodes"]], "tissue_class"].astype(str).to_numpy()
    x = (out["embeddings"] - out["embeddings"].mean(0)) / (out["embeddings"].std(0) + 1e-6)
    correct = 0
    for i in range(len(x)):
        rest = np.arange(len(x)) != i
        classes = sorted(set(labels[rest]))
        centroids = np.stack([x[rest & (labels == c)].mean(0) for c in classes])
        correct += classes[int(((centroids - x[i]) ** 2).sum(1).argmin())] == labels[i]
    accuracy = correct / len(x)
    majority = max((labels == c).mean() for c in set(labels))
    assert len(x) >= 30 and len(set(labels)) >= 3
    assert accuracy >= majority + 0.2, (accuracy, majority)


def test_weights_flag_parsing() -> None:
    specs = parse_encoders("uni,conch")
    assert parse_weights(["uni=/a.bin", "conch=/b.bin"], specs) == {"uni": Path("/a.bin"), "conch": Path("/b.bin")}
    with pytest.raises(HingeError, match="does not say which encoder"):
        parse_weights(["/a.bin"], specs)
    assert parse_weights(["/a.bin"], parse_encoders("default,uni")) == {"uni": Path("/a.bin")}
    with pytest.raises(HingeError, match="not a learned encoder"):
        parse_weights(["default=/a.bin"], parse_encoders("default"))


def test_cli_list_and_missing_weights(tmp_path: Path, synth, monkeypatch: pytest.MonkeyPatch, small_default: None) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    listed = runner.invoke(app, ["embed", "--list"])
    assert listed.exit_code == 0
    assert "default" in listed.output and "virchow2" in listed.output and "2560" in listed.output
    assert "weights not found" in listed.output
    given = tmp_path / "uni.bin"
    missing = runner.invoke(app, ["embed", "--list", "--weights", f"uni={given}"])
    assert missing.exit_code == 0 and f"[{given} does not exist]" in missing.output
    given.write_bytes(b"")
    assert f"[{given}]" in runner.invoke(app, ["embed", "--list", "--weights", f"uni={given}"]).output
    tile_run(tmp_path / "bad", synth)
    result = runner.invoke(app, ["embed", "--run", str(tmp_path / "bad"), "--encoder", "uni", "-q"])
    assert result.exit_code == 2
    assert "no weights found for encoder 'uni'" in result.output
    empty = runner.invoke(app, ["embed", "--run", str(tmp_path / "empty"), "-q"])
    assert empty.exit_code == 2 and "no tiled samples" in empty.output
    tile_run(tmp_path / "run", synth)
    ok = runner.invoke(app, ["embed", "--run", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "run" / "embeddings" / "default" / "s0.h5").exists()
