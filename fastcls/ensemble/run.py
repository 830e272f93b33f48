"""`ensemble(store, refs, method)`: combine stored run probabilities into an ensemble run, with an honest estimate
of what it gains.

It reads only the run store (never a model): the members are checked and aligned (`fastcls.ensemble.members`),
each run's TTA views are blended, the runs are combined (`fastcls.ensemble.combiners`), the result is scored and
saved as a run of kind 'ensemble', so it can be listed, ensembled again and submitted like any other run.

Honest evaluation: whatever is fitted on validation labels is scored by K-fold cross-validation
(`fastcls.ensemble.stats`); the stored ensemble is then fitted on all rows. Its stored validation probabilities are
the held-out (out-of-fold) predictions, so the leaderboard metric of the stored run is the honest one and an
ensemble of ensembles stays honest; its test probabilities come from the fit on all rows.
"""

__all__ = ["EnsembleResult", "ensemble"]

import time
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import FastclsError
from ..metrics import expected_calibration_error, get_metric, log_loss
from ..posthoc import PostHoc, fit_temperature
from ..runs import RunData, RunStore
from ..submission import submission_for_run
from .combiners import _check_method, _fit, _fits, _normalise_weights
from .members import _load_members
from .scoring import _LabelScorer
from .stats import _cv_betas, _cv_fits, kfold_indices, paired_bootstrap


class _Lazy(Sequence):
    """A sequence whose items are computed on access: each member's test blend, read once by `Combiner.apply`."""

    def __init__(self, n: int, fn: Callable[[int], np.ndarray]):
        self.n, self.fn = n, fn

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.fn(i)


@dataclass
class EnsembleResult:
    """What `ensemble` stored and how it scored (`run_id` None: the store was read-only, nothing was stored).

    `valid_probs` is the combination fitted on all validation rows; `oof_probs` the held-out predictions that
    give the honest score (None when nothing was fitted, then the score is direct). The stored run's valid
    probabilities are `oof_probs` when present, else `valid_probs`.
    """

    run_id: str
    table: pd.DataFrame
    method: str
    metric: str
    score: float  # honest score of the ensemble (what the stored run reports)
    evaluated: str  # 'cv-K' or 'direct'
    weights: Optional[list]  # per member in `refs` order, None for 'stack' and 'rank'
    betas: list  # per member TTA beta (weight of the plain view), None for runs with one view
    valid_ids: list = field(repr=False)
    valid_probs: np.ndarray = field(repr=False)
    oof_probs: Optional[np.ndarray] = field(repr=False, default=None)
    test_ids: Optional[list] = field(repr=False, default=None)
    test_probs: Optional[np.ndarray] = field(repr=False, default=None)
    submission: Optional[pd.DataFrame] = field(repr=False, default=None)  # the written submission, when asked for


def ensemble(store: RunStore, refs: list[str], method: str = "mean", tta_beta: Optional[float] = None,
             weights: Optional[list[float]] = None, name: Optional[str] = None, seed: int = 0, hill_steps: int = 50,
             n_boot: int = 1000, folds: int = 5, submission=None, recipe_dirs=(), metric: Optional[str] = None,
             calibrate: bool = False) -> EnsembleResult:
    """Combine stored runs' probabilities, score the combination honestly and save it as an 'ensemble' run.

    Reads only the store (memory-mapped probabilities; never a model). Every check happens before anything is
    written: runs must share the recipe, metric, vocab (same class order) and validation items with the same
    labels (rows are aligned by item id when their order differs), and stored probabilities must be finite rows
    summing to 1.

    Args:
        store: the run store to read the members from and save the ensemble to.
        refs: run ids, unique id prefixes or names; a run may appear more than once.
        method: 'mean' of probabilities; 'weighted' mean (given weights, or weights fitted to the recipe metric by
            coordinate search on the simplex); 'rank' averaging (per-class ranks over rows, rows renormalised);
            'vote' majority (weighted with weights; vote fractions, ties by mean probability); 'hill' greedy forward
            selection with replacement (Caruana et al. 2004) on the recipe metric; 'stack' logistic regression on
            the members' log-probabilities (members x classes features: the slowest method on large problems).
        tta_beta: weight of the plain view in each run's TTA blend (fastai's `tta(beta=...)`: beta * plain +
            (1 - beta) * mean of TTA views). None chooses it per run from `BETA_GRID` on the validation rows
            (cross-validated like any fitted choice). Runs with a single view use it as is.
        weights: one weight per entry of `refs`, for 'weighted' and 'vote'.
        name: name of the stored run (the store's default when None).
        seed: seeds the folds, the bootstrap and the stacking model.
        hill_steps: additions made by 'hill' after its best single member.
        n_boot: paired bootstrap resamples for the gain's 95% interval (0 for none).
        folds: K of the K-fold cross-validation of fitted choices.
        submission: also write the recipe's submission CSV of the ensemble's test probabilities to this path
            (checked before anything is stored: every member needs test probabilities).
        recipe_dirs: extra recipe folders, to find the recipe's submission format by name.
        metric: the registry metric to optimise and score (e.g. the competition's `map@3` or `log_loss`); None: the
            members' recipe monitor, else its metric.
        calibrate: fit a temperature (log likelihood) on the stored validation probabilities (out-of-fold when
            anything was fitted) and apply it to them and to the test probabilities; argmax metrics are unchanged.

    Returns:
        An `EnsembleResult`; its `table` has one row per member and one for the ensemble, with the metric score,
        how it was evaluated ('cv-K' or 'direct'), the in-sample `fit_score`, each member's beta and weight, and the
        ensemble's gain over the best member with its bootstrap interval.
    """
    t0 = time.perf_counter()
    _check_method(method, weights)
    if name is not None and store.writable():
        from ..train.run import check_new_name
        check_new_name(store, name)
    if tta_beta is not None and not 0 <= tta_beta <= 1:
        raise FastclsError(f"tta_beta is the weight of the plain view and must lie in [0, 1]; got {tta_beta}.")
    if weights is not None:
        _normalise_weights(weights, len(refs))
    if submission is not None:
        lacking = [r.id for r in map(store.load, refs) if r.test_probs is None]
        if lacking:
            raise FastclsError(f"--submission needs test probabilities, but run(s) {', '.join(lacking)} have none. "
                               "Leave those runs out or drop --submission.")
    members, runs, optimised, y, valid_ids, test_ids = _load_members(store, refs)
    metric = optimised if metric is None else get_metric(metric).name
    M, N, C = len(members), len(y), members[0].plain.shape[1]
    scorer = _LabelScorer(metric, y, C)
    s = scorer.sign

    # TTA betas: fixed (--tta-beta, else a member's recipe `tta_blend`), absent (one view) or chosen per run (then per
    # fold for the honest estimate)
    fixed = [tta_beta if tta_beta is not None else run.config.get("tta_blend") for run in runs]
    choose = [m.aug is not None and b is None for m, b in zip(members, fixed)]
    fits = _fits(method, weights) or any(choose)
    fold = kfold_indices(y, min(folds, N), seed) if fits else None
    K = 0 if fold is None else int(fold.max()) + 1
    betas = [None if m.aug is None else b for m, b in zip(members, fixed)]
    fold_betas = np.array([[b] * K for b in betas], dtype=object).reshape(M, K)
    member_score, member_fit, member_labels = np.empty(M), np.empty(M), []
    for i, mem in enumerate(members):
        if choose[i]:
            fold_betas[i], oof, betas[i], labels = _cv_betas(mem.plain, mem.aug, y, metric, fold)
            member_score[i], member_fit[i] = scorer(oof), scorer(labels)
            member_labels.append(oof)
        else:
            lab = scorer.pred(mem.probs(betas[i]))  # labels, or probabilities for a probability metric
            member_score[i] = member_fit[i] = scorer(lab)
            member_labels.append(lab)

    # out-of-fold predictions of the whole procedure (betas included), then the fit on all rows; a fit's key is its
    # members' betas (fits with one key share their member probabilities, and a search when the method searches)
    probs = [mem.probs(b) for mem, b in zip(members, betas)]
    oof_probs = None
    if fits:
        def probs_for(key):
            return [mem.probs(b) for mem, b in zip(members, key)]

        def tops_for(key, U):
            return [mem.tops(b, U) for mem, b in zip(members, key)]

        keys = [tuple(fold_betas[:, k]) for k in range(K)] + [tuple(betas)]
        oof_probs, combs = _cv_fits(method, probs_for, keys, y, metric, weights, fold, C, seed, hill_steps, tops_for)
        comb = combs[K]
    else:
        comb = _fit(method, probs, y, metric, weights, None, seed, hill_steps, score_fit=False)
    valid_probs = comb.apply(probs)
    del probs
    test_probs = None
    if test_ids is not None:
        test_probs = comb.apply(_Lazy(M, lambda i: members[i].test(betas[i])))

    evaluated = f"cv-{K}" if fits else "direct"
    stored = oof_probs if oof_probs is not None else valid_probs
    ece_raw = expected_calibration_error(y, stored)
    post = PostHoc(temperature=fit_temperature(stored, y) if calibrate else None, metric="log_loss")
    if post.applied:  # one parameter fitted on all stored rows: a slightly optimistic log loss, argmax unchanged
        stored, valid_probs = post.apply(stored), post.apply(valid_probs)
        test_probs = None if test_probs is None else post.apply(test_probs)
        oof_probs = None if oof_probs is None else stored
    ens_labels = scorer.pred(stored)
    score, fit_score = scorer(ens_labels), scorer(scorer.pred(valid_probs))
    best = int(np.argmax(s * member_score))
    gain, lo, hi = paired_bootstrap(y, ens_labels, member_labels[best], metric, n_boot, seed)

    member_ids = [r.id for r in runs]
    w_out = None if comb.weights is None or method == "rank" else [float(x) for x in comb.weights]
    config = {"recipe": runs[0].config.get("recipe"), "arch": "ensemble", "method": method, "members": member_ids,
              "metric": metric, "tta_beta": betas, "weights": w_out, "seed": seed, "folds": K or None}
    if method == "hill":
        config["hill_steps"] = hill_steps
    if calibrate:
        config["calibrate"] = True
    metrics = {"metric_name": metric, metric: score, f"fit_{metric}": fit_score, "evaluated": evaluated,
               "gain": gain, "gain_lo": lo, "gain_hi": hi, "best_member": member_ids[best],
               "ece": expected_calibration_error(y, stored), "log_loss": log_loss(y, stored)}
    if post.applied:
        metrics.update(temperature=post.temperature, ece_raw=ece_raw, posthoc=post.describe())
    writable = store.writable()  # a read-only store (a downloaded one): score and submit, store nothing
    run_id = None if not writable else store.save(RunData(
        config=config, vocab=list(runs[0].vocab), valid_probs=stored[None], valid_targets=y, valid_ids=valid_ids,
        metrics=metrics, test_probs=None if test_probs is None else test_probs[None], test_ids=test_ids,
        kind="ensemble", name=name, seconds=time.perf_counter() - t0,
        extra={**({"posthoc": post.to_dict()} if post.applied else {}),
               "ensemble": {"members": member_ids, "valid_probs": "out-of-fold" if fits else "fitted on all rows",
                            "member_scores": member_score.tolist(), "member_evaluated":
                                [f"cv-{K}" if c else "direct" for c in choose]}}))

    rows = [{"kind": "member", "id": r.id, "name": r.name, "arch": r.config.get("arch"), "method": None,
             "beta": np.nan if b is None else b, "weight": np.nan if w_out is None else w_out[i], "metric": metric,
             "score": member_score[i],
             "fit_score": member_fit[i], "evaluated": f"cv-{K}" if choose[i] else "direct",
             "gain": np.nan, "gain_lo": np.nan, "gain_hi": np.nan}
            for i, (r, b) in enumerate(zip(runs, betas))]
    rows.append({"kind": "ensemble", "id": run_id, "name": store.resolve(run_id)["name"] if run_id else name,
                 "arch": "ensemble",
                 "method": method, "beta": np.nan, "weight": np.nan, "metric": metric, "score": score,
                 "fit_score": fit_score, "evaluated": evaluated, "gain": gain, "gain_lo": lo, "gain_hi": hi})
    sub = None
    if submission is not None:
        run = store.load(run_id) if run_id else SimpleNamespace(
            id="ensemble", config=config, vocab=list(runs[0].vocab), test_ids=test_ids,
            test_probs=None if test_probs is None else test_probs[None])
        sub = submission_for_run(run, submission, beta=None, data=runs[0].config.get("data"), recipe_dirs=recipe_dirs,
                                 record=run_id is not None)  # a read-only store records nothing
    return EnsembleResult(run_id=run_id, table=pd.DataFrame(rows), method=method, metric=metric, score=score,
                          evaluated=evaluated, weights=w_out, betas=betas, valid_ids=valid_ids,
                          valid_probs=valid_probs, oof_probs=oof_probs, test_ids=test_ids, test_probs=test_probs,
                          submission=sub)
