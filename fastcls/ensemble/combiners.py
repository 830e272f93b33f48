"""Combination rules for member probabilities: the `METHODS` registry, `Combiner` (a fitted rule) and
`fit_combiner` / `combine`.

Each entry of `METHODS` says how its rule is applied and what it fits: nothing ('mean', 'rank', 'vote', 'weighted'
with given weights), member weights by the greedy search of `fastcls.ensemble.search` ('hill', 'weighted' without
weights) or a model ('stack'). Adding a rule is one entry there.
"""

__all__ = ["METHODS", "Method", "Combiner", "fit_combiner", "combine"]

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import FastclsError, suggest
from .scoring import _CHUNK, _LabelScorer, _n_rows, _take, _weighted_sum
from .search import _search_many


class Method(NamedTuple):
    """One combination rule of `METHODS`: how it is applied and what it fits on validation labels."""

    apply: Callable[..., np.ndarray]  # (combiner, probs_list, rows) -> (n, C) float32 probabilities
    fit: Optional[Callable[..., Any]] = None  # (probs_list, targets of rows, rows, metric, n_classes, seed) -> model
    search: bool = False  # member weights fitted by the greedy search (unless the rule takes weights and has them)
    takes_weights: bool = False  # accepts one user weight per member


@dataclass
class Combiner:
    """A fitted combination rule: `apply(probs_list, rows)` gives (rows, C) probabilities.

    `apply` reads each member's array once (block by block), so members may be memory-mapped or computed lazily.
    """

    method: str
    n_classes: int
    weights: Optional[np.ndarray] = None  # per member, summing to 1 (mean, weighted, hill, vote)
    model: Any = None  # stack: the fitted (scaler, LogisticRegression) pipeline
    fit_score: Optional[float] = None  # metric on the rows it was fitted on (optimistic for fitted methods)

    def apply(self, probs_list: Sequence, rows=None) -> np.ndarray:
        """Combined (n, C) float32 probabilities of `rows` (all rows by default)."""
        return METHODS[self.method].apply(self, probs_list, rows)


def _weighted_mean(comb: Combiner, probs, rows=None) -> np.ndarray:
    return _weighted_sum(probs, comb.weights, rows)


def _rank_mean(comb: Combiner, probs, rows=None) -> np.ndarray:
    """Per class, each member's ranks over the rows, summed over members; rows renormalised to sum to 1 (so the
    usual scaling of ranks to (0, 1] and averaging would not change the result)."""
    acc = None
    for p in probs:
        x = p if rows is None else p[rows]
        if acc is None:
            acc = np.zeros(x.shape, dtype=np.float32)  # sums of (half-)integer ranks: exact in float32 below 2**23
        for lo in range(0, x.shape[1], 16):  # some classes at a time: rankdata's float64 and sort buffers stay small
            acc[:, lo:lo + 16] += rankdata(x[:, lo:lo + 16], axis=0)
    acc /= acc.sum(1, keepdims=True)
    return acc


def _vote(comb: Combiner, probs, rows=None) -> np.ndarray:
    """Weighted fractions of members voting for each class; ties broken by the mean probability."""
    votes = mean = None
    for m, p in enumerate(probs):
        if votes is None:
            n = _n_rows(p, rows)
            votes, mean = np.zeros((n, p.shape[1]), dtype=np.float64), np.zeros((n, p.shape[1]), dtype=np.float32)
        for lo in range(0, n, _CHUNK):
            x = _take(p, rows, lo, lo + _CHUNK)
            votes[lo + np.arange(len(x)), x.argmax(1)] += comb.weights[m]
            mean[lo:lo + _CHUNK] += x
    mean /= len(probs)
    eps = 1e-6  # far below any difference in vote fractions, so only exact ties are decided by the mean
    return ((votes + eps * mean) / (1 + eps)).astype(np.float32)


def _stack_features(probs, rows=None) -> np.ndarray:
    """Members' log-probabilities side by side, (n, members x C) float32."""
    X = None
    for m, p in enumerate(probs):
        n, C = _n_rows(p, rows), p.shape[1]
        if X is None:
            X = np.empty((n, len(probs) * C), dtype=np.float32)
        for lo in range(0, n, _CHUNK):
            X[lo:lo + _CHUNK, m * C:(m + 1) * C] = np.log(np.clip(_take(p, rows, lo, lo + _CHUNK), 1e-6, 1.0))
    return X


_STACK_CS = (1e-3, 1e-2, 1e-1)  # inverse regularisation strengths tried, strongest first (weaker only overfit more
# on the synthetic benchmark runs, and take the most iterations)


def _fit_stack(X, y, metric: str, n_classes: int, seed: int):
    """Logistic regression on standardised features, its regularisation chosen on a 20% holdout of these rows.

    Members x classes features overfit easily (e.g. 1000 features for 10 runs of 100 classes), and the best strength
    depends on the data, so it is picked from `_STACK_CS` by the metric on held-out rows, warm-started from the
    strongest, then refitted on all rows. Only the rows given are used, so a cross-validation fold stays unseen.
    """
    scaler = StandardScaler().fit(X)  # standardised: lbfgs converges in a fraction of the iterations
    X = scaler.transform(X)
    perm = np.random.default_rng(seed).permutation(len(y))
    hold, fit = perm[:len(y) // 5], perm[len(y) // 5:]
    lr = LogisticRegression(max_iter=300, warm_start=True, random_state=seed)
    best_C, best = _STACK_CS[-1], -np.inf
    if len(hold) and len(np.unique(y[fit])) > 1:
        scorer = _LabelScorer(metric, y[hold], n_classes)
        for c in _STACK_CS:
            lr.set_params(C=c).fit(X[fit], y[fit])
            probs = np.zeros((len(hold), n_classes))
            probs[:, lr.classes_] = lr.predict_proba(X[hold])  # every class's column, for probability metrics
            score = scorer.sign * scorer(probs)
            if score > best:  # ties keep the stronger regularisation
                best_C, best = c, score
    if not hasattr(lr, "classes_") or len(lr.classes_) != len(np.unique(y)):
        lr = LogisticRegression(max_iter=300, random_state=seed)  # a class only in the holdout: start afresh
    return make_pipeline(scaler, lr.set_params(C=best_C).fit(X, y))


def _stack_model(probs, y, rows, metric: Optional[str], n_classes: int, seed: int):
    """The stacking model fitted on `rows` (`y` are their targets): a class index when only one class is present."""
    classes = np.unique(y)
    if len(classes) < 2:
        return int(classes[0])
    return _fit_stack(_stack_features(probs, rows), y, metric or "accuracy", n_classes, seed)


def _stack_predict(comb: Combiner, probs, rows=None) -> np.ndarray:
    X = _stack_features(probs, rows)
    out = np.zeros((len(X), comb.n_classes), dtype=np.float32)
    model = comb.model
    if isinstance(model, (int, np.integer)):  # only one class in the fitted rows
        out[:, int(model)] = 1
    else:  # the model only knows the classes present in its training rows
        out[:, model.classes_] = model.predict_proba(X)
    return out


METHODS: dict[str, Method] = {
    "mean": Method(_weighted_mean),
    "weighted": Method(_weighted_mean, search=True, takes_weights=True),
    "rank": Method(_rank_mean),
    "vote": Method(_vote, takes_weights=True),
    "hill": Method(_weighted_mean, search=True),
    "stack": Method(_stack_predict, fit=_stack_model),
}


def _normalise_weights(weights, n_members: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).ravel()
    if len(w) != n_members:
        raise FastclsError(f"{len(w)} weights given for {n_members} runs; give one weight per run, in run order.")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise FastclsError(f"Ensemble weights must be finite, non-negative and not all zero; got {w.tolist()}.")
    return w / w.sum()


def _check_method(method: str, weights) -> None:
    if method not in METHODS:
        raise FastclsError(f"Unknown ensemble method {method!r}.{suggest(method, METHODS)} "
                           f"Methods: {', '.join(METHODS)}.")
    weighted = [name for name, spec in METHODS.items() if spec.takes_weights]
    if weights is not None and method not in weighted:
        raise FastclsError(f"Weights apply to the methods {' and '.join(weighted)}, not {method!r}: "
                           "use method='weighted' (or 'vote' for a weighted vote), or leave the weights out.")


def _needs_search(method: str, weights) -> bool:
    """Whether `method` fits weights by the greedy argmax search."""
    spec = METHODS.get(method)
    return spec is not None and spec.search and (weights is None or not spec.takes_weights)


def _fits(method: str, weights) -> bool:
    """Whether `method` fits anything on validation labels (then it is scored by cross-validation)."""
    return (method in METHODS and METHODS[method].fit is not None) or _needs_search(method, weights)


def _fit(method, probs_list, targets, metric, weights, rows, seed, hill_steps, score_fit=True) -> Combiner:
    """`fit_combiner`, with an option to skip scoring the fit."""
    _check_method(method, weights)
    if len(probs_list) == 0:
        raise FastclsError("No member probabilities to combine.")
    spec, M, C = METHODS[method], len(probs_list), probs_list[0].shape[1]
    if _fits(method, weights) and (targets is None or (metric is None and spec.fit is None)):
        raise FastclsError(f"Method {method!r} fits on validation labels: pass targets and a metric.")
    w = _normalise_weights(weights, M) if weights is not None else np.full(M, 1.0 / M)
    y = None if targets is None else np.asarray(targets, dtype=np.int64)
    yr = None if y is None else (y if rows is None else y[rows])
    scorer = _LabelScorer(metric, yr, C) if (metric is not None and y is not None) else None
    if _needs_search(method, weights):
        (w, fit_score), = _search_many(method, probs_list, y, metric, [rows], hill_steps)
        return Combiner(method, C, weights=w, fit_score=fit_score)
    comb = Combiner(method, C, weights=w if spec.fit is None else None)
    if spec.fit is not None:
        comb.model = spec.fit(probs_list, yr, rows, metric, C, seed)
    if scorer is not None and score_fit:
        comb.fit_score = scorer(comb.apply(probs_list, rows))
    return comb


def fit_combiner(method: str, probs_list: Sequence, targets=None, metric: Optional[str] = None, weights=None,
                 rows=None, seed: int = 0, hill_steps: int = 50) -> Combiner:
    """Fit a combination rule on `rows` of the members' probabilities.

    Args:
        method: one of `METHODS`.
        probs_list: one (N, C) probability array per member (memory-mapped arrays are fine).
        targets: (N,) integer targets; needed by 'hill', 'stack' and 'weighted' without weights.
        metric: registry metric that 'hill' and 'weighted' optimise.
        weights: per-member weights for 'weighted' (fixed, then nothing is fitted) and 'vote'.
        rows: row indices to fit on (e.g. training folds); None for all rows.
        seed: random state of the stacking model.
        hill_steps: additions made by 'hill' after its best single member.

    Returns:
        The fitted `Combiner`; `fit_score` is the metric on the fitted rows when targets and metric are given.
    """
    return _fit(method, probs_list, targets, metric, weights, rows, seed, hill_steps)


def combine(probs_list: Sequence, method: str = "mean", targets=None, metric: Optional[str] = None, weights=None,
            seed: int = 0, hill_steps: int = 50) -> np.ndarray:
    """Fit `method` on all rows and return the combined (N, C) float32 probabilities.

    Args:
        probs_list: one (N, C) probability array per member, rows in the same order.
        method: one of `METHODS` (mean, weighted, rank, vote, hill, stack).
        targets: (N,) integer targets for the methods that fit ('hill', 'stack', 'weighted' without weights).
        metric: registry metric name that 'hill' and 'weighted' optimise.
        weights: per-member weights for 'weighted' and 'vote'.
        seed: random state of the stacking model.
        hill_steps: additions made by 'hill'.

    Returns:
        (N, C) float32 probabilities (rows sum to 1; 'vote' gives vote fractions).
    """
    comb = fit_combiner(method, probs_list, targets, metric, weights, seed=seed, hill_steps=hill_steps)
    return comb.apply(probs_list)
