"""The string columns the HDF5 formats share: spot barcodes, stored as UTF-8 and read back as `str`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import h5py
import numpy as np


def write_strings(h5: h5py.Group, name: str, values: Sequence[str], column: bool = False) -> h5py.Dataset:
    """`column` stores (N, 1), HEST's shape for patch barcodes; readers flatten either shape."""
    data = np.array(values, dtype=object)
    return h5.create_dataset(name, data=data.reshape(-1, 1) if column else data, dtype=h5py.string_dtype("utf-8"))


def decode_strings(values: Iterable[object]) -> list[str]:
    """h5py returns bytes for variable-length strings written by some tools and str for others."""
    return [b.decode() if isinstance(b, bytes) else str(b) for b in values]
