"""The run store: one folder per run under `runs/` plus one SQLite index row per run.

A run folder is written under a temporary name and renamed into place in one step, and its index row is
written last, so a crash never leaves a half run: either the folder and the row exist, or neither is listed.
Arrays are plain `.npy` files (memory-mappable, no pickle); weights are safetensors.
"""

__all__ = ["RunData", "StoredRun", "RunStore", "new_run_id", "environment_info"]

import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from .errors import FastclsError

INDEX = "index.sqlite"
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
    """A run read back from the store; arrays are memory-mapped on first access."""

    def __init__(self, path: Path, row: dict):
        self.path, self.row = Path(path), row
        self.id, self.name, self.kind = row["id"], row["name"], row["kind"]

    def _json(self, name):
        return json.loads((self.path / name).read_text())

    def _npy(self, name):
        p = self.path / name
        return np.load(p, mmap_mode="r", allow_pickle=False) if p.exists() else None

    @cached_property
    def config(self) -> dict:
        return self._json("config.json")

    @cached_property
    def metrics(self) -> dict:
        return self._json("metrics.json")

    @cached_property
    def vocab(self) -> list:
        return self._json("vocab.json")

    @cached_property
    def meta(self) -> dict:
        return self._json("meta.json")

    @cached_property
    def valid_probs(self) -> np.ndarray:
        return self._npy("valid_probs.npy")

    @cached_property
    def valid_targets(self) -> np.ndarray:
        return self._npy("valid_targets.npy")

    @cached_property
    def valid_ids(self) -> list:
        return self._json("valid_ids.json")

    @cached_property
    def test_probs(self) -> Optional[np.ndarray]:
        return self._npy("test_probs.npy")

    @cached_property
    def test_ids(self) -> Optional[list]:
        p = self.path / "test_ids.json"
        return json.loads(p.read_text()) if p.exists() else None

    @cached_property
    def history(self) -> Optional[pd.DataFrame]:
        p = self.path / "history.csv"
        return pd.read_csv(p) if p.exists() else None

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    def __repr__(self):
        return f"StoredRun({self.id!r}, name={self.name!r}, kind={self.kind!r})"


class RunStore:
    """The runs folder: `save` a `RunData`, `load` a run by id, id prefix or name, `leaderboard` as a DataFrame."""

    def __init__(self, root="runs"):
        self.root = Path(root)

    # -- index ------------------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.root / INDEX, timeout=60)
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=60000")
        con.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(c + (' PRIMARY KEY' if c == 'id' else '') for c in _COLUMNS)})")
        return con

    def _rows(self, where: str = "", args=()) -> list[dict]:
        if not (self.root / INDEX).exists():
            return []
        with closing(self._connect()) as con:
            return [dict(r) for r in con.execute(f"SELECT * FROM runs {where} ORDER BY created DESC, id DESC", args)]

    def check_writable(self):
        """Fail before any training when the runs folder cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"x")
            probe.unlink()
        except OSError as e:
            raise FastclsError(f"The runs folder {self.root} cannot be written ({e.strerror or e}). "
                               "Pass a writable folder with --runs-dir.") from None

    # -- write ------------------------------------------------------------------------------------------------
    def save(self, run: RunData) -> str:
        """Write `run` atomically and index it; returns the new run id."""
        _check_run(run)
        self.check_writable()
        rid = new_run_id()
        name = run.name or f"{run.config.get('recipe', 'run')}-{run.config.get('arch', run.kind)}-{rid[-6:]}"
        tmp = self.root / f".tmp-{rid}"
        tmp.mkdir()
        try:
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            meta = {"id": rid, "name": name, "kind": run.kind, "created": created, "seconds": run.seconds,
                    "sweep": run.sweep, "parent": run.parent, **environment_info(), **run.extra}
            for fname, obj in (("config.json", run.config), ("metrics.json", run.metrics), ("vocab.json", list(run.vocab)),
                               ("valid_ids.json", [str(i) for i in run.valid_ids]), ("meta.json", meta)):
                (tmp / fname).write_text(json.dumps(obj, indent=1, default=_json_default))
            np.save(tmp / "valid_probs.npy", np.ascontiguousarray(run.valid_probs, dtype=np.float32))
            np.save(tmp / "valid_targets.npy", np.asarray(run.valid_targets, dtype=np.int64))
            if run.test_probs is not None:
                np.save(tmp / "test_probs.npy", np.ascontiguousarray(run.test_probs, dtype=np.float32))
                (tmp / "test_ids.json").write_text(json.dumps([str(i) for i in run.test_ids]))
            if run.history is not None:
                run.history.to_csv(tmp / "history.csv", index=False)
            if run.weights is not None:
                from safetensors.torch import save_file
                save_file({k: v.detach().cpu().contiguous() for k, v in run.weights.items()}, tmp / "model.safetensors")
            os.replace(tmp, self.root / rid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        cfg = run.config
        row = {"id": rid, "name": name, "kind": run.kind, "status": "done", "recipe": cfg.get("recipe"),
               "arch": cfg.get("arch"), "size": cfg.get("size"), "ps": cfg.get("ps"),
               "metric_name": run.metrics.get("metric_name"), "metric": run.metrics.get(run.metrics.get("metric_name")),
               "valid_loss": run.metrics.get("valid_loss"), "seconds": round(run.seconds, 2), "created": created,
               "sweep": run.sweep, "parent": run.parent, "config": json.dumps(cfg, default=_json_default)}
        with closing(self._connect()) as con, con:
            con.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                        [row[c] for c in _COLUMNS])
        return rid

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

    def load(self, ref: str) -> StoredRun:
        """The run `ref` names (id, unique id prefix or name)."""
        row = self.resolve(ref)
        path = self.root / row["id"]
        if not path.is_dir():
            raise FastclsError(f"Run {row['id']} is in the index of {self.root} but its folder {path} is missing.")
        return StoredRun(path, row)

    def leaderboard(self, recipe: Optional[str] = None, sort: str = "metric", kind: Optional[str] = None,
                    sweep: Optional[str] = None) -> pd.DataFrame:
        """One row per run (newest first, or best metric first with `sort='metric'`), optionally of one sweep."""
        conds, args = [], []
        for col, val in (("recipe", recipe), ("kind", kind), ("sweep", sweep)):
            if val is not None:
                conds.append(f"{col} = ?")
                args.append(val)
        rows = self._rows(("WHERE " + " AND ".join(conds)) if conds else "", args)
        df = pd.DataFrame(rows, columns=list(_COLUMNS)).drop(columns=["config"])
        if sort == "metric" and len(df):
            df = df.sort_values(["metric", "created"], ascending=[False, False], na_position="last", kind="stable")
        return df.reset_index(drop=True)


def _json_default(o: Any):
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


def _check_run(run: RunData):
    """Refuse arrays that would corrupt later ensembles: wrong shapes, NaN, rows that are not probabilities."""
    where = f"run {run.name or run.config.get('recipe', '')}".strip()
    for split, probs, ids in (("valid", run.valid_probs, run.valid_ids), ("test", run.test_probs, run.test_ids)):
        if probs is None:
            continue
        probs = np.asarray(probs)
        if probs.ndim != 3 or probs.shape[2] != len(run.vocab):
            raise FastclsError(f"{where}: {split} probabilities have shape {probs.shape}; expected (views, items, "
                               f"{len(run.vocab)} classes).")
        if ids is None or probs.shape[1] != len(ids):
            raise FastclsError(f"{where}: {split} probabilities have {probs.shape[1]} rows but "
                               f"{0 if ids is None else len(ids)} item ids.")
        if not np.isfinite(probs).all():
            raise FastclsError(f"{where}: {split} probabilities contain NaN or infinite values; nothing was stored.")
        sums = probs.sum(-1)
        if np.abs(sums - 1).max() > 1e-3:
            raise FastclsError(f"{where}: {split} probability rows do not sum to 1 (max error "
                               f"{np.abs(sums - 1).max():.3g}); nothing was stored.")
    if len(run.valid_targets) != np.asarray(run.valid_probs).shape[1]:
        raise FastclsError(f"{where}: {len(run.valid_targets)} valid targets for {np.asarray(run.valid_probs).shape[1]} rows.")
