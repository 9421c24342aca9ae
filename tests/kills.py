"""Kill injection for the reliability tests: `os.replace`, the commit of every atomic write, dies at call N."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from hinge_cli.run import Run


class Killed(BaseException):
    """Like SIGKILL for the code under test: no `except Exception` handler records it as a failure."""


@contextlib.contextmanager
def kill_at(call: int) -> Iterator[list[int]]:
    """Make the `call`-th os.replace (0-based) raise Killed before renaming; yields the running count."""
    real, seen = os.replace, [0]

    def replace(src: os.PathLike, dst: os.PathLike) -> None:
        if seen[0] == call:
            raise Killed(f"killed at write {call} ({Path(dst).name})")
        seen[0] += 1
        real(src, dst)

    os.replace = replace  # type: ignore[assignment]
    try:
        yield seen
    finally:
        os.replace = real


def count_writes(action) -> int:
    """How many atomic writes `action()` makes."""
    with kill_at(-1) as seen:
        action()
    return seen[0]


def rerun_after_each_kill(base: Path, root: Path, stage: Callable[[Run], object]) -> Iterator[tuple[int, Run, Run]]:
    """A copy of the run at `base` taken through `stage` uninterrupted (the reference); then, for each of its atomic
    writes, another copy killed at that write and given the same stage again: yields (write, that re-run, reference)."""
    ref = Run(shutil.copytree(base, root / "ref"))
    writes = count_writes(lambda: stage(ref))
    assert writes >= 2, "a stage with one write or none would prove nothing here"
    for n in range(writes):
        run = Run(shutil.copytree(base, root / f"killed{n}"))
        with kill_at(n), pytest.raises(Killed):
            stage(run)
        stage(run)  # the same command again, no --overwrite
        yield n, run, ref


def _exact(array: np.ndarray) -> object:
    return array.tolist() if array.dtype == object else (array.dtype.str, array.shape, array.tobytes())


def h5_content(path: Path, skip_attrs: tuple[str, ...] = ()) -> dict:
    """Every dataset and attribute of an HDF5 file, for bit-for-bit comparison."""
    with h5py.File(path, "r") as h5:
        data = {k: _exact(np.asarray(h5[k][()])) for k in h5}
        attrs = {k: str(v) for k, v in h5.attrs.items() if k not in skip_attrs}
    return {"data": data, "attrs": attrs}
