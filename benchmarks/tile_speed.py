"""Patches per second: `hinge tile` against a plain OpenSlide loop, for the same patches.

    python benchmarks/tile_speed.py [--size 20000] [--workers 2] [--out bench-out/tile]

A synthetic JPEG-compressed pyramidal TIFF at 0.25 µm/px is made once (cached in
--out). Patches are 224 px at 0.5 µm/px on a 100 µm hex lattice over the tissue.
The plain loop is what a script would do: `read_region` at level 0, convert,
resize with Pillow, keep the array, one patch at a time. `hinge tile` is timed as a
whole (tissue mask, thumbnail, HDF5 written to disk).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import openslide
from PIL import Image

from hinge_cli.config import load_config
from hinge_cli.data.samples import SampleSpec
from hinge_cli.run.directory import Run
from hinge_cli.slide.tiling import tile_sample
from hinge_cli.slide.writer import write_pyramidal_tiff
from hinge_cli.synthetic.slides import _class_map, _render

MPP, TARGET, PATCH = 0.25, 0.5, 224


def make_slide(path: Path, size: int) -> None:
    """Tile one rendered 4096 px block (mirrored) out to size x size pixels."""
    rng = np.random.default_rng(0)
    block = 4096
    outline, labels = _class_map(rng, block, MPP)
    rgb, _ = _render(rng, np.ones_like(outline), labels, MPP)
    reps = -(-size // (2 * block))
    mirrored = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
    mirrored = np.concatenate([mirrored, mirrored[::-1]], axis=0)
    image = np.tile(mirrored, (reps, reps, 1))[:size, :size]
    yy, xx = np.ogrid[:size, :size]
    background = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) > (0.45 * size) ** 2
    image[background] = 245
    write_pyramidal_tiff(path, image, MPP)


def plain_loop(slide: Path, coords: np.ndarray) -> float:
    osr = openslide.OpenSlide(str(slide))
    side = round(PATCH * TARGET / MPP)
    started = time.perf_counter()
    for x, y in coords:
        region = osr.read_region((int(x - side / 2), int(y - side / 2)), 0, (side, side)).convert("RGB")
        np.asarray(region.resize((PATCH, PATCH), Image.Resampling.BILINEAR))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-out/tile"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.out / f"synthetic-{args.size}.tif"
    if not slide.exists():
        started = time.perf_counter()
        make_slide(slide, args.size)
        print(f"made {slide} in {time.perf_counter() - started:.0f}s")

    cfg = load_config("default").tile
    cfg.workers = args.workers
    grid_run = Run(args.out / "grid-run")
    for old in grid_run.tiles("grid").parent.glob("grid.*"):
        old.unlink()
    tile_sample(grid_run, SampleSpec("grid", slide), cfg)  # the lattice both contenders cut
    import h5py

    with h5py.File(grid_run.tiles("grid"), "r") as h5:
        coords = h5["coords"][()].astype(float)
        barcodes = [b.decode() for b in h5["barcode"][()]]
    spots = ad.AnnData(X=np.zeros((len(coords), 1), np.float32), obs={"_": np.zeros(len(coords))})
    spots.obs_names = barcodes
    spots.obsm["spatial"] = coords
    spots_path = args.out / "spots.h5ad"
    spots.write_h5ad(spots_path)

    plain = plain_loop(slide, coords)
    run = Run(args.out / "run")
    for old in run.tiles("bench").parent.glob("bench.*"):
        old.unlink()
    started = time.perf_counter()
    tile_sample(run, SampleSpec("bench", slide, spots_path), cfg)
    ours = time.perf_counter() - started
    n = len(coords)
    size_mb = run.tiles("bench").stat().st_size / 2**20
    print(f"slide {args.size}x{args.size} px at {MPP} µm/px, {n} patches of {PATCH} px at {TARGET} µm/px")
    print(f"plain loop (read_region level 0 + resize, 1 process): {n / plain:8.1f} patches/s  ({plain:.1f}s, nothing written)")
    print(f"hinge tile (workers={args.workers}, HDF5 written {size_mb:.0f} MiB): {n / ours:8.1f} patches/s  ({ours:.1f}s)")
    print(f"ratio hinge/plain: {plain / ours:.2f}x")


if __name__ == "__main__":
    main()
