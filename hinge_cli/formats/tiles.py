"""The tiles file, `tiles/<sample>.h5`: one row per spot (barcode, level-0 centre, tissue fraction), optional pixels.

Datasets: `coords` (N, 2) int64 level-0 spot CENTRES, `coords_topleft` (N, 2) int64 level-0 top-left corners
of the patches (HEST's and TRIDENT's meaning of `coords`), `barcode` (N, 1) UTF-8 (HEST's shape, so HEST-style
readers that take `row[0]` get the barcode; files with (N,) barcodes still read), `tissue_frac` (N,) float32 and,
when patches are kept, `img` (N, patch_px, patch_px, 3) uint8 chunked one patch per chunk (lzf). The attributes
are `TileAttrs`: how the spots were placed and at what scale, so later stages can redo or check it;
`patch_size_level0` (the patch side in level-0 px) is written beside them for HEST/TRIDENT readers.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.hdf5 import decode_strings, open_for_writing, write_strings


@dataclass(frozen=True)
class TileAttrs:
    """How a sample was tiled; the field order is the order the attributes are written in."""

    sample_id: str
    slide: Path  # the resolved slide path
    mpp_source: float  # µm/px of the slide's level 0
    mpp_origin: str  # where mpp_source came from: "user", "metadata"
    mpp_target: float  # µm/px of the patches
    patch_px: int
    level: int  # the pyramid level patches were read from
    mode: str  # "spots" (positions from an .h5ad) or "grid"
    grid: str
    spot_um: float
    pitch_um: float
    tissue_threshold: float
    tissue: dict[str, Any] = field(default_factory=dict)  # the TissueConfig used, stored as JSON
    images: bool = True  # whether `img` holds the patches

    @classmethod
    def from_h5(cls, h5: h5py.File) -> TileAttrs:
        """Older files may lack the descriptive attributes; the four that fix the patches are required."""
        attrs = h5.attrs
        return cls(
            sample_id=str(attrs.get("sample_id", "")), slide=Path(str(attrs["slide"])),
            mpp_source=float(attrs["mpp_source"]), mpp_origin=str(attrs.get("mpp_origin", "")),
            mpp_target=float(attrs["mpp_target"]), patch_px=int(attrs["patch_px"]), level=int(attrs.get("level", 0)),
            mode=str(attrs.get("mode", "")), grid=str(attrs.get("grid", "")), spot_um=float(attrs.get("spot_um", np.nan)),
            pitch_um=float(attrs.get("pitch_um", np.nan)), tissue_threshold=float(attrs.get("tissue_threshold", np.nan)),
            tissue=json.loads(attrs.get("tissue", "{}")), images=bool(attrs.get("images", "img" in h5)),
        )

    @property
    def patch_size_level0(self) -> float:
        """The patch side in level-0 pixels: what a top-left corner is offset by from the centre, twice."""
        return self.patch_px * self.mpp_target / self.mpp_source

    def to_h5(self) -> dict[str, Any]:
        return {**asdict(self), "slide": str(self.slide), "tissue": json.dumps(self.tissue)}


@dataclass(frozen=True)
class Tiles:
    """A tiles file without its pixels: small enough to hold for any slide."""

    path: Path
    attrs: TileAttrs
    barcodes: list[str]
    coords: np.ndarray  # (N, 2) int64 level-0 px
    tissue_frac: np.ndarray  # (N,) float32
    has_images: bool


@contextmanager
def _open(path: Path) -> Iterator[h5py.File]:
    try:
        with h5py.File(path, "r") as h5:
            yield h5
    except (OSError, KeyError) as exc:
        raise HingeError(f"{path} is not a complete tiles file ({exc})", f"re-run {command('tile')} {setting('overwrite')} for this sample") from None


def read_tile_attrs(path: Path) -> TileAttrs:
    with _open(path) as h5:
        return TileAttrs.from_h5(h5)


def read_tiles(path: Path) -> Tiles:
    with _open(path) as h5:
        return Tiles(Path(path), TileAttrs.from_h5(h5), decode_strings(h5["barcode"][()].reshape(-1)),
                     h5["coords"][()].astype(np.int64), h5["tissue_frac"][()].astype(np.float32), "img" in h5)


class TilesWriter:
    """An open tiles file whose patches arrive in batches, so a slide's pixels never sit in memory at once."""

    def __init__(self, h5: h5py.File, n: int, attrs: TileAttrs):
        side = attrs.patch_px
        self._img = (h5.create_dataset("img", shape=(n, side, side, 3), dtype=np.uint8, chunks=(1, side, side, 3),
                                       compression="lzf") if attrs.images else None)

    def write_images(self, start: int, batch: np.ndarray) -> None:
        if self._img is None:
            raise ValueError("this tiles file keeps no images")
        self._img[start : start + len(batch)] = batch


@contextmanager
def write_tiles(path: Path, attrs: TileAttrs, barcodes: Sequence[str], coords: np.ndarray,
                tissue_frac: np.ndarray) -> Iterator[TilesWriter]:
    """Write the per-spot datasets and attributes; with `attrs.images`, the caller then fills in the patches."""
    centres = np.rint(coords).astype(np.int64)
    with open_for_writing(path) as h5:
        h5.create_dataset("coords", data=centres)
        h5.create_dataset("coords_topleft", data=centres - int(round(attrs.patch_size_level0 / 2)))
        write_strings(h5, "barcode", barcodes, column=True)
        h5.create_dataset("tissue_frac", data=tissue_frac.astype(np.float32))
        for key, value in attrs.to_h5().items():
            h5.attrs[key] = value
        h5.attrs["patch_size_level0"] = attrs.patch_size_level0
        yield TilesWriter(h5, len(barcodes), attrs)


def read_tile_images(path: Path, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, patches) batches of `img`, read ahead by one background thread (HDF5 decompression overlaps compute)."""
    out: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def worker() -> None:
        try:
            with h5py.File(path, "r") as h5:
                img = h5["img"]
                for start in range(0, len(img), batch):
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
