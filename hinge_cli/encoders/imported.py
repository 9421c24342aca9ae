"""Features made elsewhere (TRIDENT, HEST) brought into a run, so training needs no re-embedding.

A TRIDENT or HEST feature file stores one row per patch, located by its top-left corner; a
run's tiles store one row per spot, located by its centre. Rows are paired by barcode when the
file has the run's barcodes, else by centre within half a spot, and written as the run's
embeddings under the registered encoder's name, so `generate` can embed new slides the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from hinge_cli.core.files import atomic_path, describe_input
from hinge_cli.encoders.registry import get_spec
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.embeddings import EmbeddingAttrs, write_embeddings
from hinge_cli.formats.hest import PatchFile, read_patch_file
from hinge_cli.formats.tiles import Tiles, read_tiles
from hinge_cli.run.directory import Run
from hinge_cli.run.lineage import tiles_made_from
from hinge_cli.run.output import sample_output

MAX_UNMATCHED = 0.05  # more spots than this without a patch means the file belongs to another slide


def feature_file(source: Path, sample: str) -> Path:
    """`source` itself when it is a file, else `<source>/<sample>.h5` (TRIDENT's layout: one file per slide)."""
    source = Path(source)
    return source if source.is_file() else source / f"{sample}.h5"


def match_rows(tiles: Tiles, patches: PatchFile) -> np.ndarray:
    """For each spot of `tiles`, the row of `patches` that is the same place (by barcode, else by centre)."""
    index = {b: i for i, b in enumerate(patches.barcodes)}
    if all(b in index for b in tiles.barcodes):
        return np.array([index[b] for b in tiles.barcodes], dtype=np.int64)
    radius = tiles.attrs.spot_um / tiles.attrs.mpp_source / 2
    distance, rows = cKDTree(patches.centres).query(tiles.coords.astype(np.float64), distance_upper_bound=radius)
    missing = ~np.isfinite(distance)
    if missing.mean() > MAX_UNMATCHED:
        raise HingeError(f"{int(missing.sum())} of {len(rows)} spots of {tiles.attrs.sample_id} have no patch within half a spot "
                         f"({radius:.0f} px) in the feature file",
                         f"check that the file belongs to this slide and that its patch size ({setting('patch-size-level0')}) is right")
    if missing.any():
        raise HingeError(f"{int(missing.sum())} spots of {tiles.attrs.sample_id} have no patch in the feature file",
                         "extract features for every spot (TRIDENT with the spots as patch coordinates), then import again")
    return rows


def import_features(run: Run, sample: str, source: Path, encoder: str, patch_size_level0: float | None = None) -> dict:
    """Write `embeddings/<encoder>/<sample>.h5` from a TRIDENT/HEST feature file; returns the manifest record."""
    spec = get_spec(encoder)
    path = feature_file(source, sample)
    tiles = read_tiles(run.tiles(sample))
    patches = read_patch_file(path, patch_size_level0)
    if patches.features is None:
        raise HingeError(f"{path} holds coordinates but no `features` or `embeddings`", "give the feature file TRIDENT wrote")
    if patches.features.shape[1] != spec.dim:
        raise HingeError(f"{path} has {patches.features.shape[1]}-dim features; encoder '{encoder}' gives {spec.dim}",
                         f"name the encoder that made them with {setting('encoder')} (see `{command('embed')} {setting('list')}`)")
    started = time.time()
    rows = match_rows(tiles, patches)
    bad = ~np.isfinite(patches.features[rows]).all(axis=1)
    if bad.any():
        raise HingeError(f"{path}: {int(bad.sum())} of the {len(rows)} feature rows matched to {sample}'s spots hold NaN or "
                         "infinite values, which would train a model to a NaN loss",
                         "re-extract the features (check the encoder's input patches), or leave those spots out of the spot file")
    final = run.embeddings(spec.name, sample)
    stage = f"embed:{spec.name}"
    with sample_output(run, sample, stage, final, overwrite=True) as record:
        run.record_stage(sample, stage, "running", inputs={"tiles": describe_input(tiles.path), "features": describe_input(path)})
        attrs = EmbeddingAttrs(encoder=spec.name, encoders=[spec.name], dims=[spec.dim], weights_sha256=[None],
                               weights=[str(path.resolve())], views=1, views_kept=False, sample_id=sample, tiles=str(tiles.path))
        features = patches.features[rows]
        with atomic_path(final) as tmp, write_embeddings(tmp, attrs, tiles.barcodes, tiles.coords, features.shape) as out:
            out.write(features)
        record.update({"tiles_file": tiles_made_from(run, sample), "n_spots": len(rows), "imported_from": str(path.resolve()),
                       "seconds": round(time.time() - started, 2)})
    return record
