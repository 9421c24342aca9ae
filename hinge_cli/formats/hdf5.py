"""The string columns the HDF5 formats share: spot barcodes, stored as UTF-8 and read back as `str`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import h5py
import numpy as np


def open_for_writing(path: Path, mode: str = "w") -> h5py.File:
    """An HDF5 file opened to write, with no chunk cache: every write goes to disk at once and fails there. A full disk
    under a cache of dirty chunks that can no longer be flushed crashes the interpreter (SIGSEGV, exit 139) when h5py
    frees the file after the error; hinge writes whole chunks or plain rows, so the cache saved nothing."""
    return h5py.File(path, mode, rdcc_nbytes=0)


def write_strings(h5: h5py.Group, name: str, values: Sequence[str], column: bool = False) -> h5py.Dataset:
    """`column` stores (N, 1), HEST's shape for patch barcodes; readers flatten either shape."""
    data = np.array(values, dtype=object)
    return h5.create_dataset(name, data=data.reshape(-1, 1) if column else data, dtype=h5py.string_dtype("utf-8"))


def decode_strings(values: Iterable[object]) -> list[str]:
    """h5py returns bytes for variable-length strings written by some tools and str for others."""
    return [b.decode() if isinstance(b, bytes) else str(b) for b in values]
