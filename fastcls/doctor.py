"""`fastcls doctor`: check a run store (index vs folders, every file present and loadable, ids confined) and, with
`fix`, rebuild the index and mark damaged runs 'broken'. Nothing is ever deleted: a damaged index or meta.json is
kept aside under a `.damaged-<time>` name."""

__all__ = ["Problem", "Diagnosis", "diagnose"]

import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from .errors import FastclsError
from .files import read_json, write_json
from .runfiles import DamagedRunFile, check_safetensors
from .runs import CHECKPOINT, INDEX, RunStore, StoredRun

# what a run's files must give when read back; each property checks its file (fastcls.runfiles)
_READS = ("meta", "config", "vocab", "metrics", "valid_ids", "valid_probs", "valid_targets", "test_ids", "test_probs",
          "history")


@dataclass
class Problem:
    """One thing wrong: which run ('' for the store itself), which file of it ('' for the folder), what."""

    run: str
    path: str
    problem: str


@dataclass
class Diagnosis:
    """What `diagnose` found (`problems`) and, with fix=True, what it did (`fixed`)."""

    root: Path
    runs: int
    problems: list = field(default_factory=list)
    fixed: list = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([vars(p) for p in self.problems], columns=["run", "path", "problem"])

    def summary(self) -> str:
        return f"{self.runs} run folder(s), {len(self.problems)} problem(s)" + (
            ": the store is sound." if not self.problems else " (listed above).")


def _index_rows(root: Path):
    """(rows by id, error or None) of the index, read-only."""
    path = root / INDEX
    if not path.exists():
        return {}, None
    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as con:
            if con.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                return {}, "fails SQLite's integrity check"
            return {r[0]: r[1] for r in con.execute("SELECT id, status FROM runs")}, None
    except sqlite3.DatabaseError as e:
        return {}, str(e)


def _run_problems(path: Path) -> list:
    """The problems of one run folder, reading each file the way the commands do."""
    if path.is_symlink() or path.resolve().parent != path.parent.resolve():
        return [Problem(path.name, "", f"is a link to {os.path.realpath(path)}, outside the store")]
    meta = read_json(path / "meta.json")
    if isinstance(meta, dict) and meta.get("id", path.name) != path.name:
        return [Problem(path.name, "meta.json", f"names the run {meta.get('id')!r}, not its folder "
                        f"{path.name!r}")]
    status = meta.get("status") if isinstance(meta, dict) else None
    if status == "broken":
        return [Problem(path.name, "meta.json", f"marks the run broken: {meta.get('note')}")]
    run = StoredRun(path, {"id": path.name, "name": None, "kind": None, "status": status})
    reads = _READS if status == "done" else ("meta", "config")  # a run in progress has no predictions yet
    out = []
    for attr in reads:
        try:
            getattr(run, attr)
        except DamagedRunFile as e:
            out.append(Problem(path.name, e.path.name, e.what))
    for name in ("model.safetensors", CHECKPOINT):
        try:
            check_safetensors(path, name)
        except DamagedRunFile as e:
            out.append(Problem(path.name, e.path.name, e.what))
    return out


def diagnose(root, fix: bool = False) -> Diagnosis:
    """Check the run store at `root`; with `fix`, rebuild its index from the folders (the damaged index kept aside)
    and mark each damaged run 'broken' in its meta.json (a damaged meta.json kept aside). Deletes nothing.

    Returns:
        A `Diagnosis`: one `Problem` per thing wrong (run id, file, what), and what was fixed.
    """
    root = Path(root)
    if not root.is_dir():
        raise FastclsError(f"No run store at {root}: it is not a folder. Pass the store with --runs-dir.")
    folders = sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.name not in ("cache", "sweeps")
                     and (p.is_dir() or p.is_symlink()) and not p.name.startswith(INDEX))
    folders = [p for p in folders if (p / "meta.json").exists() or (p / "config.json").exists() or p.is_symlink()]
    d = Diagnosis(root, len(folders))
    rows, index_error = _index_rows(root)
    if index_error:
        d.problems.append(Problem("", INDEX, f"is damaged ({index_error})"))
    names = {p.name for p in folders}
    for rid in rows:
        if rid not in names:
            d.problems.append(Problem(rid, INDEX, f"lists run {rid!r}, which has no folder in the store"))
    broken = {}
    for path in folders:
        probs = _run_problems(path)
        d.problems += probs
        if probs:
            broken[path.name] = probs
        elif rows and path.name not in rows:
            d.problems.append(Problem(path.name, "", "is not in the index"))
    if not fix or not d.problems:
        return d
    if not RunStore(root).writable():
        raise FastclsError(f"{root} is read-only, so `--fix` cannot repair it. Copy it somewhere writable "
                           f"(cp -r {root} COPY) and run `fastcls doctor --fix --runs-dir COPY`.")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    store = RunStore(root)
    rebuild = bool(index_error) or any(p.path == INDEX or p.problem == "is not in the index" for p in d.problems)
    for rid, probs in broken.items():
        path = root / rid
        meta = read_json(path / "meta.json")
        if path.is_symlink() or (isinstance(meta, dict) and meta.get("status") == "broken"):
            continue  # a link out of the store is never written through (a rebuilt index leaves it out)
        if not isinstance(meta, dict) or meta.get("id", rid) != rid:
            if (path / "meta.json").exists():
                os.replace(path / "meta.json", path / f"meta.json.damaged-{stamp}")
            write_json(path / "meta.json", {"id": rid, "name": None})
            rebuild = True
        note = "; ".join(f"{p.path or 'folder'} {p.problem}" for p in probs)
        if rebuild:  # the index is rebuilt below: only the folder's meta.json
            write_json(path / "meta.json", {**(read_json(path / "meta.json") or {}), "status": "broken",
                                            "status_before": (meta or {}).get("status"), "note": note})
        else:
            store.set_status(rid, "broken", status_before=(meta or {}).get("status"), note=note)
        d.fixed.append(f"marked run {rid} broken")
    if rebuild:
        aside = store.rebuild_index(index_error)
        d.fixed.append(f"rebuilt the index from {d.runs} run folder(s)" + (f"; the old one is kept as {aside}"
                                                                           if aside else ""))
    return d
