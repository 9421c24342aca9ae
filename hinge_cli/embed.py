"""`hinge embed`: `tiles/<sample>.h5` in, `embeddings/<encoder-key>/<sample>.h5` out.

Patches stream through in batches (from the tiles file, or from the slide when
the tiles hold no pixels), read ahead by background threads, and features are
written batch by batch into a chunked HDF5 dataset. Memory therefore stays at a
few batches whatever the number of spots. The weight-free default encoder
instead walks the slide once in tiles and pools each spot from block maps
(one tile of pixels plus one value per 16 µm block in memory), since its wide
fields overlap almost entirely between neighbouring spots. Each output is
written under a lock to a temporary name and renamed into place, so an
interrupted run resumes with exactly the missing samples.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from hinge_cli.config import EmbedConfig
from hinge_cli.encoders import (
    DEFAULT_ENCODER,
    MAX_VIEWS,
    Encoder,
    EncoderSpec,
    Field,
    TilePlan,
    build_encoder,
    locate_weights,
    missing_weights_error,
    parse_encoders,
)
from hinge_cli.errors import HingeError
from hinge_cli.progress import SILENT, Progress
from hinge_cli.files import atomic_path, describe_input, output_lock, remove_stale_temporaries
from hinge_cli.run import Run, SampleReport, Shard
from hinge_cli.slide.patches import iter_patch_batches
from hinge_cli.slide.reader import Slide, open_slide, require_mpp

log = logging.getLogger(__name__)


def encoder_key(specs: Sequence[EncoderSpec]) -> str:
    """The folder name under embeddings/: the encoder names joined in order (`uni+conch`)."""
    return "+".join(s.name for s in specs)


def parse_weights(values: Sequence[str], specs: Sequence[EncoderSpec]) -> dict[str, Path]:
    """`--weights FILE` (the one learned encoder) or `--weights NAME=FILE` (any of several)."""
    learned = [s.name for s in specs if s.needs_weights]
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(learned) != 1:
                raise HingeError(
                    f"--weights {value} does not say which encoder it is for",
                    "write --weights NAME=FILE, e.g. --weights uni=/models/uni.bin",
                )
            name, path = learned[0], value
        name = name.strip().lower()
        if name not in learned:
            raise HingeError(f"--weights given for '{name}', which is not a learned encoder of this run",
                             f"weights apply to: {', '.join(learned) or 'none (the default encoder needs none)'}")
        out[name] = Path(path).expanduser()
    return out


@dataclass(frozen=True)
class TileSet:
    """What embed needs from one tiles file."""

    path: Path
    barcodes: list[str]
    coords: np.ndarray
    has_images: bool
    slide: Path
    mpp_source: float
    mpp_target: float
    patch_px: int

    @classmethod
    def read(cls, path: Path) -> TileSet:
        try:
            with h5py.File(path, "r") as h5:
                barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in h5["barcode"][:]]
                a = h5.attrs
                return cls(path, barcodes, h5["coords"][:].astype(np.int64), "img" in h5, Path(str(a["slide"])),
                           float(a["mpp_source"]), float(a["mpp_target"]), int(a["patch_px"]))
        except (OSError, KeyError) as exc:
            raise HingeError(f"{path} is not a complete tiles file ({exc})", "re-run hinge tile --overwrite for this sample") from None


def _read_tile_images(path: Path, n: int, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """Batches of the tiles file's `img`, read ahead by one background thread (HDF5 decompression overlaps compute)."""
    out: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def worker() -> None:
        try:
            with h5py.File(path, "r") as h5:
                img = h5["img"]
                for start in range(0, n, batch):
                    if stop.is_set():
                        return
                    out.put((start, img[start : start + batch]))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            out.put(exc)
            return
        out.put(None)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def _require_slide(tiles: TileSet, why: str) -> None:
    if not tiles.slide.exists():
        raise HingeError(f"{tiles.path.name}: {why}, but the slide {tiles.slide} is gone", "restore the slide at that path, or re-tile")


def _field_batches(tiles: TileSet, fld: Field, batch: int, workers: int) -> Iterator[tuple[int, np.ndarray]]:
    if fld.mpp is None and tiles.has_images:
        yield from _read_tile_images(tiles.path, len(tiles.barcodes), batch)
        return
    _require_slide(tiles, "its tiles hold no pixels (--no-images)" if fld.mpp is None
                   else f"this encoder reads a {fld.um:.0f} µm field around each spot")
    mpp, px = (tiles.mpp_target, tiles.patch_px) if fld.mpp is None else (fld.mpp, fld.px)
    with open_slide(tiles.slide, tiles.mpp_source) as slide:
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


def _slide_features(tiles: TileSet, enc: Encoder, cfg: EmbedConfig, label: str, progress: Progress) -> np.ndarray:
    """(N, views, dim) from an encoder that walks the whole slide once (the default encoder)."""
    _require_slide(tiles, f"encoder '{enc.spec.name}' reads its fields from the slide")
    with open_slide(tiles.slide, tiles.mpp_source) as slide:
        plans = enc.plan_slide(tiles.coords.astype(np.float64), require_mpp(slide))
        with progress.task(f"{label} (slide tiles)", sum(len(p.tiles) for p in plans)) as advance:
            return enc.encode_slide(plans, lambda fld, plan: read_plan_tiles(slide, fld, plan, cfg.workers), cfg.views, advance)


def embed_sample(
    run: Run,
    sample: str,
    encoders: Sequence[Encoder],
    cfg: EmbedConfig,
    progress: Progress = SILENT,
) -> dict:
    """Embed one tiled sample with `encoders` (features concatenated); returns the manifest record."""
    key = encoder_key([e.spec for e in encoders])
    final = run.embeddings(key, sample)
    stage = f"embed:{key}"
    started = time.time()
    with output_lock(final):
        remove_stale_temporaries(final)
        tiles = TileSet.read(run.tiles(sample))
        run.record_stage(sample, stage, "running", inputs={"tiles": describe_input(tiles.path)}, params=asdict(cfg))
        n, views = len(tiles.barcodes), cfg.views
        dims = [e.dim for e in encoders]
        keep_views = views > 1 and not cfg.average_views
        shape = (n, views, sum(dims)) if keep_views else (n, sum(dims))
        with atomic_path(final) as tmp, h5py.File(tmp, "w") as out:
            chunk_rows = max(1, min(n, 256))
            ds = out.create_dataset("embeddings", shape=shape, dtype=np.float32, chunks=(chunk_rows, *shape[1:]) if n else None)
            out.create_dataset("barcodes", data=np.array(tiles.barcodes, dtype=object), dtype=h5py.string_dtype("utf-8"))
            out.create_dataset("coords", data=tiles.coords)
            offset = 0
            for enc in encoders:
                if enc.reads_slide:
                    feats = _slide_features(tiles, enc, cfg, f"{sample}: {enc.spec.name}", progress)
                    ds[..., offset : offset + enc.dim] = feats if keep_views else feats.mean(axis=1)
                else:
                    streams = [_field_batches(tiles, f, cfg.batch_size, cfg.workers) for f in enc.spec.fields]
                    with progress.task(f"{sample}: {enc.spec.name}", n) as advance:
                        for parts in zip(*streams):
                            start = parts[0][0]
                            feats = enc([p for _, p in parts], views)
                            if not keep_views:
                                feats = feats.mean(axis=1)
                            ds[start : start + len(feats), ..., offset : offset + enc.dim] = feats
                            advance(len(feats))
                offset += enc.dim
            out.attrs.update({
                "encoder": key,
                "encoders": json.dumps([e.spec.name for e in encoders]),
                "dims": json.dumps(dims),
                "weights_sha256": json.dumps([e.weights_sha256 for e in encoders]),
                "weights": json.dumps([str(e.weights) if e.weights else None for e in encoders]),
                "views": views,
                "views_kept": keep_views,
                "sample_id": sample,
                "tiles": str(tiles.path.resolve()),
            })
        record = {"encoder": key, "n_spots": n, "dim": sum(dims), "views": views, "views_kept": keep_views,
                  "weights_sha256": [e.weights_sha256 for e in encoders], "device": str(encoders[0].device),
                  "seconds": round(time.time() - started, 2), "output": str(final)}
        run.record_stage(sample, stage, "ok", **record)
    log.info("%s: %d spots -> %s in %.1fs", sample, n, key, record["seconds"])
    return record


def _stale(path: Path, cfg: EmbedConfig) -> list[str]:
    with h5py.File(path, "r") as h5:
        made = {"views": int(h5.attrs.get("views", 1)), "views_kept": bool(h5.attrs.get("views_kept", False))}
    wanted = {"views": cfg.views, "views_kept": cfg.views > 1 and not cfg.average_views}
    return [f"{k}={made[k]} (now {wanted[k]})" for k in made if made[k] != wanted[k]]


def tiled_samples(run: Run) -> list[str]:
    """Samples with a finished tiles file (temporaries and locks are not samples)."""
    folder = run.root / "tiles"
    return sorted(p.stem for p in folder.glob("*.h5") if not p.name.startswith(".")) if folder.is_dir() else []


def embed_samples(
    run: Run,
    cfg: EmbedConfig,
    weights: Sequence[str] = (),
    shard: Shard = Shard(),
    overwrite: bool = False,
    keep_going: bool = False,
    progress: Progress = SILENT,
) -> SampleReport:
    """Embed this shard's share of the run's tiled samples with the configured encoder(s)."""
    if cfg.views not in (1, MAX_VIEWS):
        raise HingeError(f"--views {cfg.views} is not supported", "use --views 1 or --views 8 (the dihedral group)")
    if cfg.batch_size < 1:
        raise HingeError(f"--batch-size {cfg.batch_size} must be at least 1", "give e.g. --batch-size 64")
    specs = parse_encoders(cfg.encoder)
    paths = parse_weights(weights, specs)
    for spec in specs:  # fail before any work, not after the first sample
        if spec.needs_weights and locate_weights(spec, paths.get(spec.name)) is None:
            raise missing_weights_error(spec)
    if [s.name for s in specs] == [DEFAULT_ENCODER]:
        log.info("encoder: the weight-free default (stain, nuclei and texture statistics); "
                 "give --encoder uni,conch etc. with their weights for foundation-model features")
    samples = tiled_samples(run)
    if not samples:
        raise HingeError(f"no tiled samples in {run.root}", "run hinge tile first (or point --run at the right folder)")
    key = encoder_key(specs)
    summary = SampleReport(f"embed ({key})")
    todo = []
    for sample in shard.select(samples):
        final = run.embeddings(key, sample)
        if final.exists() and not overwrite:
            stale = _stale(final, cfg)
            if stale:
                log.warning("%s: existing embeddings have %s; pass --overwrite to redo", sample, ", ".join(stale))
            summary.skipped.append(sample)
        else:
            todo.append(sample)
    if not todo:
        return summary
    encoders = [build_encoder(s.name, paths.get(s.name), cfg.device) for s in specs]
    with progress.task("samples", len(todo)) as advance:
        for sample in todo:
            with summary.attempt(run, sample, f"embed:{key}", keep_going):
                embed_sample(run, sample, encoders, cfg, progress)
            advance(1)
    return summary
