"""Tiling one sample: find the tissue, place the spots, write the tiles file and a thumbnail of where they fell.

Spots come from the sample's .h5ad (measured spots) or from a lattice over the tissue (new slides).
The tiles file is written under a lock to a temporary name and renamed into place, so an interrupted
run leaves either a finished file or nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from hinge_cli.config import TileConfig
from hinge_cli.core.figures import slide_thumbnail
from hinge_cli.core.files import atomic_path, describe_input
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.data.expression import read_expression, read_h5ad
from hinge_cli.data.samples import SampleSpec
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.tiles import TileAttrs, write_tiles
from hinge_cli.run.directory import Run
from hinge_cli.run.output import sample_output
from hinge_cli.slide.patches import LATTICES, PatchGeometry, iter_patch_batches, lattice
from hinge_cli.slide.reader import Slide, open_slide, require_mpp
from hinge_cli.slide.tissue import TissueMask, detect_tissue

log = logging.getLogger(__name__)

BATCH = 32
THUMB_MAX_SIDE = 1600
MAX_OUTSIDE = 0.5  # more spots than this off the slide or off the tissue means wrong coordinates
OFF_TISSUE_WARNING = 0.2  # more spots than this off the tissue (but not most): worth a look at the thumbnail
PITCH_TOLERANCE = 0.2  # spots this much closer than --pitch-um suggest a wrong µm/px or scale factor
MAX_UPSAMPLING = 2.0  # patches magnified more than this from level 0 are blurred: worth a warning
BLANK_RANGE = 8  # a thumbnail whose every channel spans fewer grey levels than this holds no image


def read_spots(path: Path) -> tuple[list[str], np.ndarray]:
    """Barcodes and level-0 (x, y) spot centres from an .h5ad's obsm['spatial']."""
    adata = read_h5ad(path, "spot file", f"check the path given to {setting('spots')} (an .h5ad written by anndata)", backed=True)
    try:
        if "spatial" not in adata.obsm:
            raise HingeError(f"{path} has no obsm['spatial']", "store spot centres in level-0 pixels there (scanpy/HEST convention)")
        coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)
        barcodes = [str(b) for b in adata.obs_names]
    finally:
        adata.file.close()
    if not barcodes:
        raise HingeError(f"{path} holds no spots", f"point {setting('spots')} at the sample's full .h5ad")
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise HingeError(f"{path} has obsm['spatial'] of shape {coords.shape}, not one (x, y) row per spot",
                         "store spot centres as an (N, 2) array of level-0 pixels there")
    coords = coords[:, :2]
    if len(set(barcodes)) != len(barcodes):
        raise HingeError(f"{path} has duplicate spot barcodes", "make obs_names unique (adata.obs_names_make_unique())")
    if not np.isfinite(coords).all():
        raise HingeError(f"{path} has non-finite spot coordinates", "drop or fix those spots")
    return barcodes, coords


def _tissue(slide: Slide, cfg: TileConfig) -> TissueMask:
    mpp = require_mpp(slide)
    downsample = max(cfg.tissue.thumb_mpp / mpp, 1.0)
    thumb = slide.thumbnail(downsample)
    spread = thumb[..., :3].reshape(-1, 3).max(axis=0).astype(int) - thumb[..., :3].reshape(-1, 3).min(axis=0)
    if spread.max() < BLANK_RANGE:
        raise HingeError(f"{slide.path.name} is blank: every pixel has nearly the same colour, so there is no tissue to find "
                         "at any threshold", "check the file (an empty export, a failed scan, or the wrong image of the slide)")
    return detect_tissue(thumb, downsample, mpp, cfg.tissue)


def _warn_upsampling(spec: SampleSpec, mpp: float, cfg: TileConfig) -> None:
    factor = mpp / cfg.target_mpp
    if factor > MAX_UPSAMPLING:
        log.warning("%s: the slide has %.3g µm/px, so %.3g µm/px patches are magnified %.1fx and will look blurred; "
                    "use a higher-resolution image (for Visium, the full-resolution image) or a larger --target-mpp",
                    spec.sample_id, mpp, cfg.target_mpp, factor)


def _failure_thumbnail(path: Path, spec: SampleSpec, slide: Slide, mask: TissueMask | None, radius_px0: float) -> None:
    """What tiling saw when it gave up: the slide, any tissue found, and the given spots."""
    if mask is None:
        mask = TissueMask(np.zeros((1, 1), bool), float(max(slide.dimensions)), float("nan"))
    coords = np.zeros((0, 2))
    if spec.spots is not None:
        with contextlib.suppress(HingeError):  # a broken spot file is already what the error is about
            coords = read_spots(spec.spots)[1]
    _thumbnail_png(path, slide, mask, coords, radius_px0)


def _warn_spacing(sample: str, coords: np.ndarray, mpp: float, cfg: TileConfig) -> None:
    """Spots closer together than the array's pitch were scaled wrongly (a µm/px or a scale factor applied twice).
    Wider spacing proves nothing: a subset of an array's spots, or legacy ST's 200 µm pitch, looks the same."""
    if len(coords) < 3:
        return
    distance, _ = cKDTree(coords).query(coords, k=2)
    spacing_um = float(np.median(distance[:, 1])) * mpp
    if spacing_um < (1 - PITCH_TOLERANCE) * cfg.pitch_um:
        log.warning("%s: neighbouring spots are %.0f µm apart but --pitch-um is %g µm (%.2fx): spots cannot be closer "
                    "than the array's pitch, so the µm/px or a scale factor is probably wrong and the patches cover "
                    "the wrong area", sample, spacing_um, cfg.pitch_um, spacing_um / cfg.pitch_um)


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
        barcodes = [b for b, keep in zip(barcodes, inside, strict=True) if keep]
        coords = coords[inside]
        _warn_spacing(spec.sample_id, coords, mpp, cfg)  # before any refusal: a wrong scale is the likely cause
        half_patch = cfg.patch_px * cfg.target_mpp / mpp / 2
        on_tissue = mask.fraction_in_discs(coords, half_patch) > 0
        if on_tissue.sum() < (1 - MAX_OUTSIDE) * len(coords):
            raise HingeError(
                f"{int((~on_tissue).sum())} of {len(coords)} spots of {spec.sample_id} lie off the detected tissue",
                f"check that the spots belong to this slide and the µm/px ({setting('mpp')}) is right; or lower {setting('tissue-threshold')}",
            )
        if (~on_tissue).mean() > OFF_TISSUE_WARNING:
            log.warning("%s: %d of %d spots lie off the detected tissue; look at its thumbnail to see whether they "
                        "belong to this slide at this scale", spec.sample_id, int((~on_tissue).sum()), len(coords))
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
            f"check the slide, or pass a lower {setting('tissue-threshold')}",
        )
    return [i for i, k in zip(ids, keep, strict=True) if k], coords[keep], frac[keep], {"mode": "grid", "dropped_outside": 0, "off_tissue": 0}


def _thumbnail_png(path: Path, slide: Slide, mask: TissueMask, coords: np.ndarray, radius_px0: float) -> None:
    """The slide with the tissue outline and the patch footprints, a legend and a scale bar."""
    downsample = max(1.0, max(slide.dimensions) / THUMB_MAX_SIDE)
    slide_thumbnail(path, slide.thumbnail(downsample), mask.mask, mask.downsample / downsample, coords / downsample,
                    radius_px0 / downsample, require_mpp(slide) * downsample)


def tile_sample(run: Run, spec: SampleSpec, cfg: TileConfig, progress: Progress = SILENT, register_expression: bool = True,
                overwrite: bool = True) -> dict:
    """Tile one sample into the run; returns the manifest record.

    With spots, the .h5ad is also registered as the sample's measured expression (training
    data) unless `register_expression` is off: `generate` only borrows the positions.
    The manifest's `ok` record is the last write: until it lands, the sample is not done.
    Without `overwrite`, a sample another job finished meanwhile raises OutputFinished.
    """
    final = run.tiles(spec.sample_id)
    started = time.time()
    with sample_output(run, spec.sample_id, "tile", final, overwrite=overwrite) as record:
        with open_slide(spec.slide, spec.mpp) as slide:
            if spec.spots is not None and not Path(spec.spots).exists():
                raise HingeError(f"spot file {spec.spots} does not exist", f"check the path given to {setting('spots')}")
            if spec.spots is not None and register_expression:
                read_expression(spec.spots, spec.layer)  # raw counts must be there now, not hours later in training
            inputs = {"slide": describe_input(spec.slide)}
            if spec.spots is not None:
                inputs["spots"] = describe_input(spec.spots)
            run.record_stage(spec.sample_id, "tile", "running", inputs=inputs, params=asdict(cfg))
            mpp = require_mpp(slide)
            _warn_upsampling(spec, mpp, cfg)
            mask = None
            try:
                mask = _tissue(slide, cfg)
                barcodes, coords, frac, counts = _place_spots(spec, slide, mask, cfg)
            except HingeError as exc:
                thumb = run.thumbnail(spec.sample_id)
                _failure_thumbnail(thumb, spec, slide, mask, cfg.spot_um / 2 / mpp)
                raise HingeError(exc.problem, f"{exc.fix}; {thumb} shows the slide, the tissue found and the spots") from None
            geom = PatchGeometry.plan(slide, cfg.target_mpp, cfg.patch_px)
            attrs = TileAttrs(
                sample_id=spec.sample_id, slide=Path(spec.slide).resolve(), mpp_source=mpp, mpp_origin=slide.mpp_source,
                mpp_target=cfg.target_mpp, patch_px=cfg.patch_px, level=geom.level, mode=counts["mode"], grid=cfg.grid,
                spot_um=cfg.spot_um, pitch_um=cfg.pitch_um, tissue_threshold=mask.threshold, tissue=asdict(cfg.tissue),
                images=cfg.images,
            )
            with atomic_path(final) as tmp, write_tiles(tmp, attrs, barcodes, coords, frac) as writer:
                if cfg.images:
                    with progress.task(f"{spec.sample_id}: patches", len(barcodes)) as advance:
                        for start, batch in iter_patch_batches(slide, coords, cfg.target_mpp, cfg.patch_px, BATCH, cfg.workers):
                            writer.write_images(start, batch)
                            advance(len(batch))
            _thumbnail_png(run.thumbnail(spec.sample_id), slide, mask, coords, cfg.spot_um / 2 / mpp)
        sample = {"slide": str(Path(spec.slide).resolve()), "mpp": mpp}
        if spec.spots is not None and register_expression:
            sample["expression"] = {**describe_input(spec.spots), "layer": spec.layer}
        run.register_sample(spec.sample_id, **sample)
        record.update({
            "n_spots": len(barcodes), **counts, "mpp_source": mpp, "mpp_origin": slide.mpp_source, "level": geom.level,
            "seconds": round(time.time() - started, 2),
        })
    log.info("%s: %d patches (%s mode) in %.1fs", spec.sample_id, len(barcodes), counts["mode"], record["seconds"])
    return {**record, "output": str(final)}

