"""`hinge tile`: geometry of patches, spot bookkeeping, grid coverage, errors, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from hinge_cli.cli.app import app
from hinge_cli.config import TileConfig, load_config
from hinge_cli.core.files import OutputLocked, output_lock
from hinge_cli.data.samples import SampleSpec
from hinge_cli.data.sources import read_sample_sheet
from hinge_cli.errors import HingeError
from hinge_cli.run.directory import Run
from hinge_cli.slide.reader import open_slide
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.stages.tile import tile_samples

runner = CliRunner()


def tiny_tile(**kw: object) -> TileConfig:
    cfg = load_config("tiny").tile
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def tiles(run: Run, sample: str) -> dict:
    """The tiles file as a HEST user reads it: barcodes are (N, 1), one per row."""
    with h5py.File(run.tiles(sample), "r") as h5:
        out = {k: h5[k][()] for k in h5} | {"attrs": dict(h5.attrs)}
    assert out["barcode"].shape == (len(out["coords"]), 1)
    out["barcode"] = [row[0] for row in out["barcode"]]
    return out


def reference_patch(path: Path, cx: float, cy: float, side0: float, patch_px: int) -> np.ndarray:
    """The same region read straight from level 0 and resized: the definition of a patch."""
    with open_slide(path) as slide:
        x0, y0 = int(np.floor(cx - side0 / 2)), int(np.floor(cy - side0 / 2))
        region = Image.fromarray(slide.read(x0, y0, 0, int(side0) + 2, int(side0) + 2))
        box = (cx - side0 / 2 - x0, cy - side0 / 2 - y0, cx + side0 / 2 - x0, cy + side0 / 2 - y0)
        return np.asarray(region.resize((patch_px, patch_px), Image.Resampling.BOX, box=box)).astype(float)


@pytest.mark.parametrize("target_mpp", [0.5, 0.7])
def test_patches_equal_the_slide_region_at_target_scale(tmp_path: Path, synth_fine, target_mpp: float) -> None:
    run = Run(tmp_path / "run")
    cfg = tiny_tile(target_mpp=target_mpp, patch_px=48)
    tile_sample(run, SampleSpec("f0", synth_fine.slide, synth_fine.spots), cfg)
    out = tiles(run, "f0")
    assert out["attrs"]["level"] == 1  # 0.25 µm/px source: level 1 (0.5 µm/px) is the coarsest fine enough for both
    side0 = 48 * target_mpp / 0.25
    errors, shifted = [], []
    for k in range(0, len(out["coords"]), max(1, len(out["coords"]) // 6)):
        cx, cy = out["coords"][k]
        ref = reference_patch(synth_fine.slide, cx, cy, side0, 48)
        errors.append(np.abs(out["img"][k].astype(float) - ref).mean())
        shifted.append(np.abs(out["img"][k].astype(float) - reference_patch(synth_fine.slide, cx + side0 / 3, cy, side0, 48)).mean())
    assert max(errors) < 8.0, errors  # JPEG tiles and a different resampling filter, nothing more
    assert np.mean(shifted) > 2 * np.mean(errors)  # and it is the right place, not just similar tissue


def test_spot_ids_and_coordinates_round_trip(tmp_path: Path, synth) -> None:
    run = Run(tmp_path / "run")
    tile_sample(run, SampleSpec("s0", synth.slide, synth.spots), tiny_tile())
    out = tiles(run, "s0")
    spots = ad.read_h5ad(synth.spots)
    assert [b.decode() for b in out["barcode"]] == list(spots.obs_names)
    np.testing.assert_array_equal(out["coords"], np.rint(spots.obsm["spatial"]).astype(np.int64))
    half = round(out["attrs"]["patch_size_level0"] / 2)  # HEST/TRIDENT's coords are top-left corners
    np.testing.assert_array_equal(out["coords_topleft"], out["coords"] - half)
    assert out["attrs"]["patch_size_level0"] == 64 * 0.5 / 0.5
    assert out["img"].shape == (spots.n_obs, 64, 64, 3) and out["img"].dtype == np.uint8
    assert out["attrs"]["mpp_source"] == 0.5 and out["attrs"]["mpp_target"] == 0.5
    sample = run.sample("s0")
    assert sample["expression"]["path"] == str(synth.spots.resolve())
    assert sample["stages"]["tile"]["status"] == "ok" and sample["stages"]["tile"]["n_spots"] == spots.n_obs
    assert run.thumbnail("s0").exists()


def test_grid_covers_tissue_and_not_background(tmp_path: Path, synth) -> None:
    run = Run(tmp_path / "run")
    cfg = tiny_tile(pitch_um=50.0, spot_um=30.0)
    tile_sample(run, SampleSpec("g", synth.slide), cfg)
    out = tiles(run, "g")
    ids = [b.decode() for b in out["barcode"]]
    assert len(set(ids)) == len(ids) and all(i.startswith("hex-") for i in ids)
    with open_slide(synth.slide) as slide:
        full = slide.read(0, 0, 0, *slide.dimensions).astype(float)
    stained = (full.max(axis=2) - full.min(axis=2)) > 20
    centres = out["coords"]
    assert stained[centres[:, 1], centres[:, 0]].mean() > 0.9  # centres sit on stained tissue
    # the lattice reaches most of the tissue: few stained pixels are far from every centre
    ys, xs = np.nonzero(stained[::8, ::8])
    pts = np.stack([xs * 8, ys * 8], axis=1)
    nearest = np.min(np.linalg.norm(pts[:, None, :] - centres[None, :, :], axis=2), axis=1)
    assert (nearest < 100 / 0.5).mean() > 0.85
    again = Run(tmp_path / "again")
    tile_sample(again, SampleSpec("g", synth.slide), cfg)
    assert [b.decode() for b in tiles(again, "g")["barcode"]] == ids  # stable ids


def test_no_images_stores_coordinates_only(tmp_path: Path, synth) -> None:
    run = Run(tmp_path / "run")
    tile_sample(run, SampleSpec("s0", synth.slide, synth.spots), tiny_tile(images=False))
    out = tiles(run, "s0")
    assert "img" not in out and len(out["coords"]) == synth.n_spots
    tile_sample(run, SampleSpec("borrowed", synth.slide, synth.spots), tiny_tile(images=False), register_expression=False)
    assert "expression" in run.sample("s0") and "expression" not in run.sample("borrowed")  # positions only


def test_missing_mpp_is_an_error_that_names_the_flag(tmp_path: Path, synth) -> None:
    png = tmp_path / "plain.png"
    with open_slide(synth.slide) as slide:
        Image.fromarray(slide.read(0, 0, 0, *slide.dimensions)).save(png)
    with pytest.raises(HingeError, match="--mpp"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("p", png), tiny_tile())
    tile_sample(Run(tmp_path / "run"), SampleSpec("p", png, mpp=0.5), tiny_tile())
    assert Run(tmp_path / "run").stage("p", "tile")["mpp_origin"] == "user"


def test_corrupt_and_blank_slides(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(HingeError, match="neither a slide"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("bad", bad), tiny_tile())
    bad.rename(tmp_path / "bad.svs")  # a slide format OpenSlide cannot open: damaged, not unsupported (issue 14)
    with pytest.raises(HingeError, match="corrupt or truncated"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("bad", tmp_path / "bad.svs"), tiny_tile())
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    with pytest.raises(HingeError, match="corrupt or unreadable"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("cut", truncated, mpp=0.5), tiny_tile())
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((600, 600, 3), 245, np.uint8)).save(blank)
    with pytest.raises(HingeError, match="no tissue"):
        tile_sample(Run(tmp_path / "run"), SampleSpec("blank", blank, mpp=0.5), tiny_tile())


def test_spots_outside_the_slide(tmp_path: Path, synth) -> None:
    spots = ad.read_h5ad(synth.spots)
    spots.obsm["spatial"] = spots.obsm["spatial"].copy()
    spots.obsm["spatial"][:3] += 5000  # a few off the slide: dropped with a count
    few = tmp_path / "few.h5ad"
    spots.write_h5ad(few)
    run = Run(tmp_path / "run")
    tile_sample(run, SampleSpec("few", synth.slide, few), tiny_tile())
    assert run.stage("few", "tile")["dropped_outside"] == 3
    assert len(tiles(run, "few")["coords"]) == spots.n_obs - 3
    spots.obsm["spatial"] = spots.obsm["spatial"] * 10  # wrong scale: most are outside
    wrong = tmp_path / "wrong.h5ad"
    spots.write_h5ad(wrong)
    with pytest.raises(HingeError, match="outside the"):
        tile_sample(run, SampleSpec("wrong", synth.slide, wrong), tiny_tile())
    assert not run.tiles("wrong").exists()


def test_resume_after_a_killed_writer(tmp_path: Path, synth) -> None:
    run = Run(tmp_path / "run")
    final = run.tiles("s0")
    final.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = final.with_name(f".{final.name}.tmp-{dead.stdout.strip()}")
    stale.write_bytes(b"half a file")
    lock = final.with_name(final.name + ".lock")
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    summary = tile_samples(run, [SampleSpec("s0", synth.slide, synth.spots)], tiny_tile())
    assert summary.done == ["s0"] and final.exists()
    assert not stale.exists() and not lock.exists()


def test_a_failure_mid_write_leaves_no_file(tmp_path: Path, synth, monkeypatch: pytest.MonkeyPatch) -> None:
    import hinge_cli.slide.tiling as tile_mod

    def broken(*args: object, **kwargs: object):
        yield 0, np.zeros((2, 64, 64, 3), np.uint8)
        raise OSError("disk full")

    monkeypatch.setattr(tile_mod, "iter_patch_batches", broken)
    run = Run(tmp_path / "run")
    with pytest.raises(OSError):
        tile_samples(run, [SampleSpec("s0", synth.slide, synth.spots)], tiny_tile())
    assert not run.tiles("s0").exists()
    assert not list(run.tiles("s0").parent.glob(".s0.h5*"))
    assert run.stage("s0", "tile")["status"] == "failed"


def test_a_live_lock_refuses_a_second_writer(tmp_path: Path) -> None:
    target = tmp_path / "x.h5"
    with output_lock(target):
        with pytest.raises(OutputLocked, match="another process"):
            with output_lock(target):
                pass
    with output_lock(target):  # released again
        pass


def test_skip_if_done_and_overwrite(tmp_path: Path, synth) -> None:
    run_dir = tmp_path / "run"
    args = ["tile", str(synth.slide), "--spots", str(synth.spots), "--run", str(run_dir), "--config", "tiny"]
    assert runner.invoke(app, args).exit_code == 0
    made = Run(run_dir).tiles(synth.sample_id).stat().st_mtime_ns
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "1 skipped" in result.output
    assert Run(run_dir).tiles(synth.sample_id).stat().st_mtime_ns == made
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
    assert Run(run_dir).tiles(synth.sample_id).stat().st_mtime_ns != made


def test_keep_going_exit_code_and_manifest(tmp_path: Path, synth) -> None:
    bad = tmp_path / "bad.svs"
    bad.write_bytes(b"junk")
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["tile", str(synth.slide), str(bad), "--run", str(run_dir), "--config", "tiny", "--keep-going", "-q"])
    assert result.exit_code == 3
    assert "1 failed" in result.output and "failed bad" in result.output
    assert Run(run_dir).stage("bad", "tile")["status"] == "failed"
    assert Run(run_dir).stage(synth.sample_id, "tile")["status"] == "ok"
    result = runner.invoke(app, ["tile", str(bad), "--run", str(tmp_path / "run2"), "-q"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output


def test_sample_sheet_and_shards(tmp_path: Path, synth) -> None:
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"sample_id,slide,spots,mpp\na,{synth.slide},{synth.spots},\nb,{synth.slide},,0.5\nc,{synth.slide},,\n")
    specs = read_sample_sheet(sheet)
    assert [s.sample_id for s in specs] == ["a", "b", "c"] and specs[1].mpp == 0.5 and specs[2].spots is None
    run_dir = tmp_path / "run"
    done = []
    for i in range(2):
        result = runner.invoke(app, ["tile", "--samples", str(sheet), "--run", str(run_dir), "--config", "tiny", "--shard", f"{i}/2", "-q"])
        assert result.exit_code == 0, result.output
        done.append({p.stem for p in (run_dir / "tiles").glob("*.h5")})
    assert done[0] and done[1] - done[0] and done[1] == {"a", "b", "c"}
    sheet.write_text("sample_id,slide\nx,a.tif\nx,b.tif\n")
    with pytest.raises(HingeError, match="repeats sample ids"):
        read_sample_sheet(sheet)


@pytest.mark.parametrize("spec, count", [("0/3", 3), ("1/3", 3), ("2/3", 2)])
def test_shards_partition_the_samples(spec: str, count: int) -> None:
    from hinge_cli.run.directory import Shard

    names = [f"s{i}" for i in range(8)]
    assert len(Shard.parse(spec).select(names)) == count
    union = sorted(n for i in range(3) for n in Shard(i, 3).select(names))
    assert union == sorted(names)


def test_shard_defaults_to_the_slurm_array(monkeypatch: pytest.MonkeyPatch) -> None:
    from hinge_cli.run.directory import Shard

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    assert Shard.parse(None) == Shard(4, 8)
    with pytest.raises(HingeError, match="I/N"):
        Shard.parse("three")


@pytest.mark.slow
def test_her2st_section_tiles_every_selected_spot(tmp_path: Path, her2st: Path) -> None:
    """Real data through the plain-JPEG reader: all 187 selected C2 spots, on tissue."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "her2st"))
    from prepare import section

    adata = section(her2st, "C2")
    assert adata.n_obs == 187
    spots = tmp_path / "C2.h5ad"
    adata.write_h5ad(spots)
    run = Run(tmp_path / "run")
    tile_sample(run, SampleSpec("C2", her2st / "images" / "C2.jpg", spots, mpp=0.69), tiny_tile(images=False))
    record = run.stage("C2", "tile")
    assert record["n_spots"] == 187 and record["dropped_outside"] == 0 and record["off_tissue"] == 0
