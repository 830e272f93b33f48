"""Files that are never seen half-written, and the locks that say which folders a live process is writing.

Every file goes through `write_atomic`: written to a per-process temporary name, flushed to disk, then renamed; a
process killed half-way leaves a hidden `.NAME.tmp-PID` file that `remove_stray_files` (the run store's repair)
removes. Locks are `flock`s, so the kernel frees them when their process dies; without fcntl (Windows) they are
no-ops.
"""

__all__ = ["write_atomic", "write_json", "write_npy", "read_json", "json_default", "LOCK", "new_lock", "try_lock",
           "unlock", "writer_gone", "remove_stray_files", "exclusive", "inside",
           "file_sha256"]

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ._faults import fault
from .errors import FastclsError

try:
    import fcntl
except ImportError:  # not on Windows: runs are then never assumed dead, so never repaired automatically
    fcntl = None

LOCK = ".lock"  # held (flock) by the process writing a run; the kernel frees it when that process dies


# -- atomic files ------------------------------------------------------------------------------------------------------
def write_atomic(path, write: Callable[[Path], None]):
    """Write `path` through `write(tmp_path)`, flush it to disk, then rename: readers see the old file or the new one.

    A process killed half-way leaves a hidden `.NAME.tmp-PID` file that the store's repair removes.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not reach the disk before the data does (power loss)
        finally:
            os.close(fd)
        fault(f"write-{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def file_sha256(path) -> str:
    """The SHA-256 hex digest of a file, read in 1 MiB blocks (weights files: checked before they are loaded)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj):
    """`obj` as JSON at `path`, atomically (numpy values, paths, tuples and sets as JSON types)."""
    write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=json_default)))


def write_npy(path: Path, arr: np.ndarray):
    """A numpy array as `.npy` at `path`, atomically and without pickle."""
    def write(p):
        with open(p, "wb") as f:  # a file object: np.save would append .npy to a bare temporary name
            np.save(f, arr, allow_pickle=False)
    write_atomic(path, write)


def read_json(path: Path) -> Optional[Any]:
    """The JSON document at `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, (Path,)):
        return str(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# -- locks: which run folders a live process is writing ------------------------------------------------------------
def new_lock(folder: Path):
    """Lock a fresh folder: the lock file is locked before it gets its name, so nobody sees it unlocked."""
    if fcntl is None:
        return None
    tmp = folder / f"{LOCK}.new"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(tmp, folder / LOCK)
    return fd


def try_lock(folder: Path):
    """An fd holding `folder/.lock` exclusively, or None when a live process holds it."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def unlock(fd):
    """Release a lock from `new_lock` / `try_lock` (None: nothing held)."""
    if fd is not None:
        try:
            os.close(fd)  # closing the only descriptor releases the flock
        except OSError:
            pass


def writer_gone(tmp: Path) -> bool:
    """Whether the process that made the temporary folder `tmp` is gone (so the folder is debris)."""
    if not (tmp / LOCK).exists():
        try:  # a folder made a moment ago may not have its lock yet
            return time.time() - tmp.stat().st_mtime > 60
        except OSError:
            return False
    fd = try_lock(tmp)
    if fd is None:
        return False
    unlock(fd)
    return True


def remove_stray_files(folder: Path, live_writers: bool = True):
    """Remove half-written `.NAME.tmp-PID` files of a dead writer; with `live_writers=False` only those whose process
    (PID on this machine) is gone, for folders written without a lock (another process may be writing there now)."""
    for p in Path(folder).glob(".*.tmp-*"):
        if not live_writers:
            pid = p.name.rsplit("-", 1)[1]
            if pid.isdigit() and _alive(int(pid)):
                continue
        p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


@contextmanager
def exclusive(path):
    """Hold the lock file `path` exclusively (blocking) for the duration of the block. A no-op without fcntl."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


# -- confinement: names read from a run folder never lead outside it -------------------------------------------------
def inside(root, name, what: str = "run") -> Path:
    """`root / name` when `name` is one plain entry of `root` that resolves inside it (no separator, no `..`, no
    absolute path, no symlink out of it); else a FastclsError naming the folder. Names read from a store (run ids
    from meta.json or the index, file names) go through this before anything is read or written there."""
    root, name = Path(root), str(name)
    path = root / name
    plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name \
        and Path(name).name == name
    if not plain or path.resolve().parent != root.resolve():
        raise FastclsError(f"The store {root} names the {what} {name!r}, which does not lead to a {what} inside it; it "
                           f"was not read or written. The store may have been tampered with: `fastcls doctor "
                           f"--runs-dir {root}` "
                           "lists its problems.")
    return path
