"""K-fold training with out-of-fold (OOF) predictions: one run per fold plus a parent 'cv' run.

`run_cv(cfg, store, k)` trains fold i of `fastcls.data.assign_folds` (stratified, grouped where the recipe splits by
group) for each i as a normal run validated on that fold, then stores a parent run of kind 'cv' whose validation
probabilities are the fold runs' held-out predictions over every training item (each exactly once, in item order)
and whose test probabilities are the mean of the fold runs' test probabilities, view by view. The fold runs point to
it through the index's `parent` column. The parent is an ordinary run: listed, shown, ensembled, submitted.

Folds depend only on the items, labels, groups, k and the recipe's split_seed (never on the arch or --seed), so cv
runs of different archs share their validation items and ensemble or stack out of fold. A cv's id (`cv_id`) is a hash of what defines it, and fold
runs are named after it, so the same command run again reuses the folds already stored (an interrupted fold
continues from its checkpoint), and `--fold K` trains one fold: the parent is stored once all folds are.

Folds run through an executor (`fastcls.executors`: here one after another, or each a Ray task); each fold is
`fit_fold(trial, store, ...)`, a plain function of the trial's `RunConfig` and the store it trains into.
"""

__all__ = ["CVResult", "cv_id", "plan_folds", "fit_fold", "run_cv", "assemble_cv", "train_or_cv"]

import hashlib
import json
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional

import numpy as np
import pandas as pd

from .. import data as fdata
from ..errors import FastclsError
from ..runs import RunData, RunStore
from .executors import LocalExecutor, Trial
from ..posthoc import PostHoc
from ..train import Predictions, RunResult, check_new_name, fit_run, prepare, resume_run, run_metrics, with_posthoc
from ..config import RunConfig
from ..predict import encode_labels


@dataclass
class CVResult:
    """What `run_cv` returns: the parent run's id (None until every fold is stored), the fold runs and a table."""

    cv_id: str
    run_id: Optional[str]
    fold_runs: list  # run id per fold (None for a fold not stored yet)
    table: pd.DataFrame
    metrics: dict


def cv_id(cfg: RunConfig, k: int) -> str:
    """A deterministic id for the k-fold cv of `cfg`: the same command gives the same id (and finds its folds)."""
    spec = {"recipe": cfg.recipe.id_dict(), "arch": cfg.arch, "seed": cfg.seed, "data": cfg.data,
            "sample": cfg.sample, "weights": cfg.weights, "folds": k}
    return "cv-" + hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def plan_folds(cfg: RunConfig, k: int, only: Optional[int] = None) -> list[Trial]:
    """One trial per fold (or only fold `only`): `cfg` validated on that fold, named `<cv id>-f<i>`."""
    if k < 2:
        raise FastclsError(f"--folds must be at least 2, got {k}.")
    if only is not None and not 0 <= only < k:
        raise FastclsError(f"--fold {only} is not a fold of --folds {k}: give 0 to {k - 1}.")
    cid = cv_id(cfg, k)
    base = replace(cfg, fold=None, folds=None)
    return [Trial(i, f"fold={i}", {"fold": i}, replace(base, fold=i, folds=k, name=f"{cid}-f{i}"))
            for i in range(k) if only is None or i == only]


def _parent_of(store: RunStore, fold_runs: list) -> Optional[str]:
    """The finished cv run every one of `fold_runs` already points to (their index `parent`), or None."""
    parents = {store.resolve(r).get("parent") for r in fold_runs}
    if len(parents) != 1 or None in parents:
        return None
    (parent,) = parents
    try:
        return parent if store.resolve(parent).get("status") == "done" else None
    except FastclsError:  # a parent since deleted
        return None


def fit_fold(trial: Trial, store: RunStore, progress: str = "auto", items: Optional[fdata.Items] = None) -> RunResult:
    """Train one fold run (a normal run validated on fold `trial.cfg.fold`), or reuse it when it is stored.

    An interrupted earlier attempt continues from its checkpoint (`fastcls.train.resume_run`).
    """
    done = store.find(trial.cfg.name)
    if done:
        run = store.load(done)
        return RunResult(done, run.metrics, run.history, None, float(run.meta.get("seconds") or 0))
    stopped = store.find(trial.cfg.name, "interrupted")
    if stopped:
        return resume_run(store, stopped, progress, items=items)
    return fit_run(trial.cfg, store, progress, items=items)


def _fold_items(cfg: RunConfig, items: fdata.Items) -> pd.DataFrame:
    """The training rows the folds split (after --sample), in item order."""
    return fdata.sample_items(items.train, cfg.sample, cfg.recipe.split_seed)


def run_cv(cfg: RunConfig, store: RunStore, k: int = 5, fold: Optional[int] = None, progress: str = "auto",
           executor=None, items: Optional[fdata.Items] = None) -> CVResult:
    """Train the k folds of `cfg` (or only `fold`) and, once all are stored, the parent cv run.

    Args:
        cfg: the run config every fold starts from (recipe with overrides, arch, seed, data, sample).
        store: the run store.
        k: number of folds.
        fold: train only this fold (0..k-1).
        progress: see `fastcls.train.train`.
        executor: runs the folds (default `LocalExecutor()`; `fastcls.executors.RayExecutor` runs each as a Ray
            task, and the driver stores the fold runs).
        items: already-read items.

    Returns:
        A `CVResult`; `run_id` is None while some fold is not stored yet.

    Raises:
        FastclsError: fewer groups (or items) than folds, before anything trains; a fold that failed.
    """
    trials = plan_folds(cfg, k, fold)
    prep = prepare(cfg, items, store)
    items, recipe = prep.items, prep.cfg.recipe
    fdata.assign_folds(_fold_items(cfg, items), recipe, k, recipe.split_seed)  # too few groups: say so before training
    cid = cv_id(cfg, k)
    if cfg.name:  # --name may already be this cv's own run (the same command run again): only another run's is taken
        folds = filter(None, (store.find(f"{cid}-f{i}") for i in range(k)))
        check_new_name(store, cfg.name, allow={store.resolve(r).get("parent") for r in folds})
    executor = executor or LocalExecutor()
    failed = []
    if getattr(executor, "remote", False):  # a worker's private store holds no fold: skip the stored ones here
        trials = [t for t in trials if not store.find(t.cfg.name)]
    for trial, res, error in executor.map(partial(fit_fold, progress=progress, items=items), trials, store=store):
        if error is not None:
            failed.append(f"fold {trial.index}: {error if isinstance(error, FastclsError) else repr(error)}")
        elif progress != "none":
            print(f"[{cid}] fold {trial.index + 1}/{k} stored as run {res.run_id}", flush=True)
    if failed:
        raise FastclsError(f"{len(failed)} fold(s) of {cid} failed:\n" + "\n".join(f"  {f}" for f in failed)
                           + "\nThe folds that finished are stored; run the same command again to retry the others.")
    names = [f"{cid}-f{i}" for i in range(k)]
    fold_runs = [store.find(n) for n in names]
    if any(r is None for r in fold_runs):
        return CVResult(cid, None, fold_runs, _table(store, fold_runs, None), {})
    with store.exclusive(cid):  # folds finishing at once in two processes (--fold K each) store one cv run
        parent = _parent_of(store, fold_runs)
        if parent is None:  # named --name if given, else its cv id (the folds keep their cv-id names: that finds them)
            parent = assemble_cv(store, fold_runs, replace(cfg, recipe=recipe, fold=None, folds=k), items,
                                 name=cfg.name or cid)
    return CVResult(cid, parent, fold_runs, _table(store, fold_runs, parent), store.load(parent).metrics)


def assemble_cv(store: RunStore, fold_runs: list, cfg: RunConfig, items: fdata.Items,
                name: Optional[str] = None) -> str:
    """Store the parent cv run of `fold_runs` (fold i's run at position i) and link the folds to it.

    Validation probabilities: each training item's held-out prediction, in item order (every item exactly once);
    test probabilities: the mean over folds, view by view. Both are built from each fold model's own probabilities
    (a fold's post-hoc steps, fitted on its own validation labels, are undone first: kept, they would make the
    out-of-fold scores in-sample); the recipe's post-hoc steps are then fitted once on the whole out-of-fold set, and
    the cv run's `*_raw` metrics are the folds' own. Returns the parent's run id.
    """
    t0 = time.time()
    runs = [store.load(r) for r in fold_runs]
    own = [PostHoc.from_dict(r.meta.get("posthoc")) for r in runs]  # each fold's fitted steps, to undo
    vocab = list(runs[0].vocab)
    for r in runs[1:]:
        if list(r.vocab) != vocab:
            raise FastclsError(f"Fold runs {runs[0].id} and {r.id} have different vocabularies; they cannot be "
                               "combined into one cv run. Train the folds again with the same recipe.")
    ids = _fold_items(cfg, items)["id"].astype(str).tolist()
    pos = {i: n for n, i in enumerate(ids)}
    V = min(r.valid_probs.shape[0] for r in runs)
    probs = np.full((V, len(ids), len(vocab)), np.nan, dtype=np.float32)
    targets = np.full(len(ids), -1, dtype=np.int64)
    seen = np.zeros(len(ids), dtype=np.int64)
    for r, post in zip(runs, own):
        rows = [pos.get(str(i)) for i in r.valid_ids]
        if any(p is None for p in rows):
            extra = [i for i, p in zip(r.valid_ids, rows) if p is None]
            raise FastclsError(f"Fold run {r.id} validated on items that are not in the data now (e.g. {extra[0]!r}); "
                               "the data changed since the folds were trained. Train the folds again.")
        rows = np.asarray(rows)
        probs[:, rows] = post.undo(r.valid_probs[:V]) if post.applied else r.valid_probs[:V]
        targets[rows] = r.valid_targets
        seen[rows] += 1
    if (seen != 1).any():
        bad = int(np.flatnonzero(seen != 1)[0])
        raise FastclsError(f"The folds {', '.join(fold_runs)} hold item {ids[bad]!r} {seen[bad]} times out of fold; "
                           "each item must be held out exactly once. Train the folds again with the same split_seed.")
    test_probs, test_ids = None, None
    if all(r.test_probs is not None for r in runs):
        test_ids = [str(i) for i in runs[0].test_ids]
        Vt = min(r.test_probs.shape[0] for r in runs)
        test_probs = np.zeros((Vt, len(test_ids), len(vocab)), dtype=np.float64)
        for r, post in zip(runs, own):
            if [str(i) for i in r.test_ids] != test_ids:
                raise FastclsError(f"Fold runs {runs[0].id} and {r.id} list different test items.")
            test_probs += post.undo(r.test_probs[:Vt]) if post.applied else r.test_probs[:Vt]
        test_probs = (test_probs / len(runs)).astype(np.float32)
    test_targets = None
    if test_ids is not None and items.test is not None and "label" in items.test:
        test_targets = encode_labels(items.test["label"], vocab)
    preds = Predictions(vocab, ids, probs, targets, test_ids, test_probs, test_targets)
    # the out-of-fold targets are every training item once: their class counts are the training prior
    preds, raw, post = with_posthoc(cfg.recipe, preds, prior=np.bincount(targets, minlength=len(vocab)))
    metrics = run_metrics(cfg.recipe, preds, None, len(ids), raw=raw, posthoc=post)
    metrics["fold_metrics"] = [r.metrics.get(cfg.recipe.monitor or cfg.recipe.metric) for r in runs]
    rid = store.save(RunData(config={**cfg.to_dict(), "fold_runs": list(fold_runs)}, vocab=vocab,
                             valid_probs=preds.valid_probs, valid_targets=targets, valid_ids=ids, metrics=metrics,
                             test_probs=preds.test_probs,
                             test_ids=test_ids, kind="cv", name=name, seconds=sum(float(r.meta.get("seconds") or 0)
                                                                               for r in runs) + time.time() - t0,
                             extra={"cv": {"folds": len(runs), "fold_runs": list(fold_runs),
                                           "valid_probs": "out-of-fold", "test_probs": "mean over folds"},
                                    **({"posthoc": post.to_dict()} if post.applied else {})}))
    for r in runs:
        store.set_status(r.id, "done", parent=rid)
    return rid


def _table(store: RunStore, fold_runs: list, parent: Optional[str]) -> pd.DataFrame:
    """One row per fold and one for the cv run: the valid metric (OOF for cv) and the test metric when known."""
    rows = []
    for i, rid in enumerate(fold_runs):
        if rid is None:
            rows.append({"fold": str(i), "run": "", "status": "missing"})
            continue
        rows.append({"fold": str(i), "run": rid, "status": "done", **_scores(store.load(rid))})
    if parent is not None:
        rows.append({"fold": "cv (OOF)", "run": parent, "status": "done", **_scores(store.load(parent))})
    return pd.DataFrame(rows)


def _scores(run) -> dict:
    m, name = run.metrics, run.metrics.get("metric_name")
    out = {name: m.get(name), "valid_loss": m.get("valid_loss")}
    if f"test_{name}" in m:
        out[f"test_{name}"] = m[f"test_{name}"]
    return out


def train_or_cv(cfg: RunConfig, store: RunStore, progress: str = "auto", executor=None):
    """`fastcls train`: one run (`fit_run`), or with `cfg.folds` its k-fold cv (`run_cv`, folds on `executor`).

    Raises:
        FastclsError: a remote executor for a single run (it runs folds; one run on several GPUs is --distributed).
    """
    if cfg.folds is None:
        if executor is not None and getattr(executor, "remote", False):
            raise FastclsError("--executor ray runs the folds of --folds K as Ray tasks; add --folds K, or train this "
                               "one run here (for one run on several GPUs see --distributed).")
        check_new_name(store, cfg.name)
        return fit_run(cfg, store, progress)
    return run_cv(cfg, store, cfg.folds, cfg.fold, progress, executor=executor)
