"""Honest evaluation of what an ensemble fits: TTA beta choice, K-fold cross-validation of combiners and the paired
bootstrap of a gain.

Whatever is fitted on validation labels (a member's TTA beta, weights, hill-climbing selection, the stacking
model) is scored by K-fold cross-validation over the validation rows: fitted on K-1 folds, it predicts the held-out
fold, and the concatenated held-out predictions are scored. `ensemble()` uses `_cv_betas` and `_cv_fits`, the cores
of `choose_beta` and `cross_val_combine`, which add the fit on all rows and per-fold member probabilities.
"""

__all__ = ["BETA_GRID", "choose_beta", "kfold_indices", "cross_val_combine", "paired_bootstrap"]

from typing import Callable, Hashable, Optional, Sequence, Union

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.model_selection import KFold, StratifiedKFold

from ..errors import FastclsError
from ..metrics import COUNT_METRICS, get_metric
from ..predict import BETA_GRID, best_beta
from .combiners import Combiner, _check_method, _fit, _needs_search
from .scoring import _CHUNK, _LabelScorer, _argmax, _score
from .search import _candidate_classes, _search_data, _search_many


# -- TTA beta ------------------------------------------------------------------------------------------------------

def _beta_labels(plain, aug, grid=BETA_GRID, probs: bool = False) -> np.ndarray:
    """(len(grid), N) argmax labels of the blend at each beta, without materialising the blends; with `probs` (a
    probability metric scores them) the (len(grid), N, C) blends themselves."""
    shape = (len(grid), len(plain)) + ((plain.shape[1],) if probs else ())
    out = np.empty(shape, dtype=np.float32 if probs else np.int64)
    for lo in range(0, len(plain), _CHUNK):
        p, a = np.asarray(plain[lo:lo + _CHUNK]), np.asarray(aug[lo:lo + _CHUNK])
        for g, b in enumerate(grid):
            blend = p * np.float32(b) + a * np.float32(1 - b)
            out[g, lo:lo + _CHUNK] = blend if probs else blend.argmax(1)
    return out


def _pick_betas(labels, targets, metric: str, n_classes: int, rows_list, grid=BETA_GRID) -> list[int]:
    """Grid position of the best blend on each row subset of `rows_list` (None = all rows); among equal scores the
    one nearest fastai's default, as a single run chooses (`predict.best_beta`). `labels` are `_beta_labels`."""
    y, picks = np.asarray(targets), []
    for rows in rows_list:
        idx = slice(None) if rows is None else rows
        scorer = _LabelScorer(metric, y[idx], n_classes)
        picks.append(best_beta([scorer.sign * scorer(lab[idx]) for lab in labels], grid))
    return picks


def choose_beta(plain, aug, targets, metric: str, grid=BETA_GRID, rows=None) -> float:
    """The TTA beta from `grid` whose blend scores best on `rows` (all rows by default); on ties the one nearest
    fastai's 0.25.

    Args:
        plain: (N, C) plain-view probabilities.
        aug: (N, C) mean of the TTA views.
        targets: (N,) integer targets.
        metric: registry metric name.
        grid: candidate betas (weight of the plain view).
        rows: the row indices to choose on (e.g. the training folds), or None for all.

    Returns:
        The chosen beta.
    """
    labels = _beta_labels(plain, aug, grid, get_metric(metric).needs_probs)
    g, = _pick_betas(labels, targets, metric, plain.shape[1], [rows], grid)
    return float(grid[g])


def _cv_betas(plain, aug, targets, metric: str, fold, grid=BETA_GRID):
    """`choose_beta` cross-validated: (per-fold betas chosen on the other folds, their out-of-fold labels, the beta
    chosen on all rows, its labels); the blends' labels are computed once for all fits."""
    labels = _beta_labels(plain, aug, grid, get_metric(metric).needs_probs)
    K = int(fold.max()) + 1
    picks = _pick_betas(labels, targets, metric, plain.shape[1], [np.flatnonzero(fold != k) for k in range(K)] + [None],
                        grid)
    oof = np.empty(labels.shape[1:], dtype=labels.dtype)
    for k in range(K):
        oof[fold == k] = labels[picks[k]][fold == k]
    return [float(grid[g]) for g in picks[:K]], oof, float(grid[picks[K]]), labels[picks[K]]


# -- cross-validation ----------------------------------------------------------------------------------------------

def kfold_indices(targets, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) of each row: stratified when every present class has at least k rows, shuffled, seeded."""
    y = np.asarray(targets)
    if k < 2 or len(y) < k:
        raise FastclsError(f"Cross-validation needs at least 2 folds and one row per fold; got {k} folds for "
                           f"{len(y)} validation rows.")
    counts = np.bincount(y)
    splitter = (StratifiedKFold if counts[counts > 0].min() >= k else KFold)(k, shuffle=True, random_state=seed)
    fold = np.empty(len(y), dtype=np.int64)
    for i, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold[held] = i
    return fold


def _cv_predict(n_rows: int, C: int, fold, fit_apply: Callable[[int, np.ndarray, np.ndarray], np.ndarray]):
    """Out-of-fold predictions: for each fold, `fit_apply(k, train_rows, held_rows)` fits on the other folds only
    and returns the held-out rows' probabilities."""
    oof = np.zeros((n_rows, C), dtype=np.float32)
    for k in np.unique(fold):
        held, train = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        oof[held] = fit_apply(int(k), train, held)
    return oof

def _cv_fits(method: str, probs_for: Callable[[Hashable], Sequence], keys: Sequence[Hashable], targets, metric,
             weights, fold, n_classes: int, seed: int, hill_steps: int,
             tops_for: Optional[Callable[[Hashable, np.ndarray], list]] = None):
    """Out-of-fold predictions of `method` and its combiners: fold k is fitted on the other folds' rows of the
    members' probabilities `probs_for(keys[k])`; a key after the K folds' adds the fit on all rows.

    Searched methods fit every fit with the same key in one joint search (see `_ArgmaxSearch`), on candidate classes
    from the last key's probabilities (they only change the search's speed, never its result); `tops_for(key, U)`
    may give the members' `_Tops` from a cache. Returns (oof, [combiner per key]).
    """
    _check_method(method, weights)
    y = np.asarray(targets, dtype=np.int64)
    K = int(fold.max()) + 1
    rows_list = [np.flatnonzero(fold != k) for k in range(K)] + [None] * (len(keys) - K)
    combs: list = [None] * len(keys)
    if _needs_search(method, weights):
        U = _candidate_classes(probs_for(keys[-1]))
        for key in dict.fromkeys(keys):
            ids = [i for i, other in enumerate(keys) if other == key]
            kprobs = probs_for(key)
            data = _search_data(kprobs, U, None if tops_for is None else tops_for(key, U))
            for i, (w, score) in zip(ids, _search_many(method, kprobs, y, metric, [rows_list[i] for i in ids],
                                                       hill_steps, data)):
                combs[i] = Combiner(method, n_classes, weights=w, fit_score=score)
        oof = _cv_predict(len(y), n_classes, fold, lambda k, train, held: combs[k].apply(probs_for(keys[k]), held))
        return oof, combs

    def fit_apply(k, train, held):
        fprobs = probs_for(keys[k])
        combs[k] = _fit(method, fprobs, y, metric, weights, train, seed, hill_steps, score_fit=False)
        return combs[k].apply(fprobs, held)

    oof = _cv_predict(len(y), n_classes, fold, fit_apply)
    for i in range(K, len(keys)):
        combs[i] = _fit(method, probs_for(keys[i]), y, metric, weights, rows_list[i], seed, hill_steps,
                        score_fit=False)
    return oof, combs


def cross_val_combine(probs_list: Sequence, targets, method: str = "mean", metric: str = "accuracy", weights=None,
                      folds: Union[int, Sequence[int]] = 5, seed: int = 0, hill_steps: int = 50):
    """K-fold out-of-fold predictions of `method`: each fold is predicted by a combiner fitted on the other folds.

    Args:
        probs_list: one (N, C) probability array per member.
        targets: (N,) integer targets.
        method: see `combine`.
        metric: registry metric name.
        weights: see `combine`.
        folds: number of folds, or the fold number of each row (to reuse a split).
        seed: seeds the fold split and the stacking model.
        hill_steps: additions made by 'hill'.

    Returns:
        (oof, fold): (N, C) float32 held-out probabilities and the (N,) fold number of each row.
    """
    y = np.asarray(targets, dtype=np.int64)
    fold = kfold_indices(y, folds, seed) if np.isscalar(folds) else np.asarray(folds)
    K = int(fold.max()) + 1
    oof, _ = _cv_fits(method, lambda key: probs_list, [None] * K, y, metric, weights, fold, probs_list[0].shape[1],
                      seed, hill_steps)
    return oof, fold


# -- bootstrap -----------------------------------------------------------------------------------------------------

def paired_bootstrap(targets, a, b, metric: str, n_boot: int = 1000, seed: int = 0) -> tuple:
    """Gain of predictions `a` over `b` (metric(a) - metric(b), sign flipped for lower-is-better metrics) with a
    paired bootstrap 95% percentile interval over rows.

    For count metrics a resample only needs how many rows of each type (target, label a, label b) it drew: resampling
    rows with replacement is a multinomial draw over the types, so that is drawn directly when there are few types
    (for accuracy only four matter: which of a and b is right), which is exact and costs nothing; with many types,
    rows are resampled by index in chunks, their types bincounted.

    Args:
        targets: (N,) integer targets.
        a, b: (N,) labels or (N, C) probabilities, rows paired.
        metric: registry metric name.
        n_boot: number of resamples (0 gives no interval).
        seed: seeds the resampling.

    Returns:
        (gain, low, high); low and high are NaN when n_boot is 0.
    """
    y = np.asarray(targets, dtype=np.int64)
    m = get_metric(metric)
    if m.needs_probs:  # a probability metric: compare the probabilities themselves
        la, lb = np.asarray(a), np.asarray(b)
    else:
        la = _argmax(np.asarray(a)) if np.ndim(a) == 2 else np.asarray(a, dtype=np.int64)
        lb = _argmax(np.asarray(b)) if np.ndim(b) == 2 else np.asarray(b, dtype=np.int64)
    sign = 1.0 if m.higher_is_better else -1.0
    gain = sign * (_score(metric, y, la) - _score(metric, y, lb))
    if n_boot <= 0:
        return gain, float("nan"), float("nan")
    rng = np.random.default_rng([seed, 20040704])
    N, fn = len(y), COUNT_METRICS.get(metric)
    if fn is None:  # any other registry metric: plain row resampling
        boot = np.empty(n_boot)
        for i in range(n_boot):
            idx = rng.integers(0, N, N)
            boot[i] = sign * (m(y[idx], la[idx]) - m(y[idx], lb[idx]))
    else:
        C = int(max(y.max(), la.max(), lb.max())) + 1
        if metric == "accuracy":  # only correctness matters: class 0 = right, 1 = wrong, all targets 0
            y, la, lb, C = np.zeros_like(y), (la != y).astype(np.int64), (lb != y).astype(np.int64), 2
        codes = (y * C + la) * C + lb
        uniq, inv, cnt = np.unique(codes, return_inverse=True, return_counts=True)
        K, rows = len(uniq), np.arange(len(uniq))
        ty, ta, tb = uniq // (C * C), (uniq // C) % C, uniq % C
        # (types, classes) indicators: resampled type counts times these give the per-class counts
        ind = {k: csr_matrix((np.ones(K) if keep is None else keep.astype(np.float64), (rows, cols)), shape=(K, C))
               for k, cols, keep in (("true", ty, None), ("tp_a", ty, ta == ty), ("pred_a", ta, None),
                                     ("tp_b", ty, tb == ty), ("pred_b", tb, None))}
        # a multinomial draw costs ~K per resample, index resampling ~N/4 (measured): take the cheaper, in chunks
        # of resamples that keep the (chunk, K) and (chunk, N) arrays to a few MB
        by_type, inv = 4 * K < N, inv.astype(np.int32)
        chunk = max(1, min(n_boot, 2 ** 22 // max(K, N)))
        boot = np.empty(n_boot)
        for lo in range(0, n_boot, chunk):
            b = min(chunk, n_boot - lo)
            if by_type:
                draws = rng.multinomial(N, cnt / N, size=b).T.astype(np.float64)
            else:
                t = inv[rng.integers(0, N, size=(b, N), dtype=np.int32)] + (np.arange(b, dtype=np.int32) * K)[:, None]
                draws = np.bincount(t.ravel(), minlength=b * K).reshape(b, K).T.astype(np.float64)
            st = {k: (v.T @ draws).T for k, v in ind.items()}  # (chunk, C) each
            boot[lo:lo + b] = sign * (fn(st["tp_a"], st["pred_a"], st["true"]) -
                                      fn(st["tp_b"], st["pred_b"], st["true"]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return gain, float(lo), float(hi)
