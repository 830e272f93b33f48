"""Writing a run folder's files (checked first), and reading them back checked: present, parseable, of the right
type and shape, inside the folder.

A run store is copied, shared and downloaded, so its files may be damaged (a zero-byte `.npy`, a truncated JSON)
or tampered with (a symlink out of the folder, an array of the wrong shape). Each reader here ends such a file in
one FastclsError naming it and what to do (`fastcls doctor`), never in a traceback deeper down.
"""

__all__ = ["check_run", "write_run_files", "DamagedRunFile", "damaged", "read_run_json", "read_run_npy",
           "read_run_csv", "check_safetensors", "checked_weights"]

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from .errors import FastclsError
from .files import file_sha256, inside, write_atomic, write_json, write_npy

_JSON_TYPES = {dict: "a JSON object", list: "a JSON list"}


class DamagedRunFile(FastclsError):
    """A run file that cannot be used: `path`, and `what` is wrong with it."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what
        super().__init__(f"{self.path} {what}, so run {self.path.parent.name} cannot be read; nothing was changed. "
                         f"`fastcls doctor --runs-dir {self.path.parent.parent}` lists every damaged run (`--fix` "
                         "marks them broken); train that run again or restore its folder from a copy.")


def damaged(path: Path, what: str) -> DamagedRunFile:
    """The error for a run file that cannot be used: which file, what is wrong, how to find and fix the rest."""
    return DamagedRunFile(path, what)


def _file(folder: Path, name: str, required: bool) -> Optional[Path]:
    try:
        path = inside(folder, name, what="file")
    except FastclsError:
        raise damaged(folder / name, f"leads outside its run folder (to {os.path.realpath(folder / name)}); it "
                                     "was not read") from None
    if not path.exists():
        if required:
            raise damaged(path, "is missing")
        return None
    if not path.is_file():
        raise damaged(path, "is not a file")
    return path


def read_run_json(folder: Path, name: str, kind: type, required: bool = True):
    """The JSON document `folder/name`, which must be a `kind` (dict or list); None when absent and not required."""
    path = _file(folder, name, required)
    if path is None:
        return None
    try:
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise damaged(path, f"is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(obj, kind):
        raise damaged(path, f"holds {type(obj).__name__}, not {_JSON_TYPES.get(kind, kind.__name__)}")
    return obj


def read_run_npy(folder: Path, name: str, ndims: tuple, kinds: str, required: bool = True,
                 shape: Optional[dict] = None) -> Optional[np.ndarray]:
    """The array `folder/name` memory-mapped (never unpickled): `ndims` dimensions, dtype kind in `kinds`, and
    `shape[axis] == n` for each given axis; None when absent and not required."""
    path = _file(folder, name, required)
    if path is None:
        return None
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise damaged(path, f"is not a plain numeric array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim not in ndims or arr.dtype.kind not in kinds:
        raise damaged(path, f"holds an array of shape {getattr(arr, 'shape', '?')} and dtype "
                            f"{getattr(arr, 'dtype', '?')}, not the {ndims[0]}-d "
                            f"{'float' if kinds == 'f' else 'integer'} array a run stores")
    for axis, n in (shape or {}).items():
        if arr.shape[axis] != n:
            raise damaged(path, f"has {arr.shape[axis]} entries along axis {axis} (shape {arr.shape}), but the run's "
                                f"other files say {n}")
    return arr


def read_run_csv(folder: Path, name: str) -> Optional[pd.DataFrame]:
    """The table `folder/name`, or None when absent."""
    path = _file(folder, name, required=False)
    if path is None:
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:  # pandas' ParserError / EmptyDataError are ValueErrors
        raise damaged(path, f"is not a readable CSV table ({type(e).__name__}: {e})") from None


def check_safetensors(folder: Path, name: str) -> None:
    """Raise when the safetensors file `folder/name` (if present) has no readable header (a cheap check)."""
    path = _file(folder, name, required=False)
    if path is None:
        return
    from safetensors import safe_open
    try:
        with safe_open(str(path), "np") as f:
            keys = list(f.keys())
        size = path.stat().st_size
    except Exception as e:  # noqa: BLE001  (safetensors raises its own SafetensorError and OSErrors)
        raise damaged(path, f"is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if not keys or size < 16:
        raise damaged(path, "holds no tensors")


def checked_weights(folder: Path, sha256: Optional[str], name: str = "model.safetensors") -> Path:
    """The path of a run's weights file, checked: inside the folder, a readable safetensors file, and (when
    meta.json recorded one) of the SHA-256 the run was stored with."""
    path = _file(folder, name, required=False)
    if path is None:
        raise damaged(folder / name, "is missing: the run has no weights file to predict new images with")
    check_safetensors(folder, name)
    if sha256 and file_sha256(path) != sha256:
        raise damaged(path, "does not match the checksum meta.json recorded when the run was stored (it was altered "
                            "or damaged)")
    return path


def check_run(run):
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
        raise FastclsError(f"{where}: {len(run.valid_targets)} valid targets for "
                           f"{np.asarray(run.valid_probs).shape[1]} rows.")


def write_run_files(folder: Path, run) -> dict:
    """Every file of a finished run except meta.json, each written atomically; returns facts for meta.json: the
    weights file's SHA-256, which `fastcls predict` and `fastcls export` verify, and the run's TTA blend `tta_beta`
    (from its metrics), which predicting reads there so that a damaged metrics.json does not stop a submission."""
    facts = {"tta_beta": run.metrics["tta_beta"]} if "tta_beta" in (run.metrics or {}) else {}
    for fname, obj in (("config.json", run.config), ("metrics.json", run.metrics), ("vocab.json", list(run.vocab)),
                       ("valid_ids.json", [str(i) for i in run.valid_ids])):
        write_json(folder / fname, obj)
    write_npy(folder / "valid_probs.npy", np.ascontiguousarray(run.valid_probs, dtype=np.float32))
    write_npy(folder / "valid_targets.npy", np.asarray(run.valid_targets, dtype=np.int64))
    if run.test_probs is not None:
        write_npy(folder / "test_probs.npy", np.ascontiguousarray(run.test_probs, dtype=np.float32))
        write_json(folder / "test_ids.json", [str(i) for i in run.test_ids])
    if run.history is not None:
        write_atomic(folder / "history.csv", lambda p: run.history.to_csv(p, index=False))
    if run.weights is not None:
        from safetensors.torch import save_file
        tensors = {k: v.detach().cpu().contiguous() for k, v in run.weights.items()}
        write_atomic(folder / "model.safetensors", lambda p: save_file(tensors, str(p)))
        facts["weights_sha256"] = file_sha256(folder / "model.safetensors")
    return facts
