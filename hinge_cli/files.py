"""Safe file writing shared by every module: atomic renames, output locks, content hashes.

A reader never sees half a file (write to a temporary name beside the target, then
rename), and two jobs never write the same output (a lock file that works across the
nodes of a cluster). The core imports this module; the run directory builds on it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hinge_cli.errors import HingeError

CHEAP_HASH_BYTES = 256 * 2**20  # files above this get size + mtime instead of sha256


def sha256_file(path: Path, chunk: int = 2**22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_input(path: Path) -> dict[str, Any]:
    """Path, size and (where cheap) sha256 of an input file, for the manifest."""
    path = Path(path).resolve()
    stat = path.stat()
    info: dict[str, Any] = {"path": str(path), "size": stat.st_size}
    if path.is_file() and stat.st_size <= CHEAP_HASH_BYTES:
        info["sha256"] = sha256_file(path)
    else:
        info["mtime"] = stat.st_mtime
    return info


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it into place only on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(final: Path) -> None:
    """Delete temporaries of `final` left by a killed writer (call while holding its lock)."""
    for stale in Path(final).parent.glob(f".{Path(final).name}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class OutputLocked(HingeError):
    """Another live process holds the output's lock: not a failure of this sample."""


@contextlib.contextmanager
def output_lock(final: Path) -> Iterator[None]:
    """Hold `<final>.lock` while writing `final`; a lock of a dead process on this host is taken over.

    A lock file (not flock) so that it also works across the nodes of a cluster
    sharing one file system, where the owner's host name tells whether it is ours.
    """
    lock = Path(final).with_name(Path(final).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") == me["host"] and not _pid_alive(int(owner.get("pid", -1))):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            raise OutputLocked(
                f"{final} is being written by another process (pid {owner.get('pid', '?')} on {owner.get('host', '?')})",
                f"wait for it to finish, or delete {lock} if that job is dead",
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
