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
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hinge_cli.errors import HingeError, setting

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
    """Yield a temporary path beside `final`; rename it into place only on success. A full disk, an exceeded quota, a
    read-only folder or missing permissions while writing it is the one-line error that names `final`, whatever the
    writer (safetensors and HDF5 keep only the words of the system's error, or none)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")  # whose it is, for `sweep_leftovers`
    try:
        yield tmp
        os.replace(tmp, final)
    except HingeError:
        raise
    except Exception as exc:  # noqa: BLE001 - each writer words a full disk its own way
        user = user_os_error(exc, final) or full_disk(exc, final)
        if user is None:
            raise
        raise user from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time (ns) and, where cheap, sha256 of an output: what a manifest's `ok` record pins it by.

    A file replaced, rewritten or left behind by an interrupted writer no longer matches,
    so the stage is redone instead of trusted; `same_file` says whether one still does.
    """
    stat = Path(path).stat()
    pin: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if stat.st_size <= CHEAP_HASH_BYTES:
        pin["sha256"] = sha256_file(path)
    return pin


def same_file(path: Path, pin: dict[str, Any]) -> bool:
    """Whether the file at `path` is the one `pin` (from `fingerprint`) describes.

    A copied run (cp -r) changes modification times, so a differing time falls back on the
    sha256; a large file without one is trusted on its size (it only ever lands by rename).
    """
    stat = Path(path).stat()
    if stat.st_size != pin.get("size"):
        return False
    if stat.st_mtime_ns == pin.get("mtime_ns"):
        return True
    return "sha256" not in pin or sha256_file(path) == pin["sha256"]


class OutputFinished(Exception):  # noqa: N818 (not an error: the work was already done)
    """Raised by a writer that, holding the lock, finds its output already recorded as done."""


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(final: Path) -> None:
    """Delete temporaries of `final` left by a killed writer (call while holding its lock)."""
    for stale in Path(final).parent.glob(f".{Path(final).name}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


OS_ERRORS = {  # errno -> (what happened, what to do): the system errors a user causes and can fix
    errno.ENOSPC: ("no space left on the device", f"free disk space (or use a {setting('run')} / {setting('out')} folder on a larger disk), then "
                   "run the same command again: finished outputs are kept"),
    errno.EDQUOT: ("the disk quota is exceeded", f"free space within your quota (or use a {setting('run')} / {setting('out')} folder elsewhere), then "
                   "run the same command again"),
    errno.EROFS: ("the file system is read-only", f"use a writable {setting('run')} (and {setting('out')}) folder, or copy the run to one"),
    errno.EACCES: ("permission denied", f"fix the permissions of that path, or use a {setting('run')} / {setting('out')} folder you can write to"),
    errno.EPERM: ("operation not permitted", f"fix the permissions of that path, or use a {setting('run')} / {setting('out')} folder you can write to"),
}
OS_ERROR_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,  # h5py and safetensors
                  "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES}  # keep only the text
FULL_DISK_BYTES = 2**20  # a write that fails with less than this free beside it failed for want of space


def user_os_error(exc: BaseException, path: Path | None = None) -> HingeError | None:
    """The one-line user error for a full disk, a read-only folder or missing permissions (by errno, or by the system's
    words where a writer kept only those); None for anything else. `path`: where, when the error does not say."""
    errno_code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    code = errno_code if errno_code in OS_ERRORS else next((c for t, c in OS_ERROR_TEXTS.items() if t in str(exc)), None)
    if code is None:
        return None
    problem, fix = OS_ERRORS[code]
    where = getattr(exc, "filename", None) or path
    return HingeError(f"{problem}" + (f" at {where}" if where else ""), fix)


def full_disk(exc: BaseException, path: Path) -> HingeError | None:
    """ENOSPC's error for a write that failed in words that do not say why (HDF5's "write request failed") while the
    disk holding `path` is full; None otherwise."""
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None
    if free >= FULL_DISK_BYTES or not isinstance(exc, (OSError, RuntimeError, ValueError)):
        return None
    problem, fix = OS_ERRORS[errno.ENOSPC]
    return HingeError(f"{problem} at {path} ({free} bytes free)", fix)


@contextlib.contextmanager
def reading(path: Path | str, fix: str) -> Iterator[None]:
    """Reading a file hinge wrote. Any failure but a missing file or a user OS error (a full disk, permissions) means
    the file is damaged (cut short by a quota, overwritten, half-copied): one line that names it and says `fix`."""
    try:
        yield
    except (HingeError, FileNotFoundError):
        raise
    except OSError as exc:
        if user_os_error(exc) is not None:
            raise
        raise damaged(path, exc, fix) from None
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in whichever way its reader happens to
        raise damaged(path, exc, fix) from None


def damaged(path: Path | str, exc: BaseException, fix: str) -> HingeError:
    """The one-line error for a damaged file: which file, that it is damaged, the reader's own words, and `fix`."""
    words = str(exc).splitlines()[0][:120] if str(exc) else ""
    return HingeError(f"{path} is damaged ({type(exc).__name__}{': ' + words if words else ''})", fix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


class OutputLocked(HingeError):
    """Another live process holds the output's lock: not a failure of this sample."""


EMPTY_LOCK_GRACE_S = 60.0  # an owner writes its lock file at once; one still empty after this was never finished


def _read_owner(lock: Path) -> dict[str, Any] | None:
    """The lock's owner record; None when the file is empty or not JSON (its writer died, e.g. on a full disk)."""
    try:
        owner = json.loads(lock.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and "pid" in owner else None


def _is_stale(lock: Path, owner: dict[str, Any] | None, host: str) -> bool:
    if owner is None:
        try:
            return time.time() - lock.stat().st_mtime > EMPTY_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    return owner == {} or (owner.get("host") == host and not _pid_alive(int(owner["pid"])))


LEFTOVER_AGE_S = 3600.0  # another node's temporary (or one named before hosts were) untouched this long is abandoned
TEMPORARY = re.compile(r"^\..+\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")  # `atomic_path`'s names: .NAME.tmp-HOST-PID


def sweep_leftovers(root: Path) -> list[Path]:
    """Remove what killed writers left under `root` that no live process owns: temporaries of a dead process of this
    host at once, and those of another node (whose processes cannot be asked) once nobody touched them for
    LEFTOVER_AGE_S; lock files of dead owners (as `output_lock` would take them over). A staged checkpoint is its
    unit's next writer's to finish or discard. Returns what was removed; what cannot be removed (a read-only run) stays."""
    removed, host, now = [], socket.gethostname(), time.time()
    for path in Path(root).rglob("*"):  # one walk of the run for both kinds
        with contextlib.suppress(OSError):
            if path.name.endswith(".lock") and not path.name.startswith("."):  # dot-locks (.manifest.lock) are flock files
                gone = _is_stale(path, _read_owner(path), host)
            elif named := TEMPORARY.match(path.name):
                owner, dead, old = named["host"], not _pid_alive(int(named["pid"])), now - path.stat().st_mtime > LEFTOVER_AGE_S
                gone = dead if owner == host else (old and (dead or owner is not None))  # no host in the name: this host's
            else:
                continue
            if gone:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def output_lock(final: Path, what: str | None = None) -> Iterator[None]:
    """Hold `<final>.lock` while writing `final`; a lock of a dead process on this host is taken over.

    A lock file (not flock) so that it also works across the nodes of a cluster
    sharing one file system, where the owner's host name tells whether it is ours.
    An empty or unreadable lock file (its writer died before finishing it) is stale once
    it is older than a minute. `what` names the work in the refusal (default: writing `final`).
    """
    lock = Path(final).with_name(Path(final).name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_owner(lock)
            if _is_stale(lock, owner, me["host"]):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()
                continue
            doing = what or f"{final} is being written"
            if owner is None:
                raise OutputLocked(f"{doing}: its lock file {lock} is empty or unreadable (a job that died on a full disk?)",
                                   f"if no job is running, delete {lock}") from None
            raise OutputLocked(f"{doing} by another process (pid {owner['pid']} on {owner.get('host', '?')})",
                               f"wait for it to finish, or delete {lock} if that job is dead") from None
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        except OSError:
            lock.unlink()  # never leave an empty lock behind (a full disk)
            raise
        break
    else:
        raise OutputLocked(f"could not take the lock {lock}: other jobs keep taking it", "run one job per output")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
