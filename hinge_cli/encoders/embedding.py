"""Embedding one tiled sample: its patches (or wide fields around each spot) through encoders, into an embeddings file.

Patches stream through in batches (from the tiles file, or from the slide when
the tiles hold no pixels), read ahead by background threads, and features are
written batch by batch into a chunked HDF5 dataset. Memory therefore stays at a
few batches whatever the number of spots. The weight-free default encoder
instead walks the slide once in tiles and pools each spot from block maps
(one tile of pixels plus one value per 16 µm block in memory), since its wide
fields overlap almost entirely between neighbouring spots. The output is
written under a lock to a temporary name and renamed into place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hinge_cli.config import EmbedConfig
from hinge_cli.core.files import atomic_path, describe_input
from hinge_cli.core.progress import SILENT, Progress
from hinge_cli.encoders.registry import Encoder, EncoderSpec, Field, TilePlan, encoder_key
from hinge_cli.errors import HingeError, setting
from hinge_cli.formats.embeddings import EmbeddingAttrs, write_embeddings
from hinge_cli.formats.tiles import Tiles, read_tile_images, read_tiles
from hinge_cli.run.directory import Run
from hinge_cli.run.lineage import tiles_made_from
from hinge_cli.run.output import sample_output
from hinge_cli.slide.patches import iter_patch_batches
from hinge_cli.slide.reader import Slide, open_slide, require_mpp

log = logging.getLogger(__name__)


def parse_weights(values: Sequence[str], specs: Sequence[EncoderSpec]) -> dict[str, Path]:
    """`--weights FILE` (the one learned encoder) or `--weights NAME=FILE` (any of several)."""
    learned = [s.name for s in specs if s.needs_weights]
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(learned) != 1:
                raise HingeError(
                    f"{setting('weights')} {value} does not say which encoder it is for",
                    f"write {setting('weights', 'NAME')}=FILE, e.g. {setting('weights')} uni=/models/uni.bin",
                )
            name, path = learned[0], value
        name = name.strip().lower()
        if name not in learned:
            raise HingeError(f"{setting('weights')} given for '{name}', which is not a learned encoder of this run",
                             f"weights apply to: {', '.join(learned) or 'none (the default encoder needs none)'}")
        out[name] = Path(path).expanduser()
    return out



def _require_slide(tiles: Tiles, why: str) -> None:
    if not tiles.attrs.slide.exists():
        raise HingeError(f"{tiles.path.name}: {why}, but the slide {tiles.attrs.slide} is gone",
                         "restore the slide at that path, or re-tile")


def _field_batches(tiles: Tiles, fld: Field, batch: int, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    if fld.mpp is None and tiles.has_images:
        yield from read_tile_images(tiles.path, batch)
        return
    _require_slide(tiles, "its tiles hold no pixels (--no-images)" if fld.mpp is None
                   else f"this encoder reads a {fld.um:.0f} µm field around each spot")
    mpp, px = (tiles.attrs.mpp_target, tiles.attrs.patch_px) if fld.mpp is None else (fld.mpp, fld.px)
    with open_slide(tiles.attrs.slide, tiles.attrs.mpp_source) as slide:
        yield from iter_patch_batches(slide, tiles.coords.astype(np.float64), mpp, px, batch, workers)


def read_plan_tiles(slide: Slide, fld: Field, plan: TilePlan, workers: int) -> Iterator[np.ndarray]:
    """The pixels of a plan's tiles at the field's µm/px, in plan order, read ahead by `workers` threads."""
    if not plan.tiles:
        return
    to_level0 = fld.mpp / require_mpp(slide)
    side = plan.box(plan.tiles[0])[2]
    centres = np.array([[(x0 + side / 2) * to_level0, (y0 + side / 2) * to_level0]
                        for x0, y0, _ in map(plan.box, plan.tiles)])
    for _, pixels in iter_patch_batches(slide, centres, fld.mpp, side, 1, workers):
        yield pixels[0]


def _slide_features(tiles: Tiles, enc: Encoder, cfg: EmbedConfig, label: str, progress: Progress) -> Iterator[tuple[int, np.ndarray]]:
    """(start, (n, views, dim)) chunks of spots from an encoder that walks the whole slide once (the default encoder)."""
    _require_slide(tiles, f"encoder '{enc.spec.name}' reads its fields from the slide")
    with open_slide(tiles.attrs.slide, tiles.attrs.mpp_source) as slide:
        plans = enc.plan_slide(tiles.coords.astype(np.float64), require_mpp(slide))
        with progress.task(f"{label} (slide tiles)", sum(len(p.tiles) for p in plans)) as advance:
            yield from enc.encode_slide_rows(plans, lambda fld, plan: read_plan_tiles(slide, fld, plan, cfg.workers), cfg.views,
                                             advance)


def embed_sample(
    run: Run,
    sample: str,
    encoders: Sequence[Encoder],
    cfg: EmbedConfig,
    progress: Progress = SILENT,
    overwrite: bool = True,
) -> dict:
    """Embed one tiled sample with `encoders` (features concatenated); returns the manifest record.

    Without `overwrite`, an output another job finished while this one waited raises OutputFinished:
    the to-do list is re-checked under the lock, so a finished output is never replaced.
    """
    key = encoder_key([e.spec for e in encoders])
    final = run.embeddings(key, sample)
    stage = f"embed:{key}"
    started = time.time()
    with sample_output(run, sample, stage, final, overwrite=overwrite) as record:
        tiles = read_tiles(run.tiles(sample))
        run.record_stage(sample, stage, "running", inputs={"tiles": describe_input(tiles.path)}, params=asdict(cfg))
        n, views = len(tiles.barcodes), cfg.views
        dims = [e.dim for e in encoders]
        keep_views = views > 1 and not cfg.average_views
        shape = (n, views, sum(dims)) if keep_views else (n, sum(dims))
        attrs = EmbeddingAttrs(
            encoder=key, encoders=[e.spec.name for e in encoders], dims=dims,
            weights_sha256=[e.weights_sha256 for e in encoders],
            weights=[str(e.weights) if e.weights else None for e in encoders],
            views=views, views_kept=keep_views, sample_id=sample, tiles=str(tiles.path.resolve()),
        )
        with atomic_path(final) as tmp, write_embeddings(tmp, attrs, tiles.barcodes, tiles.coords, shape) as out:
            offset = 0
            for enc in encoders:
                columns = slice(offset, offset + enc.dim)
                if enc.reads_slide:
                    for start, feats in _slide_features(tiles, enc, cfg, f"{sample}: {enc.spec.name}", progress):
                        out.write(feats if keep_views else feats.mean(axis=1), rows=slice(start, start + len(feats)), columns=columns)
                else:
                    streams = [_field_batches(tiles, f, cfg.batch_size, cfg.workers) for f in enc.spec.fields]
                    with progress.task(f"{sample}: {enc.spec.name}", n) as advance:
                        for parts in zip(*streams, strict=True):
                            start = parts[0][0]
                            feats = enc([p for _, p in parts], views)
                            if not keep_views:
                                feats = feats.mean(axis=1)
                            out.write(feats, rows=slice(start, start + len(feats)), columns=columns)
                            advance(len(feats))
                offset += enc.dim
        record.update({"encoder": key, "tiles_file": tiles_made_from(run, sample), "n_spots": n, "dim": sum(dims), "views": views,
                       "views_kept": keep_views, "weights_sha256": attrs.weights_sha256, "device": str(encoders[0].device),
                       "seconds": round(time.time() - started, 2)})
    log.info("%s: %d spots -> %s in %.1fs", sample, n, key, record["seconds"])
    return {**record, "output": str(final)}

