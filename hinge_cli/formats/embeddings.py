"""The embeddings file, `embeddings/<encoder-key>/<sample>.h5`: image features per spot of one tiles file.

Datasets: `features` (N, D) float32, or (N, V, D) with V dihedral views kept as training augmentations,
chunked by 256 spots (TRIDENT's name; `embeddings` is a second HDF5 name for the same dataset, HEST's name and
this format's own before, so readers of either find it and files written earlier still read); `barcodes` (N,) UTF-8 and `coords` (N, 2) int64 copied from the tiles. The attributes
are `EmbeddingAttrs`; its list fields are stored as JSON strings, which only this module parses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hinge_cli.core.files import reading
from hinge_cli.errors import HingeError, command, setting
from hinge_cli.formats.hdf5 import decode_strings, open_for_writing, write_strings

CHUNK_ROWS = 256
REEMBED = f"re-run `{command('embed')} {setting('overwrite')}` for this sample, or delete the file and run `{command('embed')}` again"
FEATURE_NAMES = ("features", "embeddings")  # the first is written, with the second as a hard link to it
_JSON_FIELDS = ("encoders", "dims", "weights_sha256", "weights")


@dataclass(frozen=True)
class EmbeddingAttrs:
    """Which encoders made the features and how; the field order is the order the attributes are written in."""

    encoder: str  # the encoder key, e.g. "uni+conch"
    encoders: list[str] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)  # feature dimensions per encoder, concatenated in order
    weights_sha256: list[str | None] = field(default_factory=list)  # per encoder; None for weight-free ones
    weights: list[str | None] = field(default_factory=list)  # the weight files used, per encoder
    views: int = 1
    views_kept: bool = False  # True: (N, V, D) stored; False: the views were averaged
    sample_id: str = ""
    tiles: str = ""  # the resolved tiles file the features were computed from

    @classmethod
    def from_h5(cls, attrs: h5py.AttributeManager) -> EmbeddingAttrs:
        return cls(
            encoder=str(attrs.get("encoder", "")),
            **{k: list(json.loads(attrs[k])) for k in _JSON_FIELDS if k in attrs},
            views=int(attrs.get("views", 1)), views_kept=bool(attrs.get("views_kept", False)),
            sample_id=str(attrs.get("sample_id", "")), tiles=str(attrs.get("tiles", "")),
        )

    def to_h5(self) -> dict[str, Any]:
        return {k: json.dumps(v) if k in _JSON_FIELDS else v for k, v in asdict(self).items()}



@dataclass
class Embeddings:
    barcodes: list[str]
    coords: np.ndarray
    features: np.ndarray  # (N, D), or (N, V, D) with V augmented views per spot
    attrs: EmbeddingAttrs


class EmbeddingReader:
    """An open embeddings file whose features are read a range of spots at a time."""

    def __init__(self, h5: h5py.File, path: Path):
        self._h5, self.path = h5, path
        with self._reading():
            self.attrs = EmbeddingAttrs.from_h5(h5.attrs)
            names = [name for name in FEATURE_NAMES if name in h5]
            if not names:
                raise HingeError(f"{path} holds no `features` or `embeddings` dataset", REEMBED)
            self._features = h5[names[0]]

    def _reading(self) -> contextlib.AbstractContextManager[None]:
        return reading(self.path, REEMBED)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._features.shape)

    def barcodes(self) -> list[str]:
        with self._reading():
            return decode_strings(self._h5["barcodes"][()])

    def coords(self) -> np.ndarray:
        with self._reading():
            return self._h5["coords"][()]

    def rows(self, start: int, stop: int) -> np.ndarray:
        with self._reading():
            return self._features[start:stop]


@contextmanager
def open_embeddings(path: Path) -> Iterator[EmbeddingReader]:
    """The embeddings file at `path`, open for reading; a damaged one is a one-line error that names it."""
    path = Path(path)
    if not path.exists():
        raise HingeError(f"embeddings {path} do not exist", f"run `{command('embed')}` with the same encoder first")
    with reading(path, REEMBED):
        h5 = h5py.File(path, "r")
    with h5:
        yield EmbeddingReader(h5, path)


def read_embedding_attrs(path: Path) -> EmbeddingAttrs:
    with open_embeddings(path) as src:
        return src.attrs


def read_embeddings(path: Path) -> Embeddings:
    with open_embeddings(path) as src:
        return Embeddings(src.barcodes(), src.coords(), src.rows(0, src.shape[0]).astype(np.float32), src.attrs)


class EmbeddingWriter:
    """The features dataset of a file being written, filled encoder by encoder and batch by batch."""

    def __init__(self, dataset: h5py.Dataset):
        self._features = dataset

    def write(self, features: np.ndarray, rows: slice = slice(None), columns: slice = slice(None)) -> None:
        """Store `features` at spots `rows` and feature columns `columns` (the last axis; views stay whole)."""
        self._features[rows, ..., columns] = features


@contextmanager
def write_embeddings(path: Path, attrs: EmbeddingAttrs, barcodes: Sequence[str], coords: np.ndarray,
                     shape: tuple[int, ...]) -> Iterator[EmbeddingWriter]:
    """Create the file with an empty `embeddings` of `shape`; the attributes are written once the caller is done."""
    n = shape[0]
    with open_for_writing(path) as h5:
        dataset = h5.create_dataset(FEATURE_NAMES[0], shape=shape, dtype=np.float32,
                                    chunks=(max(1, min(n, CHUNK_ROWS)), *shape[1:]) if n else None)
        h5[FEATURE_NAMES[1]] = dataset
        write_strings(h5, "barcodes", barcodes)
        h5.create_dataset("coords", data=coords)
        yield EmbeddingWriter(dataset)
        h5.attrs.update(attrs.to_h5())
