"""A competition's submission CSV from test probabilities, in the exact format its recipe declares.

The recipe says which columns to write (`sub_id_col`, `sub_label_col`), how a test item's id is written
(`sub_id`: file stem, file name, or the item id as read), whether the label is the class name or its index in the
recipe's class order (`sub_label`), and optionally a template CSV (`sub_template`, relative to the data folder) whose
rows, row order and other columns the submission keeps, filling only the label column. The file is written to a
temporary name and renamed, so an interrupted write never leaves half a submission.

`sub_format` says what a row predicts: the argmax label, the top k labels space-separated (MAP@k), one probability
column per class (log loss) or one probability (binary AUC). Every submission written for a stored run is recorded
in the store's `submissions.json` with its sha256, so `record_lb` can attach the leaderboard scores to the run that
made the file.
"""

__all__ = ["write_submission", "submission_for_run", "submission_ids", "submission_frame", "neutralise",
           "record_submission", "record_lb", "submissions_table", "with_lb_scores", "SUBMISSIONS"]

import sys
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from .config import RunConfig
from .errors import FastclsError
from .recipe import Recipe
from .files import exclusive, file_sha256, read_json, write_atomic, write_json
from .runs import RunStore

SUBMISSIONS = "submissions.json"  # in the run store's root: one record per written submission

# a spreadsheet runs a cell starting with one of these as a formula (CSV injection)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def submission_ids(recipe: Recipe, ids) -> list[str]:
    """Test item ids as the submission writes them (`recipe.sub_id`: 'stem', 'name' or 'id')."""
    ids = [str(i) for i in ids]
    if recipe.sub_id == "stem":
        return [Path(i).stem for i in ids]
    if recipe.sub_id == "name":
        return [Path(i).name for i in ids]
    return ids


def neutralise(cell: str) -> str:
    """A label cell a spreadsheet will not run as a formula: a leading ', unless the cell is a plain number."""
    s = str(cell)
    if not s.startswith(_FORMULA_START):
        return s
    try:
        float(s)
        return s  # '-1' or '+2.5' is a number to a spreadsheet, not a formula
    except ValueError:
        return "'" + s


def _safe_ids(ids: list) -> list:
    """Test ids as cells a spreadsheet will not run (`neutralise`), with a warning naming the ones changed: a file
    named '=cmd|...' is written as "'=cmd|...", which a grader comparing file names will not match."""
    safe = [neutralise(i) for i in ids]
    changed = [i for i, s in zip(ids, safe) if i != s]
    if changed:
        shown = ", ".join(map(repr, changed[:5])) + (" ..." if len(changed) > 5 else "")
        print(f"fastcls: warning: {len(changed)} test id(s) start like a spreadsheet formula ({shown}): written with "
              "a leading ' so a spreadsheet shows them as text. A grader that compares ids will not match those rows: "
              "rename the files.", file=sys.stderr)
    return safe


def _labels(recipe: Recipe, probs: np.ndarray, vocab) -> list:
    vocab = [str(v) for v in vocab]
    names = [vocab[i] for i in np.asarray(probs).argmax(1)]
    if recipe.sub_label == "name":
        return [neutralise(n) for n in names]
    order = [str(c) for c in recipe.classes] if recipe.classes else vocab
    missing = sorted(set(names) - set(order))
    if missing:
        raise FastclsError(f"Recipe {recipe.name!r} writes class indices, but predicted class {missing[0]!r} is not in "
                           f"its classes ({', '.join(order)}). The run's vocab does not match the recipe.")
    pos = {c: i for i, c in enumerate(order)}
    return [pos[n] for n in names]


def _class_order(recipe: Recipe, vocab) -> list:
    """The recipe's class order when it declares one, else the vocab's."""
    return [str(c) for c in recipe.classes] if recipe.classes else [str(v) for v in vocab]


def _columns(recipe: Recipe, probs: np.ndarray, vocab) -> dict:
    """The predicted columns of the recipe's `sub_format`: {column name: values}."""
    fmt = recipe.sub_format
    if fmt == "label":
        return {recipe.sub_label_col: _labels(recipe, probs, vocab)}
    order, vocab = _class_order(recipe, vocab), [str(v) for v in vocab]
    if sorted(order) != sorted(vocab):
        raise FastclsError(f"Recipe {recipe.name!r} declares classes {', '.join(order)}, but the run's are "
                           f"{', '.join(vocab)}. The run's vocab does not match the recipe.")
    cols = np.array([vocab.index(c) for c in order])  # probability columns in the recipe's class order
    p = np.asarray(probs, dtype=np.float64)[:, cols]
    if fmt == "probs":
        return {c: p[:, i] for i, c in enumerate(order)}
    if fmt == "binary":
        if len(order) != 2:
            raise FastclsError(f"Recipe {recipe.name!r} writes one probability (sub_format='binary'), but has "
                               f"{len(order)} classes. Use sub_format='probs' for more than two.")
        return {recipe.sub_label_col: p[:, 1]}
    k = min(recipe.sub_k, len(order))
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]  # equal probabilities: the lower class first
    names = np.array(order, dtype=object) if recipe.sub_label == "name" else np.arange(len(order)).astype(str)
    return {recipe.sub_label_col: [neutralise(" ".join(r)) for r in names[top]]}


def submission_frame(recipe: Recipe, test_ids, probs, vocab, data=None) -> pd.DataFrame:
    """The submission as a DataFrame (see `write_submission`); nothing is written."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != len(vocab):
        raise FastclsError(f"Submission for recipe {recipe.name!r}: probabilities have shape {probs.shape}; expected "
                           f"(test items, {len(vocab)} classes).")
    ids = submission_ids(recipe, test_ids)
    if len(ids) != len(probs):
        raise FastclsError(f"Submission for recipe {recipe.name!r}: {len(ids)} test ids for {len(probs)} rows of "
                           "probabilities.")
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise FastclsError(f"Submission for recipe {recipe.name!r}: test id {dup!r} occurs twice once written as "
                           f"'{recipe.sub_id}'. Use sub_id='id' in the recipe.")
    columns = {neutralise(c): v for c, v in _columns(recipe, probs, vocab).items()}  # class names head 'probs'
    if not recipe.sub_template:
        return pd.DataFrame({recipe.sub_id_col: _safe_ids(ids), **columns})
    if data is None:
        raise FastclsError(f"Recipe {recipe.name!r} fills the template {recipe.sub_template}, which lives in the data "
                           "folder: pass the data folder (--data PATH).")
    template = Path(data) / recipe.sub_template
    if not template.is_file():
        raise FastclsError(f"Submission template {template} does not exist (recipe {recipe.name!r}). Pass the data "
                           "folder that holds it with --data PATH.")
    df = pd.read_csv(template, dtype=str, keep_default_na=False)
    if recipe.sub_id_col not in df:
        raise FastclsError(f"Submission template {template} has no column {recipe.sub_id_col!r} (it has "
                           f"{', '.join(map(repr, df.columns))}).")
    pred = {i: n for n, i in enumerate(ids)}
    missing = [i for i in df[recipe.sub_id_col] if i not in pred]
    extra = sorted(set(ids) - set(df[recipe.sub_id_col]))
    if missing or extra:
        what = (f"{len(missing)} template row(s) have no prediction (e.g. {missing[0]!r})" if missing else "") + \
            ("; " if missing and extra else "") + \
            (f"{len(extra)} predicted id(s) are not in the template (e.g. {extra[0]!r})" if extra else "")
        raise FastclsError(f"Submission for recipe {recipe.name!r} does not match the template {template}: {what}. "
                           "The run's test set must be the template's test set.")
    rows = [pred[i] for i in df[recipe.sub_id_col]]
    for col, values in columns.items():
        df[col] = np.asarray(values, dtype=object if isinstance(values, list) else None)[rows]
    return df


def write_submission(recipe: Recipe, test_ids, probs, vocab, path, data=None) -> pd.DataFrame:
    """Write the recipe's submission CSV for test probabilities, atomically.

    Args:
        recipe: the competition's recipe (its `sub_*` settings and `classes`).
        test_ids: the test item ids in row order (as stored with a run).
        probs: test probabilities, (items, classes), columns in `vocab` order (e.g. a TTA blend).
        vocab: the class names of the probability columns.
        path: the CSV file to write (its folder is created).
        data: the data folder, needed when the recipe fills a template (`sub_template`).

    Returns:
        The written table.
    """
    df = submission_frame(recipe, test_ids, probs, vocab, data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda p: df.to_csv(p, index=False))
    return df


def submission_for_run(run, path, beta: Union[float, str, None] = "run", data=None, recipe_dirs=(),
                       record: bool = True) -> pd.DataFrame:
    """Write the submission of a stored run's test probabilities.

    Args:
        run: a `StoredRun` (`RunStore.load`).
        path: the CSV to write.
        beta: TTA blend weight of the plain view (`predict.tta_blend`); "run": the run's own (chosen on valid, see
            `predict.run_tta_beta`); None: the plain view only.
        data: the data folder with the recipe's template (default: the run's data folder, else the recipe's).
        recipe_dirs: extra recipe folders, to find the run's recipe by name.
        record: record the file (sha256, run, local score) in the store's `submissions.json` (see `record_lb`).

    Returns:
        The written table.
    """
    from .predict import run_tta_beta, tta_blend
    probs = run.test_probs
    if probs is None or run.test_ids is None:
        raise FastclsError(f"Run {run.id} has no test probabilities (its data had no test set), so there is nothing to "
                           "submit. Train it on a data folder with the recipe's test images.")
    beta = run_tta_beta(run.meta) if beta == "run" else beta
    if beta is not None and not 0 <= beta <= 1:
        raise FastclsError(f"--tta-beta must be in [0, 1], got {beta}.")
    # the recipe file may be gone or renamed: the run's config still has every submission setting
    cfg = RunConfig.from_dict(run.config, recipe_dirs, lenient=True)
    recipe = cfg.recipe
    data = data or cfg.data or (recipe.data if recipe.data not in (None, "builtin") else None)
    blended = np.asarray(probs[0]) if beta is None else tta_blend(np.asarray(probs), beta)
    df = write_submission(recipe, run.test_ids, blended, run.vocab, path, data=data)
    if record and RunStore(run.path.parent).writable():  # a read-only store: the file is written, not recorded
        held = None if len(probs) == 1 else beta  # the blend the file holds: a single view is the plain view
        try:
            name = run.metrics.get("metric_name")
            local = _local_score(run, name, held)
        except FastclsError:  # a damaged metrics.json: the submission stands, its record lacks the local score
            name = local = None
        record_submission(run.path.parent, run.id, path, name, local, held)
    return df


def _local_score(run, name: Optional[str], beta: Optional[float]) -> Optional[float]:
    """The run's valid score of what the submission holds: the plain view's (beta None), the TTA blend's at the run's
    own beta (its `_tta` metric), or another beta's, scored on the stored valid views."""
    from .metrics import get_metric
    from .predict import run_tta_beta, tta_blend
    if name is None or beta is None:
        return None if name is None else run.metrics.get(name)
    if beta == run_tta_beta(run.meta) and f"{name}_tta" in run.metrics:
        return run.metrics[f"{name}_tta"]
    if run.valid_probs is None or run.valid_targets is None:
        return None
    return float(get_metric(name)(np.asarray(run.valid_targets), tta_blend(np.asarray(run.valid_probs), beta)))


# -- leaderboard bookkeeping ---------------------------------------------------------------------------------------

def _update(store_root, change):
    """Apply `change(records) -> result` to the store's submission records under its lock; returns the result."""
    root = Path(store_root)
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / (SUBMISSIONS + ".lock")):
        records = read_json(root / SUBMISSIONS) or []
        result = change(records)
        write_json(root / SUBMISSIONS, records)
    return result


def record_submission(store_root, run_id: str, path, metric_name: Optional[str] = None,
                      local: Optional[float] = None, tta_beta: Optional[float] = None) -> dict:
    """Record a written submission file: its sha256, path, run, the run's local (valid) score of what the file holds
    and its TTA blend (None: the plain view); returns the record."""
    rec = {"sha256": file_sha256(path), "file": str(Path(path).resolve()), "run": run_id, "metric_name": metric_name,
           "local": None if local is None else float(local), "tta_beta": tta_beta, "public": None, "private": None,
           "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    return _update(store_root, lambda records: records.append(rec) or rec)


def record_lb(store, target: str, public: Optional[float] = None, private: Optional[float] = None) -> dict:
    """Attach leaderboard scores to a recorded submission.

    Args:
        store: the `RunStore` the submission was written from.
        target: a submission file (found by its sha256, so a renamed or copied file still matches) or a run
            (id, prefix or name: its newest recorded submission).
        public, private: the leaderboard scores (at least one).

    Returns:
        The updated record.

    Raises:
        FastclsError: no score given; a file that no recorded submission matches; a run without submissions.
    """
    if public is None and private is None:
        raise FastclsError("Give a leaderboard score: --public SCORE and/or --private SCORE.")
    if Path(target).is_file():
        key, what = "sha256", file_sha256(target)
        where = (f"No recorded submission has the contents of {target} (sha256 {what[:12]}...). Only files that "
                 "`fastcls submit` or `fastcls ensemble --submission` wrote from this store are recorded; check "
                 f"--runs-dir ({store.root}) or that the file was not edited after it was written.")
    else:
        try:
            key, what = "run", store.resolve(target)["id"]
        except FastclsError:
            raise FastclsError(f"{target!r} is neither a submission file nor a run in {store.root}. Pass the CSV "
                               "that `fastcls submit` wrote, or the run's id or name.") from None
        where = f"Run {what} has no recorded submission. Write one first: fastcls submit {what} --out FILE."

    def change(records):
        hits = [r for r in records if r[key] == what]
        if not hits:
            raise FastclsError(where)
        rec = hits[-1]
        rec.update({k: float(v) for k, v in (("public", public), ("private", private)) if v is not None})
        return dict(rec)
    return _update(store.root, change)


def submissions_table(store_root) -> pd.DataFrame:
    """Every recorded submission of a store, oldest first (empty when none was recorded)."""
    cols = ["created", "run", "file", "sha256", "metric_name", "local", "public", "private"]
    return pd.DataFrame(read_json(Path(store_root) / SUBMISSIONS) or [], columns=cols)


def with_lb_scores(store_root, runs: pd.DataFrame) -> pd.DataFrame:
    """A runs table (`RunStore.leaderboard`) with each run's newest public / private leaderboard scores, when any
    submission of the store has them."""
    subs = submissions_table(store_root)
    subs = subs[subs["public"].notna() | subs["private"].notna()]
    if not len(subs):
        return runs
    last = subs.groupby("run")[["public", "private"]].last()
    return runs.join(last, on="id")
