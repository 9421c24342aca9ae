"""`hinge tile`: slides in, `tiles/<sample>.h5` (+ a thumbnail) out, one sample at a time.

Each sample is written under a lock to a temporary file and renamed into place,
so an interrupted run leaves either a finished file or nothing, and a re-run
picks up exactly the samples that are missing.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from hinge_cli.config import TileConfig
from hinge_cli.data.expression import read_h5ad
from hinge_cli.errors import HingeError
from hinge_cli.figures import slide_thumbnail
from hinge_cli.progress import SILENT, Progress
from hinge_cli.files import atomic_path, describe_input, output_lock, remove_stale_temporaries
from hinge_cli.run import Run, SampleReport, Shard
from hinge_cli.slide.patches import LATTICES, PatchGeometry, iter_patch_batches, lattice
from hinge_cli.slide.reader import Slide, open_slide, require_mpp
from hinge_cli.slide.tissue import TissueMask, detect_tissue

log = logging.getLogger(__name__)

BATCH = 32
THUMB_MAX_SIDE = 1600
MAX_OUTSIDE = 0.5  # more spots than this off the slide or off the tissue means wrong coordinates


class SampleSpec(NamedTuple):
    sample_id: str
    slide: Path
    spots: Path | None = None
    mpp: float | None = None


def read_sample_sheet(path: Path) -> list[SampleSpec]:
    """Rows of `sample_id, slide[, spots, mpp]`; relative paths are relative to the sheet."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"sample sheet {path} does not exist", "check the path given to --samples")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"sample_id", "slide"} <= set(rows[0]):
        raise HingeError(f"sample sheet {path} needs the columns sample_id and slide", "add a header line: sample_id,slide,spots,mpp")
    specs = []
    for n, row in enumerate(rows, start=2):
        def resolve(value: str | None) -> Path | None:
            return (path.parent / value.strip()) if value and value.strip() else None

        mpp = (row.get("mpp") or "").strip()
        try:
            specs.append(SampleSpec(row["sample_id"].strip(), resolve(row["slide"]), resolve(row.get("spots")), float(mpp) if mpp else None))
        except ValueError:
            raise HingeError(f"{path} line {n}: mpp '{mpp}' is not a number", "give micrometres per pixel, e.g. 0.5") from None
    ids = [s.sample_id for s in specs]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise HingeError(f"sample sheet {path} repeats sample ids: {', '.join(duplicated)}", "give every row its own sample_id")
    return specs


def read_spots(path: Path) -> tuple[list[str], np.ndarray]:
    """Barcodes and level-0 (x, y) spot centres from an .h5ad's obsm['spatial']."""
    adata = read_h5ad(path, "spot file", "check the path given to --spots (an .h5ad written by anndata)", backed=True)
    try:
        if "spatial" not in adata.obsm:
            raise HingeError(f"{path} has no obsm['spatial']", "store spot centres in level-0 pixels there (scanpy/HEST convention)")
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
        barcodes = [str(b) for b in adata.obs_names]
    finally:
        adata.file.close()
    if len(set(barcodes)) != len(barcodes):
        raise HingeError(f"{path} has duplicate spot barcodes", "make obs_names unique (adata.obs_names_make_unique())")
    if not np.isfinite(coords).all():
        raise HingeError(f"{path} has non-finite spot coordinates", "drop or fix those spots")
    return barcodes, coords


def _tissue(slide: Slide, cfg: TileConfig) -> TissueMask:
    mpp = require_mpp(slide)
    downsample = max(cfg.tissue.thumb_mpp / mpp, 1.0)
    return detect_tissue(slide.thumbnail(downsample), downsample, mpp, cfg.tissue)


def _place_spots(spec: SampleSpec, slide: Slide, mask: TissueMask, cfg: TileConfig) -> tuple[list[str], np.ndarray, np.ndarray, dict]:
    """Barcodes, centres, tissue fractions and counts for spot mode or grid mode."""
    mpp = require_mpp(slide)
    radius = cfg.spot_um / 2 / mpp
    width, height = slide.dimensions
    if spec.spots is not None:
        barcodes, coords = read_spots(spec.spots)
        inside = (coords[:, 0] >= 0) & (coords[:, 0] < width) & (coords[:, 1] >= 0) & (coords[:, 1] < height)
        n_out = int((~inside).sum())
        if n_out > MAX_OUTSIDE * len(coords):
            raise HingeError(
                f"{n_out} of {len(coords)} spots of {spec.spots.name} fall outside the {width}x{height} px slide",
                "spot coordinates must be level-0 pixels of this slide: check the file pairing and any scale factor",
            )
        if n_out:
            log.warning("%s: dropped %d spots outside the slide", spec.sample_id, n_out)
        barcodes = [b for b, keep in zip(barcodes, inside) if keep]
        coords = coords[inside]
        half_patch = cfg.patch_px * cfg.target_mpp / mpp / 2
        on_tissue = mask.fraction_in_discs(coords, half_patch) > 0
        if on_tissue.sum() < (1 - MAX_OUTSIDE) * len(coords):
            raise HingeError(
                f"{int((~on_tissue).sum())} of {len(coords)} spots of {spec.sample_id} lie off the detected tissue",
                "check that the spots belong to this slide and the µm/px (--mpp) is right; or lower --tissue-threshold",
            )
        frac = mask.fraction_in_discs(coords, radius)
        return barcodes, coords, frac, {"mode": "spots", "dropped_outside": n_out, "off_tissue": int((~on_tissue).sum())}
    if cfg.grid not in LATTICES:
        raise HingeError(f"unknown grid '{cfg.grid}'", f"use one of {', '.join(LATTICES)}")
    coords, ids = lattice(mask, slide.dimensions, mpp, cfg.pitch_um, cfg.grid)
    frac = mask.fraction_in_discs(coords, radius) if len(coords) else np.zeros(0, np.float32)
    keep = frac >= cfg.min_tissue
    if not keep.any():
        raise HingeError(
            f"no tissue found on {slide.path.name} (saturation threshold {mask.threshold:.3f})",
            "check the slide, or pass a lower --tissue-threshold",
        )
    return [i for i, k in zip(ids, keep) if k], coords[keep], frac[keep], {"mode": "grid", "dropped_outside": 0, "off_tissue": 0}


def _thumbnail_png(path: Path, slide: Slide, mask: TissueMask, coords: np.ndarray, radius_px0: float) -> None:
    """The slide with the tissue outline and the patch footprints, a legend and a scale bar."""
    downsample = max(1.0, max(slide.dimensions) / THUMB_MAX_SIDE)
    slide_thumbnail(path, slide.thumbnail(downsample), mask.mask, mask.downsample / downsample, coords / downsample,
                    radius_px0 / downsample, require_mpp(slide) * downsample)


def _write_tiles(tmp: Path, spec: SampleSpec, slide: Slide, barcodes: list[str], coords: np.ndarray, frac: np.ndarray,
                 cfg: TileConfig, attrs: dict, progress: Progress) -> None:
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("coords", data=np.rint(coords).astype(np.int64))
        h5.create_dataset("barcode", data=np.array(barcodes, dtype=object), dtype=h5py.string_dtype("utf-8"))
        h5.create_dataset("tissue_frac", data=frac.astype(np.float32))
        for key, value in attrs.items():
            h5.attrs[key] = value
        if not cfg.images:
            return
        p = cfg.patch_px
        img = h5.create_dataset("img", shape=(len(barcodes), p, p, 3), dtype=np.uint8, chunks=(1, p, p, 3), compression="lzf")
        with progress.task(f"{spec.sample_id}: patches", len(barcodes)) as advance:
            for start, batch in iter_patch_batches(slide, coords, cfg.target_mpp, p, BATCH, cfg.workers):
                img[start : start + len(batch)] = batch
                advance(len(batch))


def tile_sample(run: Run, spec: SampleSpec, cfg: TileConfig, progress: Progress = SILENT, register_expression: bool = True) -> dict:
    """Tile one sample into the run; returns the manifest record.

    With spots, the .h5ad is also registered as the sample's measured expression (training
    data) unless `register_expression` is off: `generate` only borrows the positions.
    """
    final = run.tiles(spec.sample_id)
    started = time.time()
    with output_lock(final):
        remove_stale_temporaries(final)
        with open_slide(spec.slide, spec.mpp) as slide:
            if spec.spots is not None and not Path(spec.spots).exists():
                raise HingeError(f"spot file {spec.spots} does not exist", "check the path given to --spots")
            inputs = {"slide": describe_input(spec.slide)}
            if spec.spots is not None:
                inputs["spots"] = describe_input(spec.spots)
            run.record_stage(spec.sample_id, "tile", "running", inputs=inputs, params=asdict(cfg))
            mpp = require_mpp(slide)
            mask = _tissue(slide, cfg)
            barcodes, coords, frac, counts = _place_spots(spec, slide, mask, cfg)
            geom = PatchGeometry.plan(slide, cfg.target_mpp, cfg.patch_px)
            attrs = {
                "sample_id": spec.sample_id, "slide": str(Path(spec.slide).resolve()), "mpp_source": mpp,
                "mpp_origin": slide.mpp_source, "mpp_target": cfg.target_mpp, "patch_px": cfg.patch_px, "level": geom.level,
                "mode": counts["mode"], "grid": cfg.grid, "spot_um": cfg.spot_um, "pitch_um": cfg.pitch_um,
                "tissue_threshold": mask.threshold, "tissue": json.dumps(asdict(cfg.tissue)), "images": cfg.images,
            }
            with atomic_path(final) as tmp:
                _write_tiles(tmp, spec, slide, barcodes, coords, frac, cfg, attrs, progress)
            _thumbnail_png(run.thumbnail(spec.sample_id), slide, mask, coords, cfg.spot_um / 2 / mpp)
        record = {
            "n_spots": len(barcodes), **counts, "mpp_source": mpp, "mpp_origin": slide.mpp_source, "level": geom.level,
            "seconds": round(time.time() - started, 2), "output": str(final),
        }
        run.record_stage(spec.sample_id, "tile", "ok", **record)
    sample = {"slide": str(Path(spec.slide).resolve()), "mpp": mpp}
    if spec.spots is not None and register_expression:
        sample["expression"] = describe_input(spec.spots)
    run.register_sample(spec.sample_id, **sample)
    log.info("%s: %d patches (%s mode) in %.1fs", spec.sample_id, len(barcodes), counts["mode"], record["seconds"])
    return record


def _stale_params(run: Run, sample: str, cfg: TileConfig) -> list[str]:
    """Names of settings that differ from those the existing tiles were made with."""
    with h5py.File(run.tiles(sample), "r") as h5:
        made = {k: h5.attrs[k] for k in ("mpp_target", "patch_px") if k in h5.attrs}
    wanted = {"mpp_target": cfg.target_mpp, "patch_px": cfg.patch_px}
    return [f"{k} {made[k]} (now {wanted[k]})" for k in made if float(made[k]) != float(wanted[k])]


def tile_samples(
    run: Run,
    specs: list[SampleSpec],
    cfg: TileConfig,
    shard: Shard = Shard(),
    overwrite: bool = False,
    keep_going: bool = False,
    progress: Progress = SILENT,
) -> SampleReport:
    """Tile this shard's share of `specs`; failures stop the run unless `keep_going`."""
    by_id = {s.sample_id: s for s in specs}
    mine = shard.select(list(by_id))
    summary = SampleReport("tile")
    with progress.task("slides", len(mine)) as advance:
        for sample in mine:
            spec = by_id[sample]
            if run.tiles(sample).exists() and not overwrite:
                stale = _stale_params(run, sample, cfg)
                if stale:
                    log.warning("%s: existing tiles were made with %s; pass --overwrite to redo", sample, ", ".join(stale))
                summary.skipped.append(sample)
                advance(1)
                continue
            with summary.attempt(run, sample, "tile", keep_going):
                tile_sample(run, spec, cfg, progress)
            advance(1)
    return summary
