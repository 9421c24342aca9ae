"""Kill injection for the reliability tests: `os.replace`, the commit of every atomic write, dies at call N; and what
"the same as an uninterrupted run" compares."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from hinge_cli.core.files import same_file
from hinge_cli.run.directory import Run


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


def kill_every_write(base: Path, root: Path, command: Callable[[Path], object]) -> Iterator[tuple[int, Path, Path]]:
    """A copy of the folder `base` taken through `command` uninterrupted (the reference); then, for each of its atomic
    writes, another copy killed at that write and given the same command again: yields (write, that copy, reference)."""
    ref = shutil.copytree(base, root / "ref")
    writes = count_writes(lambda: command(ref))
    assert writes >= 2, "a command with one write or none would prove nothing here"
    for n in range(writes):
        copy = shutil.copytree(base, root / f"killed{n}")
        with kill_at(n), pytest.raises(Killed):
            command(copy)
        command(copy)  # the same command again, no --overwrite
        yield n, copy, ref


def rerun_after_each_kill(base: Path, root: Path, stage: Callable[[Run], object]) -> Iterator[tuple[int, Run, Run]]:
    """`kill_every_write` for a stage of the Python API over the run at `base`."""
    for n, copy, ref in kill_every_write(base, root, lambda folder: stage(Run(folder))):
        yield n, Run(copy), Run(ref)


VOLATILE = frozenset({"time", "host", "seconds", "mtime_ns", "peak_memory_mb", "versions"})


def _steady(value: object, root: str) -> object:
    if isinstance(value, dict):
        if "output" in value and "output_file" in value:  # its pin holds the path written inside: whether it still fits
            value = {**value, "output_file": same_file(Path(value["output"]), value["output_file"])}
        return {k: _steady(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_steady(v, root) for v in value]
    return value.replace(root, "ROOT") if isinstance(value, str) else value


def h5_content(path: Path, root: Path | str | None = None) -> dict[str, object]:
    """Every group, dataset and attribute of an HDF5 file, for bit-for-bit comparison; the folder `root`, where written
    inside (a path in an attribute or a string), reads ROOT, so two copies of one run compare equal."""
    tree: dict[str, object] = {}

    def steady(text: str) -> str:
        return text.replace(str(root), "ROOT") if root is not None else text

    with h5py.File(path, "r") as h5:
        def attrs(item: h5py.HLObject) -> dict[str, str]:
            return {k: steady(str(v)) for k, v in item.attrs.items()}

        def visit(name: str, item: h5py.HLObject) -> None:
            data = np.asarray(item[()]) if isinstance(item, h5py.Dataset) else None
            if data is not None and data.dtype.kind in "OSU":  # text, perhaps a path inside the folder
                data = np.array([steady(str(v.decode() if isinstance(v, bytes) else v)) for v in data.ravel()],
                                dtype=object).reshape(data.shape)
            tree[name] = (None if data is None else _exact(data), attrs(item))
        h5.visititems(visit)
        tree["/"] = attrs(h5)
    return tree


def folder_record(root: Path) -> dict[str, object]:
    """Everything a folder holds (outputs, manifest, hinge.yaml, logs, locks by name), less what differs between two
    runs of one command anyway: clock times, durations, host, versions, modification times and the folder's own path."""
    here, record = str(root), {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = str(path.relative_to(root))
        if path.suffix == ".json":
            record[name] = _steady(json.loads(path.read_text()), here)
        elif path.suffix == ".jsonl":
            record[name] = [_steady(json.loads(line), here) for line in path.read_text().splitlines()]
        elif path.suffix in (".h5", ".h5ad"):
            record[name] = h5_content(path, here)
        elif path.suffix in (".yaml", ".txt", ".md", ".csv", ".html"):
            record[name] = path.read_text().replace(here, "ROOT")
        elif path.suffix == ".lock":
            record[name] = "a lock"
        else:
            record[name] = path.read_bytes()
    return record


def _exact(array: np.ndarray) -> object:
    return array.tolist() if array.dtype == object else (array.dtype.str, array.shape, array.tobytes())


def differences(got: object, expected: object, where: str = "") -> list[str]:
    """Where two records differ, as paths to the first differing values: the message of a failed comparison."""
    if isinstance(got, dict) and isinstance(expected, dict):
        return [d for k in sorted(got.keys() | expected.keys(), key=str)
                for d in (differences(got.get(k), expected.get(k), f"{where}/{k}") if k in got and k in expected
                          else [f"{where}/{k}: only in {'the re-run' if k in got else 'the uninterrupted run'}"])]
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)) and len(got) == len(expected):
        return [d for i, (a, b) in enumerate(zip(got, expected, strict=True)) for d in differences(a, b, f"{where}[{i}]")]
    return [] if got == expected else [f"{where}: {str(got)[:120]} != {str(expected)[:120]}"]
