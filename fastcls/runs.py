"""The run store: one folder per run under `runs/` plus one SQLite index row per run.

A run folder is written under a temporary name and renamed into place in one step, and its index row is
written last, so a crash never leaves a half run: either the folder and the row exist, or neither is listed.
Arrays are plain `.npy` files (memory-mappable, no pickle); weights are safetensors.
"""

__all__ = ["RunData", "StoredRun", "RunStore", "new_run_id", "environment_info", "STATUSES", "CHECKPOINT", "AFTER_STORE"]

import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ._faults import fault
from .errors import FastclsError
from .metrics import get_metric
from .files import (LOCK, exclusive, inside, json_default, new_lock, read_json, remove_stray_files, try_lock, unlock,
                    write_atomic, write_json, writer_gone)
from .runfiles import check_run as _check_run, read_run_csv, read_run_json, read_run_npy, write_run_files

INDEX = "index.sqlite"
CHECKPOINT = "checkpoint.safetensors"  # a resumable training state, in the folder of a run not yet done
STATUSES = ("running", "interrupted", "failed", "done", "broken")  # broken: a damaged run (`fastcls doctor`)
AFTER_STORE: list = []  # callables (store, run id) called once a run is stored done (`fastcls.tracking.tracked`)
_COLUMNS = ("id", "name", "kind", "status", "recipe", "arch", "size", "ps", "metric_name", "metric", "valid_loss",
            "seconds", "created", "sweep", "parent", "config")


def new_run_id() -> str:
    """A sortable, collision-free id: UTC time to the second plus 6 random hex digits."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def environment_info() -> dict:
    """The git commit of the working directory (if any) and the versions of the libraries a run depends on."""
    import importlib.metadata as md
    info = {"versions": {}}
    for pkg in ("fastcls", "fastai", "torch", "torchvision", "timm", "numpy", "scikit-learn"):
        try:
            info["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        src = Path(__file__).resolve().parent
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                                            timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


@dataclass
class RunData:
    """Everything one run produces, as handed to `RunStore.save`.

    Probabilities are stacked views: `valid_probs[0]` is the plain prediction, `valid_probs[1:]` the TTA views,
    so any TTA blend can be recomputed later from the store alone.
    """

    config: dict
    vocab: list
    valid_probs: np.ndarray  # (V, N, C) float32
    valid_targets: np.ndarray  # (N,) int64
    valid_ids: list
    metrics: dict  # final metrics; 'metric_name' names the monitored one
    test_probs: Optional[np.ndarray] = None  # (V, M, C)
    test_ids: Optional[list] = None
    history: Optional[pd.DataFrame] = None  # one row per epoch
    weights: Optional[dict] = None  # state dict, saved as safetensors
    kind: str = "train"
    name: Optional[str] = None
    seconds: float = 0.0
    sweep: Optional[str] = None
    parent: Optional[str] = None
    extra: dict = field(default_factory=dict)  # other JSON-able facts (e.g. ensemble members, thresholds)


class StoredRun:
    """A run read back from the store; arrays are memory-mapped on first access.

    Every file is checked as it is read (`fastcls.runfiles`): a missing, damaged or out-of-folder file, or one of
    the wrong type or shape, is one FastclsError naming it.
    """

    def __init__(self, path: Path, row: dict):
        self.path, self.row = Path(path), row
        self.id, self.name, self.kind = row["id"], row["name"], row["kind"]

    @property
    def status(self) -> str:
        return self.row.get("status", "done")

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @cached_property
    def config(self) -> dict:
        return read_run_json(self.path, "config.json", dict)

    @cached_property
    def metrics(self) -> dict:
        return read_run_json(self.path, "metrics.json", dict, required=False) or {}

    @cached_property
    def vocab(self) -> list:
        return read_run_json(self.path, "vocab.json", list)

    @cached_property
    def meta(self) -> dict:
        return read_run_json(self.path, "meta.json", dict)

    @cached_property
    def valid_probs(self) -> np.ndarray:
        return read_run_npy(self.path, "valid_probs.npy", (3,), "f", shape={1: len(self.valid_ids), 2: len(self.vocab)})

    @cached_property
    def valid_targets(self) -> np.ndarray:
        return read_run_npy(self.path, "valid_targets.npy", (1, 2), "iub", shape={0: len(self.valid_ids)})

    @cached_property
    def valid_ids(self) -> list:
        return read_run_json(self.path, "valid_ids.json", list)

    @cached_property
    def test_probs(self) -> Optional[np.ndarray]:
        ids = self.test_ids  # test probabilities and their ids come together, or not at all
        return read_run_npy(self.path, "test_probs.npy", (3,), "f", required=ids is not None,
                            shape=None if ids is None else {1: len(ids), 2: len(self.vocab)})

    @cached_property
    def test_ids(self) -> Optional[list]:
        required = (self.path / "test_probs.npy").exists() or (self.path / "test_probs.npy").is_symlink()
        return read_run_json(self.path, "test_ids.json", list, required=required)

    @cached_property
    def history(self) -> Optional[pd.DataFrame]:
        return read_run_csv(self.path, "history.csv")

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    def __repr__(self):
        return f"StoredRun({self.id!r}, name={self.name!r}, kind={self.kind!r}, status={self.status!r})"


class RunStore:
    """The runs folder: `save` a `RunData`, `load` a run by id, id prefix or name, `leaderboard` as a DataFrame.

    Training runs go through `begin` (folder + index row with status 'running'), checkpoints written in place
    (each file atomically), then `finish` (status 'done') or `set_status(..., 'interrupted')`. The folder's
    `meta.json` is the truth and the index row is derived from it and written last, so the first use of a store
    repairs what a `kill -9` left: stale temporary folders are removed, a run whose writer died is marked
    'interrupted' (resumable from its last checkpoint), and a folder renamed into place but not yet indexed is
    indexed.
    """

    def __init__(self, root="runs"):
        self.root = Path(root)
        self._repaired = False
        self._locks: dict = {}  # run id -> open file holding that run's .lock while this process writes it

    # -- index ------------------------------------------------------------------------------------------------
    def _dir(self, rid: str) -> Path:
        """The folder of run `rid`, refused (FastclsError) unless it is a plain folder name inside the store."""
        return inside(self.root, rid)

    def writable(self) -> bool:
        """Whether this process may write the store (False: a read-only copy, e.g. a downloaded store)."""
        index, eff = self.root / INDEX, os.access in os.supports_effective_ids
        return os.access(self.root, os.W_OK, effective_ids=eff) and (
            not index.exists() or os.access(index, os.W_OK, effective_ids=eff))

    def _connect(self, write: bool = True) -> sqlite3.Connection:
        """The index; a reader neither switches on WAL nor creates anything (immutable on a read-only store)."""
        path = inside(self.root, INDEX, what="index") if (self.root / INDEX).is_symlink() else self.root / INDEX
        if write or self.writable():
            # a reader of a writable store connects plainly (changing nothing): in WAL mode only a read-write
            # connection can check the log back in and remove -wal/-shm when it is the last one to close
            con = sqlite3.connect(path, timeout=60)
        else:  # immutable: SQLite writes nothing beside a read-only index, not even -shm
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro&immutable=1", uri=True, timeout=60)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=60000")
        if write:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute(f"CREATE TABLE IF NOT EXISTS runs "
                        f"({', '.join(c + (' PRIMARY KEY' if c == 'id' else '') for c in _COLUMNS)})")
        return con

    def _rows(self, where: str = "", args=()) -> list[dict]:
        self._repair()
        if not (self.root / INDEX).exists():
            return []
        try:
            with closing(self._connect(write=False)) as con:
                rows = [dict(r) for r in con.execute(f"SELECT * FROM runs {where} ORDER BY created DESC, id DESC",
                                                     args)]
        except sqlite3.DatabaseError as e:
            if not _index_damaged(e):
                raise FastclsError(f"The index {self.root / INDEX} cannot be read ({e}).") from None
            raise self._damaged_index(e) from None
        return [r for r in rows if _plain_id(r["id"])]  # a tampered index row naming a path: no run

    def _damaged_index(self, e) -> FastclsError:
        return FastclsError(f"The index {self.root / INDEX} is damaged ({e}). Rebuild it from the run folders with "
                            f"`fastcls doctor --fix --runs-dir {self.root}` (the damaged file is kept aside); on a "
                            "read-only store, copy the folder somewhere writable first.")

    def _index(self, path: Path):
        """Write (or rewrite) the index row of the run folder `path` from its files: the folder is the truth."""
        row = _row_from_folder(path)
        with closing(self._connect()) as con, con:
            con.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(_COLUMNS))})", [row[c] for c in _COLUMNS])

    @contextmanager
    def exclusive(self, key: str):
        """Hold the store-wide lock `key` (blocking) while checking for and then creating a run that several processes
        may try to create at once (e.g. the cv run of folds trained in parallel). A no-op without fcntl."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / f".{key}.lock"):
            yield

    def check_writable(self, need_bytes: int = 0):
        """Fail before any training when the runs folder cannot be written or its disk has less than `need_bytes`."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise FastclsError(f"The runs folder {self.root} cannot be written ({e.strerror or e}). "
                               "Pass a writable folder with --runs-dir.") from None
        if need_bytes:
            free = shutil.disk_usage(self.root).free
            if free < need_bytes:
                raise FastclsError(f"The runs folder {self.root} is on a disk with {_mb(free)} free, but this run "
                                   f"needs about {_mb(need_bytes)} (weights, checkpoints, probabilities). Free some "
                                   "space or pass --runs-dir on a larger disk. Nothing was trained.")

    # -- repair -----------------------------------------------------------------------------------------------
    def _repair(self):
        """Once per store object: undo what a killed writer left (see the class docstring). Cheap: one listing."""
        if self._repaired or not self.root.is_dir():
            return
        self._repaired = True
        if not self.writable():  # a read-only copy: read it as it is
            return
        indexed = {}
        if (self.root / INDEX).exists():
            try:
                with closing(self._connect()) as con:
                    if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                        raise sqlite3.DatabaseError("quick_check failed")
                    indexed = dict(con.execute("SELECT id, status FROM runs").fetchall())
            except sqlite3.DatabaseError as e:
                if not _index_damaged(e):
                    raise
                self.rebuild_index(e)
                return
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if entry.name.startswith(".tmp-"):
                if writer_gone(path):
                    shutil.rmtree(path, ignore_errors=True)
            elif (not entry.name.startswith(".") and indexed.get(entry.name) != "done"
                  and (path / "meta.json").is_file()):
                self._settle(path, indexed.get(entry.name))

    def rebuild_index(self, reason=None) -> Optional[Path]:
        """Index every run folder afresh (the folders are the truth). A damaged index is kept aside, renamed
        `index.sqlite.damaged-<time>`, and said so on stderr; returns where it went (None: there was none)."""
        index, aside = self.root / INDEX, None
        if index.exists():
            aside = index.with_name(f"{INDEX}.damaged-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{index}{suffix}").exists():
                    os.replace(f"{index}{suffix}", f"{aside}{suffix}")
            print(f"fastcls: the index {index} " + (f"was damaged ({reason})" if reason else "is rebuilt") +
                  f"; the old one is kept as {aside} and a new index was built from the run folders.", file=sys.stderr)
        self._repaired = False
        self._repair()  # the new index has no rows, so every run folder is indexed
        return aside


    def _settle(self, path: Path, indexed_status: Optional[str]):
        """Make the index agree with a run folder that is not indexed as 'done'."""
        meta = read_json(path / "meta.json")
        if meta is None:
            return
        status = meta.get("status", "done")
        if status == "running":
            fd = try_lock(path)
            if fd is None:  # a live process still writes this run: it will index it itself
                return
            try:
                remove_stray_files(path)
                meta.update(status="interrupted", note="the process writing this run stopped without saving "
                                                       "(killed or crashed); resume it from its last checkpoint")
                write_json(path / "meta.json", meta)
                self._index(path)
            finally:
                unlock(fd)
        elif status != indexed_status:
            self._index(path)
            if status == "done":
                (path / CHECKPOINT).unlink(missing_ok=True)
                (path / LOCK).unlink(missing_ok=True)

    # -- write ------------------------------------------------------------------------------------------------
    def _create(self, fill) -> tuple:
        """A new run folder: `fill(tmp_folder, run_id)` writes its files, then one rename puts it in place.

        Ids are time + 6 random hex digits; should two writers still draw the same id, the second rename fails
        (the folder exists and is not empty) and that writer draws a new id.
        """
        for _ in range(8):
            rid = new_run_id()
            tmp = self.root / f".tmp-{rid}-{os.getpid()}"
            try:
                tmp.mkdir()
            except FileExistsError:
                continue
            lock = None
            try:
                lock = new_lock(tmp)
                fill(tmp, rid)
                fault("create-tmp")
                try:
                    os.rename(tmp, self.root / rid)
                except OSError:
                    if not (self.root / rid).exists():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)  # id collision: draw another
                    unlock(lock)
                    continue
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                unlock(lock)
                raise
            fault("create-renamed")
            return rid, lock
        raise FastclsError(f"Could not allocate a new run id in {self.root} after 8 tries; is the clock stuck?")

    def _meta(self, rid: str, run_name: Optional[str], kind: str, status: str, config: dict, seconds=0.0,
              sweep=None, parent=None, extra=None) -> dict:
        name = run_name or f"{config.get('recipe', 'run')}-{config.get('arch', kind)}-{rid[-6:]}"
        return {"id": rid, "name": name, "kind": kind, "status": status,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": seconds,
                "sweep": sweep, "parent": parent, "writer": {"host": socket.gethostname(), "pid": os.getpid()},
                **environment_info(), **(extra or {})}

    def save(self, run: RunData) -> str:
        """Write a finished `run` atomically and index it; returns the new run id."""
        _check_run(run)

        def fill(tmp, rid):
            facts = write_run_files(tmp, run)
            write_json(tmp / "meta.json", self._meta(rid, run.name, run.kind, "done", run.config, run.seconds,
                                                      run.sweep, run.parent, {**run.extra, **facts}))
        return self._commit(fill)

    def _commit(self, fill) -> str:
        """Create a finished run folder through `fill(tmp_folder, run_id)` (see `_create`), then index it."""
        self.check_writable()
        self._repair()
        rid, lock = self._create(fill)
        try:
            self._index(self.root / rid)
        finally:
            (self.root / rid / LOCK).unlink(missing_ok=True)
            unlock(lock)
        [hook(self, rid) for hook in list(AFTER_STORE)]
        return rid

    def import_run(self, files: dict) -> str:
        """Store a finished run made in another store (a cluster worker's private one), from its folder's files.

        Args:
            files: file name -> bytes, as `run_files` returns them; every file lands atomically in a new run folder
                here, under a new id (meta.json keeps the worker's id as `imported_from`), and is then indexed.

        Returns:
            The run's id in this store.
        """
        meta = json.loads(files.get("meta.json") or b"null")
        needed = ("config.json", "metrics.json", "vocab.json", "valid_probs.npy", "valid_targets.npy", "valid_ids.json")
        missing = [n for n in needed if n not in files]
        if not isinstance(meta, dict) or meta.get("status") != "done" or missing:
            raise FastclsError("The run to import is not a finished run (it needs a meta.json with status 'done'"
                               + (f", and lacks {', '.join(missing)}" if missing else "") + "); nothing was stored.")
        bad = [repr(n) for n in files if not n or n != Path(n).name or n.startswith(".") or n in (CHECKPOINT, LOCK)]
        if bad:
            raise FastclsError(f"The run to import has files that a run folder never holds: {', '.join(bad)}; "
                               "nothing was stored.")

        def fill(tmp, rid):
            for name, data in files.items():
                if name != "meta.json":
                    write_atomic(tmp / name, lambda p, data=data: p.write_bytes(data))
            write_json(tmp / "meta.json", {**meta, "id": rid, "imported_from": meta.get("id")})
        return self._commit(fill)

    def run_files(self, rid: str) -> dict:
        """The files of the finished run `rid` (name -> bytes), for `import_run` into another store."""
        path = self._dir(rid)
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.name != CHECKPOINT}

    def begin(self, config: dict, name: Optional[str] = None, kind: str = "train", sweep: Optional[str] = None,
              parent: Optional[str] = None) -> str:
        """Start a run before training: its folder (config, meta) and an index row with status 'running'.

        The folder stays locked by this process until `finish` or `set_status`; a process that dies leaves the
        lock free, so the next store user marks the run 'interrupted'.
        """
        self.check_writable()
        self._repair()

        def fill(tmp, rid):
            write_json(tmp / "config.json", config)
            write_json(tmp / "meta.json", self._meta(rid, name, kind, "running", config, sweep=sweep, parent=parent))
        rid, lock = self._create(fill)
        self._locks[rid] = lock
        self._index(self.root / rid)
        return rid

    def claim(self, rid: str):
        """Take over an interrupted or failed run to continue it (`fastcls resume`); refuses a run in progress."""
        path = self._dir(rid)
        for _ in range(20):  # another process's repair may hold the lock for a moment
            fd = try_lock(path)
            if fd is not None:
                break
            time.sleep(0.1)
        else:
            raise FastclsError(f"Run {rid} in {self.root} is being written by another process right now; wait for it "
                               "to finish (see `fastcls runs`).")
        meta = read_json(path / "meta.json") or {}
        if meta.get("status") in ("done", "broken"):
            unlock(fd)
            raise FastclsError(f"Run {rid} is {meta.get('status')}; nothing to resume.")
        self._locks[rid] = fd
        self.set_status(rid, "running", writer={"host": socket.gethostname(), "pid": os.getpid()}, note=None)

    def set_status(self, rid: str, status: str, **info):
        """Change a run's status (meta.json first, then the index row); `info` is merged into its meta.json."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        path = self._dir(rid)
        meta = read_json(path / "meta.json") or {}
        meta.update(info, status=status)
        write_json(path / "meta.json", meta)
        self._index(path)
        if status != "running":
            self.release(rid)

    def release(self, rid: str):
        """Give up this process's lock on run `rid` (others may then resume or repair it)."""
        unlock(self._locks.pop(rid, None))

    def finish(self, rid: str, run: RunData) -> str:
        """Store the results of a run started with `begin`: every file atomically, then status 'done', then the row."""
        _check_run(run)
        path = self._dir(rid)
        meta = read_json(path / "meta.json") or {}
        facts = write_run_files(path, run)
        fault("finish-files")
        meta.update(status="done", seconds=run.seconds, note=None, **environment_info(), **run.extra, **facts)
        write_json(path / "meta.json", meta)
        fault("finish-meta")
        self._index(path)
        (path / CHECKPOINT).unlink(missing_ok=True)
        (path / LOCK).unlink(missing_ok=True)
        self.release(rid)
        [hook(self, rid) for hook in list(AFTER_STORE)]
        return rid

    # -- paths and status of one run (training asks the store; it never builds them itself) ---------------------
    def run_dir(self, rid: str) -> Path:
        """The folder of run `rid`."""
        return self._dir(rid)

    def checkpoint_path(self, rid: str) -> Path:
        """Where run `rid` keeps its resumable training state while it is not done."""
        return self._dir(rid) / CHECKPOINT

    def cache_dir(self, kind: str) -> Path:
        """The store's cache folder for `kind` (e.g. 'features': the sweeps' and probes' cached body features)."""
        return self.root / "cache" / kind

    def is_done(self, rid: str) -> bool:
        """Whether run `rid`'s own meta.json (the truth, ahead of the index row) says it is done."""
        return (read_json(self._dir(rid) / "meta.json") or {}).get("status") == "done"

    # -- read -------------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> dict:
        """The index row of the run `ref` names: an id, a unique id prefix, or a run name."""
        ref = str(ref)
        rows = self._rows("WHERE id = ?", (ref,)) or self._rows("WHERE name = ?", (ref,)) \
            or self._rows("WHERE id LIKE ?", (ref.replace("%", "") + "%",))
        if len(rows) == 1:
            return rows[0]
        if not rows:
            raise FastclsError(f"No run {ref!r} in {self.root}. List the runs with `fastcls runs` "
                               f"(add --runs-dir if they are stored elsewhere).")
        raise FastclsError(f"{ref!r} matches {len(rows)} runs in {self.root}: {', '.join(r['id'] for r in rows[:8])}. "
                           "Use a longer id prefix or the full id.")

    def load(self, ref: str, any_status: bool = False) -> StoredRun:
        """The run `ref` names (id, unique id prefix or name); only a finished run unless `any_status`."""
        row = self.resolve(ref)
        path = self._dir(row["id"])
        if not path.is_dir():
            raise FastclsError(f"Run {row['id']} is in the index of {self.root} but its folder {path} is missing.")
        if row["status"] == "broken":
            raise FastclsError(f"Run {row['id']} in {self.root} is broken (damaged or tampered files); it is not read. "
                               f"`fastcls doctor --runs-dir {self.root}` says what is wrong; train it again.")
        if not any_status and row["status"] != "done":
            raise FastclsError(f"Run {row['id']} is {row['status']}: it has no predictions yet. "
                               + (f"Continue it with `fastcls resume {row['id']}`." if row["status"] != "running"
                                  else "Wait for it to finish."))
        return StoredRun(path, row)

    def find(self, name: str, status: str = "done") -> Optional[str]:
        """The id of the newest run named `name` with `status`, or None (no error: for "is it stored yet?")."""
        rows = self._rows("WHERE name = ? AND status = ?", (name, status))
        return rows[0]["id"] if rows else None

    def leaderboard(self, recipe: Optional[str] = None, sort: str = "metric", kind: Optional[str] = None,
                    sweep: Optional[str] = None, status: Optional[str] = "done") -> pd.DataFrame:
        """One row per run (newest first, or best metric first with `sort='metric'`), optionally of one sweep;
        finished runs only unless `status` names another status (None: every status)."""
        conds, args = [], []
        for col, val in (("recipe", recipe), ("kind", kind), ("sweep", sweep), ("status", status)):
            if val is not None:
                conds.append(f"{col} = ?")
                args.append(val)
        rows = self._rows(("WHERE " + " AND ".join(conds)) if conds else "", args)
        df = pd.DataFrame(rows, columns=list(_COLUMNS)).drop(columns=["config"])
        if sort == "metric" and len(df):
            sign = df["metric_name"].map(_metric_sign)  # best first: highest accuracy, lowest log loss
            df = df.assign(_key=df["metric"] * sign).sort_values(["_key", "created"], ascending=[False, False],
                                                                 na_position="last", kind="stable")
            df = df.drop(columns="_key")
        return df.reset_index(drop=True)


def _metric_sign(name) -> float:
    """+1 for a higher-is-better metric (or an unknown name), -1 for a lower-is-better one."""
    try:
        return 1.0 if get_metric(str(name)).higher_is_better else -1.0
    except FastclsError:
        return 1.0


def _row_from_folder(path: Path) -> dict:
    """The index row of a run folder, from its config.json, meta.json and (when done) metrics.json."""
    cfg = read_json(path / "config.json") or {}
    meta = read_json(path / "meta.json") or {}
    metrics = read_json(path / "metrics.json") or {}
    mname = metrics.get("metric_name")
    status = meta.get("status", "done")
    if meta.get("id", path.name) != path.name or status not in STATUSES:  # a run's id is its folder's name
        status = "broken"
    return {"id": path.name, "name": meta.get("name"), "kind": meta.get("kind", "train"), "status": status,
            "recipe": cfg.get("recipe"), "arch": cfg.get("arch"),
            "size": cfg.get("size"), "ps": cfg.get("ps"), "metric_name": mname,
            "metric": metrics.get(mname) if mname else None, "valid_loss": metrics.get("valid_loss"),
            "seconds": round(float(meta.get("seconds") or 0), 2), "created": meta.get("created"),
            "sweep": meta.get("sweep"), "parent": meta.get("parent"),
            "config": json.dumps(cfg, default=json_default)}


def _index_damaged(e: sqlite3.DatabaseError) -> bool:
    """Whether `e` says the index file is damaged (not merely locked or unopenable)."""
    return not isinstance(e, sqlite3.OperationalError) or any(
        s in str(e) for s in ("no such table", "no such column", "malformed", "quick_check"))


def _plain_id(rid) -> bool:
    """Whether `rid` could name a folder of the store at all (a folder linked out of it is refused when loaded)."""
    return isinstance(rid, str) and rid not in ("", ".", "..") and Path(rid).name == rid and "\\" not in rid


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


