"""Combine stored run probabilities into an ensemble run, with an honest estimate of what it gains.

`ensemble(store, refs, method)` reads only the run store (never a model): it checks that the runs agree (recipe,
metric, vocab, validation items and labels; rows are aligned by item id), blends each run's TTA views, combines
the runs, scores the result and saves it as a run of kind 'ensemble', so it can be listed, ensembled again and
submitted like any other run.

Honest evaluation: whatever is fitted on validation labels (member TTA betas, weights, hill-climbing selection,
the stacking model) is scored by K-fold cross-validation over the validation rows: it is fitted on K-1 folds and
predicts the held-out fold, and the concatenated held-out predictions are scored. The stored ensemble is then
fitted on all rows. Its stored validation probabilities are the held-out (out-of-fold) predictions, so the
leaderboard metric of the stored run is the honest one and an ensemble of ensembles stays honest; its test
probabilities come from the fit on all rows.

The numpy core (`combine`, `fit_combiner`, `cross_val_combine`, `tta_blend`, `choose_beta`, `paired_bootstrap`,
`kfold_indices`) works on plain arrays, so each method can be checked on tiny known inputs.

Speed: 'hill' and fitted 'weighted' optimise an argmax metric by greedy moves. `_ArgmaxSearch` evaluates a move
only on the rows and classes it can change and scores it from bincounts, and the K fold fits and the fit on all
rows run as one search for as long as they make the same moves. Probabilities stay memory-mapped; a mean is
accumulated member by member.
"""

__all__ = ["METHODS", "BETA_GRID", "Combiner", "EnsembleResult", "ensemble", "combine", "fit_combiner",
           "cross_val_combine", "kfold_indices", "choose_beta", "paired_bootstrap", "check_runs",
           "aligned_probs"]

import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.stats import rankdata
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import FastclsError, suggest
from ..metrics import COUNT_METRICS, get_metric
from ..predict import lerp_blend
from ..runs import RunData, RunStore, StoredRun

METHODS = ("mean", "weighted", "rank", "vote", "hill", "stack")
BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
_WEIGHTED_METHODS = ("weighted", "vote")  # the methods that take user weights
_CHUNK = 16384  # rows per block: keeps temporaries of a (rows, classes) block small and cache-friendly
_SUM_TOL = 1e-3  # same tolerance as the store's own check when a run is saved


class _LabelScorer:
    """Scores predicted labels against fixed targets, optionally on a subset of rows (`mask`); for count metrics
    also from (true positive, predicted) counts per class."""

    def __init__(self, metric: str, targets: np.ndarray, n_classes: int, mask: Optional[np.ndarray] = None):
        self.name, self.metric = metric, get_metric(metric)
        self.sign = 1.0 if self.metric.higher_is_better else -1.0
        self.counts_fn = COUNT_METRICS.get(metric)
        self.y, self.C, self.mask = np.asarray(targets, dtype=np.int64), n_classes, mask
        self.ntrue = np.bincount(self._rows(self.y), minlength=n_classes).astype(np.float64)

    def _rows(self, a):
        return a if self.mask is None else a[self.mask]

    def counts(self, labels):
        y, labels = self._rows(self.y), self._rows(labels)
        tp = np.bincount(y, weights=(labels == y), minlength=self.C)
        return tp, np.bincount(labels, minlength=self.C).astype(np.float64)

    def from_counts(self, tp, npred) -> float:
        return float(self.counts_fn(tp, npred, self.ntrue))

    def __call__(self, labels) -> float:
        labels = np.asarray(labels, dtype=np.int64)
        if self.counts_fn is not None:
            return self.from_counts(*self.counts(labels))
        return float(self.metric(self._rows(self.y), self._rows(labels)))


def _score(metric: str, targets, probs_or_labels) -> float:
    """The registry metric of probabilities (N x C) or labels, through the fast count path where there is one."""
    x = np.asarray(probs_or_labels)
    labels = _argmax(x) if x.ndim == 2 else x
    C = int(max(np.max(targets, initial=0), np.max(labels, initial=0))) + 1
    return _LabelScorer(metric, targets, x.shape[1] if x.ndim == 2 else C)(labels)


# -- array helpers -----------------------------------------------------------------------------------------------------

def _take(a, rows, lo, hi):
    """Rows lo:hi of `a` (a slice, so memory-mapped arrays stay lazy) or of `a[rows]` (a gather)."""
    return a[lo:hi] if rows is None else a[rows[lo:hi]]


def _n_rows(a, rows) -> int:
    return len(a) if rows is None else len(rows)


def _argmax(a, rows=None) -> np.ndarray:
    n = _n_rows(a, rows)
    out = np.empty(n, dtype=np.int64)
    for lo in range(0, n, _CHUNK):
        out[lo:lo + _CHUNK] = _take(a, rows, lo, lo + _CHUNK).argmax(1)
    return out


def _weighted_sum(probs, weights, rows=None) -> np.ndarray:
    """sum_m weights[m] * probs[m][rows] / sum(weights), float32; reads each member once, block by block."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = None
    for m in np.flatnonzero(w):
        p, wm = probs[m], np.float32(w[m])
        if out is None:
            out = np.zeros((_n_rows(p, rows), p.shape[1]), dtype=np.float32)
        for lo in range(0, len(out), _CHUNK):
            out[lo:lo + _CHUNK] += _take(p, rows, lo, lo + _CHUNK) * wm
    return out


def _top2(S) -> tuple:
    """First argmax of each row and the gap between its two largest values."""
    C = S.shape[1]
    part = np.partition(S, C - 2, axis=1)[:, C - 2:]
    return S.argmax(1), part[:, 1].astype(np.float64) - part[:, 0]


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
    if weights is not None and method not in _WEIGHTED_METHODS:
        raise FastclsError(f"Weights apply to the methods {' and '.join(_WEIGHTED_METHODS)}, not {method!r}: "
                           "use method='weighted' (or 'vote' for a weighted vote), or leave the weights out.")


# -- TTA -----------------------------------------------------------------------------------------------------------

def _beta_labels(plain, aug, grid=BETA_GRID) -> np.ndarray:
    """(len(grid), N) argmax labels of the blend at each beta, without materialising the blends."""
    out = np.empty((len(grid), len(plain)), dtype=np.int64)
    for lo in range(0, len(plain), _CHUNK):
        p, a = np.asarray(plain[lo:lo + _CHUNK]), np.asarray(aug[lo:lo + _CHUNK])
        for g, b in enumerate(grid):
            out[g, lo:lo + _CHUNK] = (p * np.float32(b) + a * np.float32(1 - b)).argmax(1)
    return out


def choose_beta(plain, aug, targets, metric: str, grid=BETA_GRID, rows=None) -> float:
    """The TTA beta from `grid` whose blend scores best on `rows` (all rows by default); the first best on ties.

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
    labels = _beta_labels(plain, aug, grid)
    y = np.asarray(targets)
    idx = slice(None) if rows is None else rows
    scorer = _LabelScorer(metric, y[idx], plain.shape[1])
    scores = [scorer.sign * scorer(lab[idx]) for lab in labels]
    return float(grid[int(np.argmax(scores))])


# -- greedy search on argmax metrics -------------------------------------------------------------------------------

_N_CAND = 16  # candidate classes per row that the greedy search works on (see `_ArgmaxSearch`)


def _candidate_classes(probs, u: int = _N_CAND) -> np.ndarray:
    """(N, u) int32 classes per row, ascending: the u most probable under the members' mean (all when C <= u)."""
    N, C = probs[0].shape
    if C <= u:
        return np.tile(np.arange(C, dtype=np.int32), (N, 1))
    mean = _weighted_sum(probs, np.ones(len(probs)))
    U = np.empty((N, u), dtype=np.int32)
    for lo in range(0, N, _CHUNK):
        U[lo:lo + _CHUNK] = np.sort(np.argpartition(mean[lo:lo + _CHUNK], C - u, axis=1)[:, C - u:], axis=1)
    return U


class _Tops(NamedTuple):
    """One member's probabilities as the greedy search reads them, for candidate classes U."""

    a1: np.ndarray  # (N,) argmax over all classes
    p1: np.ndarray  # (N,) float32 largest probability
    p2: np.ndarray  # (N,) float32 second largest (an upper bound of it when the argmax lies outside U)
    pu: np.ndarray  # (N, u) float32 probabilities of the classes U
    q: np.ndarray  # (N,) float32 largest probability outside U (0 when U holds every class)


def _member_tops(p, U) -> _Tops:
    """`_Tops` of one member's (N, C) probabilities, block by block."""
    N, C = p.shape
    u = U.shape[1]
    a1, p1, p2, q = np.empty(N, np.int64), np.empty(N, np.float32), np.empty(N, np.float32), np.zeros(N, np.float32)
    pu = np.empty((N, u), dtype=np.float32)
    for lo in range(0, N, _CHUNK):
        sl, x = slice(lo, lo + _CHUNK), np.asarray(p[lo:lo + _CHUNK])
        a1[sl] = x.argmax(1)
        p1[sl] = np.take_along_axis(x, a1[sl, None], 1)[:, 0]
        pu[sl] = np.take_along_axis(x, U[sl], 1)
        part = np.partition(pu[sl], u - 2, axis=1)
        if u < C:
            out = x.copy()
            np.put_along_axis(out, U[sl], -1.0, 1)
            q[sl] = out.max(1)
        # the second largest is exact when the largest is in U; otherwise the largest bounds it
        p2[sl] = np.where(part[:, -1] >= q[sl], np.maximum(part[:, -2], q[sl]), q[sl])
    return _Tops(a1, p1, p2, pu, q)


class _SearchData(NamedTuple):
    """What every greedy search over one set of member probabilities reads: candidate classes, per-member `_Tops`
    and their (members, rows) stacks."""

    U: np.ndarray
    tops: list
    a1: np.ndarray  # (M, N) int32
    p1: np.ndarray  # (M, N) float32
    p2: np.ndarray
    p12: np.ndarray  # p1 - p2: how much a member that agrees with a row's label widens its gap, at least


def _search_data(probs, U=None, tops=None) -> _SearchData:
    """`_SearchData` of the members' probabilities (one pass over each member unless `tops` are given)."""
    U = _candidate_classes(probs) if U is None else U
    tops = [_member_tops(p, U) for p in probs] if tops is None else tops
    p1, p2 = np.stack([t.p1 for t in tops]), np.stack([t.p2 for t in tops])
    return _SearchData(U, tops, np.stack([t.a1 for t in tops]).astype(np.int32), p1, p2, p1 - p2)


class _ArgmaxSearch:
    """Greedy moves on S = sum_m w_m P_m, scored by the metric of argmax(S) for one or more fits (row subsets).

    Two bounds keep a step cheap on 100k rows x 100 classes:
    - Rows: a move (m, c) proposes S + c * P_m. Probabilities lie in [0, 1], so a row can only change label when
      its top-2 gap is at most c * P_m's largest value, and not at all under c > 0 when member m's argmax is the
      current label. The search keeps a lower bound on each row's gap (exact when the row is recomputed, lowered
      conservatively otherwise), so a step only evaluates the rows a move can flip.
    - Classes: S is kept (float32, like the stored probabilities) on u candidate classes per row (the members'
      mean's most probable), plus an upper bound on S over all other classes (sum_m w_m * member m's largest
      probability outside them). A row is evaluated on its u classes and only read in full, from the members, when
      a class outside them could still win.
    A move is scored from bincounts of the rows it changes. Ties between classes resolve to the lower class index,
    as np.argmax does. Several fits (cross-validation folds and the fit on all rows) share one search while they
    make the same moves; `split` gives a subset of them their own copy when they differ.
    """

    def __init__(self, probs, data: _SearchData, scorers, w0):
        self.P, self.D, self.scorers = probs, data, list(scorers)
        self.U, self.u, self.C = data.U, data.U.shape[1], probs[0].shape[1]
        masks = [sc.mask for sc in self.scorers]
        self.live = None if any(m is None for m in masks) else np.logical_or.reduce(masks)  # rows any fit scores
        self.w = np.asarray(w0, dtype=np.float64).copy()
        nz = np.flatnonzero(self.w)
        # full S rows kept for rows the candidate classes cannot decide (see `_full`)
        self._slot, self._kept = np.full(len(self.U), -1), np.empty(0, np.int64)
        self._cache = np.empty((0, self.C), np.float32)
        self.SU = np.zeros(self.U.shape, np.float32)  # S on the candidate classes
        self.out = np.zeros(len(self.U))  # upper bound of S on the other classes
        for m in nz:
            self.SU += data.tops[m].pu * np.float32(self.w[m])
            self.out += self.w[m] * data.tops[m].q
        if len(nz) == 1:  # one member: its own argmax and top-2 gap, no pass needed
            m = nz[0]
            self.labels, self.glb = data.tops[m].a1.copy(), data.p12[m] * self.w[m]
        else:
            self.labels, self.glb = self._exact(np.arange(len(self.U)))
        self.dis = data.a1 != self.labels  # (members, rows): member's argmax is not the row's label
        self.fast = all(sc.counts_fn is not None for sc in self.scorers)
        if self.fast:  # per-fit counts, (fits, classes)
            self.tp, self.npred = (np.stack(a) for a in zip(*[sc.counts(self.labels) for sc in self.scorers]))
        self.scores = np.array([sc(self.labels) for sc in self.scorers])
        self._groups()
        self._pending = []

    def split(self, fits) -> "_ArgmaxSearch":
        """A copy of this search (after `propose`, before `accept`) for the fits at positions `fits`."""
        new = object.__new__(_ArgmaxSearch)
        new.__dict__.update(self.__dict__)
        for k in ("w", "SU", "out", "labels", "glb", "dis", "_slot", "_kept", "_cache"):
            setattr(new, k, getattr(self, k).copy())
        return new.keep(fits)

    def keep(self, fits) -> "_ArgmaxSearch":
        """Keep only the fits at positions `fits` (in that order); returns self."""
        fits = list(fits)
        if fits == list(range(len(self.scorers))):
            return self
        self.scorers = [self.scorers[f] for f in fits]
        masks = [sc.mask for sc in self.scorers]
        self.live = None if any(m is None for m in masks) else np.logical_or.reduce(masks)
        if self.fast:
            self.tp, self.npred = self.tp[fits], self.npred[fits]
        self.scores = self.scores[fits]
        self._groups()
        return self

    def _groups(self):
        """Rows grouped by which fits score them (for K folds: the folds), so a move's count changes are binned once
        per group and summed per fit by a small matrix product, not recounted for every fit."""
        if not self.fast:
            return
        pattern = np.zeros(len(self.U), np.int64)  # bit f set when fit f scores the row (a handful of fits)
        for f, sc in enumerate(self.scorers):
            pattern |= (np.int64(1) << f) * (True if sc.mask is None else sc.mask)
        uniq, self.group = np.unique(pattern, return_inverse=True)
        self.in_fit = ((uniq[None, :] >> np.arange(len(self.scorers))[:, None]) & 1).astype(np.float64)
        self.ntrue = np.stack([sc.ntrue for sc in self.scorers])
        self.count_fn, self.y = self.scorers[0].counts_fn, self.scorers[0].y  # one metric and target vector

    def _count_delta(self, loc, old, new):
        """(fits, classes) changes of tp and predicted counts when rows `loc` go from labels `old` to `new`."""
        G, C = self.in_fit.shape[1], self.C
        g, y = self.group[loc] * C, self.y[loc]
        dtp = np.bincount(g + y, weights=(new == y).astype(np.float64) - (old == y), minlength=G * C)
        dpred = np.bincount(g + new, minlength=G * C) - np.bincount(g + old, minlength=G * C)
        return self.in_fit @ dtp.reshape(G, C), self.in_fit @ dpred.reshape(G, C)

    def _tol(self) -> float:
        return 1e-6 * max(1.0, self.w.sum())  # float32 rounding of sums of up to w.sum() probabilities

    def _full(self, idx, m=None, c=0.0) -> np.ndarray:
        """Full rows `idx` of S (+ c * P_m), for the rows the candidate classes cannot decide.

        Such rows tend to stay undecided, so their S rows are kept (and updated by `accept`) instead of being summed
        from every member each time they are needed.
        """
        slot = self._slot[idx]
        fresh = np.unique(idx[slot < 0])
        if len(fresh):
            rows = np.zeros((len(fresh), self.C), np.float32)
            for j in np.flatnonzero(self.w):
                rows += self.P[j][fresh] * np.float32(self.w[j])
            n = len(self._kept)
            if n + len(fresh) > len(self._cache):
                grown = np.empty((max(2 * len(self._cache), n + len(fresh)), self.C), np.float32)
                grown[:n] = self._cache[:n]
                self._cache = grown
            self._cache[n:n + len(fresh)] = rows
            self._slot[fresh] = np.arange(n, n + len(fresh))
            self._kept = np.concatenate([self._kept, fresh])
            slot = self._slot[idx]
        out = self._cache[slot]
        if m is not None:
            out += self.P[m][idx] * np.float32(c)
        return out

    def _exact(self, idx):
        """Labels and top-2 gap lower bounds of rows `idx` under the current S."""
        X = self.SU.take(idx, 0)
        slot = X.argmax(1)
        part = np.partition(X, self.u - 2, axis=1)
        s1, s2, o = part[:, -1].astype(np.float64), part[:, -2], self.out.take(idx)
        labels = self.U.reshape(-1).take(idx * self.u + slot).astype(np.int64)
        gap = s1 - np.maximum(s2, o)
        unsure = np.flatnonzero(s1 <= o + self._tol())  # a class outside U may be as large: read those in full
        if len(unsure):
            labels[unsure], gap[unsure] = _top2(self._full(idx[unsure]))
        return labels, gap

    def _new_labels(self, m, c, idx, tol) -> np.ndarray:
        """argmax(S + c * P_m) on rows `idx`."""
        t = self.D.tops[m]
        X = self.SU.take(idx, 0)
        X += t.pu.take(idx, 0) if c == 1 else t.pu.take(idx, 0) * np.float32(c)  # as `accept` adds: labels agree
        slot = X.argmax(1)  # U is ascending per row, so the first max is the lowest class, as np.argmax picks
        best = X.reshape(-1).take(np.arange(len(idx)) * self.u + slot)
        new = self.U.reshape(-1).take(idx * self.u + slot).astype(np.int64)
        unsure = np.flatnonzero(best <= self.out.take(idx) + max(c, 0.0) * t.q.take(idx) + tol)
        if len(unsure):
            new[unsure] = self._full(idx[unsure], m, c).argmax(1)
        return new

    def propose(self, moves) -> np.ndarray:
        """(moves, fits) metric of argmax(S + c * P_m) on each fit's rows for each move (m, c)."""
        tol = self._tol()
        tie = self.glb <= tol
        ctx = (tie if self.live is None else tie & self.live, self.glb - tol, tol)
        done = [self._score_move(m, c, *ctx) for m, c in moves]
        self._pending = [(m, c, loc) for (m, c), (_, loc) in zip(moves, done)]
        return np.array([sc for sc, _ in done]).reshape(len(moves), len(self.scorers))

    def _score_move(self, m, c, tie, floor, tol):
        # contiguous passes over all rows: cheaper than gathering a candidate subset first
        if c > 0:  # gains at most c * P_m[j] on another class j, and only where member m prefers another class
            act = self.dis[m] & ((self.D.p1[m] if c == 1 else c * self.D.p1[m]) >= floor)
        else:  # loses at most |c| * P_m[top]; P_m[top] <= p2 when member m prefers another class
            act = -c * np.where(self.dis[m], self.D.p2[m], self.D.p1[m]) >= floor
        if self.live is not None:
            act &= self.live
        loc = np.flatnonzero(act | tie)
        new = self._new_labels(m, c, loc, tol)
        if self.fast:
            old = self.labels[loc]
            chg = new != old  # most evaluated rows keep their label and change no count
            dtp, dpred = self._count_delta(loc[chg], old[chg], new[chg])
            return self.count_fn(self.tp + dtp, self.npred + dpred, self.ntrue), loc
        full = self.labels.copy()
        full[loc] = new
        return [sc(full) for sc in self.scorers], loc

    def accept(self, k: int) -> None:
        """Apply the k-th move of the last `propose`."""
        m, c, loc = self._pending[k]
        t = self.D.tops[m]
        if c == 1:
            self.SU += t.pu
        else:
            self.SU += t.pu * np.float32(c)
        self.w[m] += c
        if len(self._kept):
            self._cache[:len(self._kept)] += self.P[m][self._kept] * np.float32(c)
        if c > 0:
            self.out += c * t.q
        else:  # recomputed, not updated: sum_m w_m q_m bounds S outside U only because every w_m >= 0
            self.out = np.zeros(len(self.U))
            for j in np.flatnonzero(self.w):
                self.out += self.w[j] * self.D.tops[j].q
        # rows outside `loc` keep their label; lower their gap bound by the most this move can have closed it
        if c > 0:
            self.glb += c * np.where(self.dis[m], -self.D.p1[m], self.D.p12[m])
        else:
            self.glb += c * np.where(self.dis[m], self.D.p2[m], self.D.p1[m])
        new, gap = self._exact(loc)
        if self.fast:
            chg = new != self.labels[loc]
            dtp, dpred = self._count_delta(loc[chg], self.labels[loc][chg], new[chg])
            self.tp, self.npred = self.tp + dtp, self.npred + dpred
        self.labels[loc], self.glb[loc] = new, gap
        self.dis[:, loc] = self.D.a1[:, loc] != new
        self.scores = (self.count_fn(self.tp, self.npred, self.ntrue) if self.fast
                       else np.array([sc(self.labels) for sc in self.scorers]))
        self._pending = []


def _branch(search, fits, choice):
    """Split `search` by the fits' choices (one per fit; None = no move): [(search, fit positions, choice)]."""
    groups = {}
    for f, ch in zip(fits, choice):
        groups.setdefault(ch, []).append(f)
    out = []
    for i, (ch, members) in enumerate(groups.items()):
        pos = [fits.index(f) for f in members]
        last = i == len(groups) - 1  # the last group takes over the search itself
        out.append((search.keep(pos) if last else search.split(pos), members, ch))
    return out


def _fit_hill(probs, data: _SearchData, scorers, steps: int):
    """Caruana et al. (2004) forward selection with replacement from the best single member, for each scorer (fit);
    each fit keeps its best prefix, so it never scores below its best single member. Fits that pick the same
    members share one search. Returns [(weights, fit score)] per scorer."""
    M, s = len(probs), scorers[0].sign
    best = [int(np.argmax([s * sc(t.a1) for t in data.tops])) for sc in scorers]
    seqs, paths = [[b] for b in best], [[] for _ in scorers]
    work = []
    for b in dict.fromkeys(best):
        fits = [f for f in range(len(scorers)) if best[f] == b]
        work.append((_ArgmaxSearch(probs, data, [scorers[f] for f in fits], np.eye(M)[b]), fits))
    for search, fits in work:
        for j, f in enumerate(fits):
            paths[f].append(search.scores[j])
    moves = [(m, 1.0) for m in range(M)]
    for _ in range(steps):
        nxt = []
        for search, fits in work:
            choice = (s * search.propose(moves)).argmax(0)
            for srch, sub, k in _branch(search, fits, [int(c) for c in choice]):
                srch.accept(k)
                for j, f in enumerate(sub):
                    seqs[f].append(k)
                    paths[f].append(srch.scores[j])
                nxt.append((srch, sub))
        work = nxt
    out = []
    for seq, path in zip(seqs, paths):
        t = int(np.argmax(s * np.asarray(path)))  # the first best prefix
        counts = np.bincount(seq[:t + 1], minlength=M).astype(np.float64)
        out.append((counts / counts.sum(), path[t]))
    return out


def _fit_weights(probs, data: _SearchData, scorers, rounds: int = 100, min_step: float = 1 / 64):
    """Coordinate pattern search on the simplex from equal weights, for each scorer (fit): move one weight up or
    down by `step`, take the best strict improvement, halve the step when none improves. Fits that take the same
    moves share one search. Returns [(weights, fit score)] per scorer."""
    M, s = len(probs), scorers[0].sign
    if M == 1:
        return [(np.ones(1), sc(data.tops[0].a1)) for sc in scorers]
    out = [None] * len(scorers)
    work = [(_ArgmaxSearch(probs, data, scorers, np.ones(M)), list(range(len(scorers))), 0.5, 0)]
    while work:
        search, fits, step, rounds_done = work.pop()
        w = search.w
        if step < min_step or rounds_done >= rounds:
            for j, f in enumerate(fits):
                out[f] = (w / w.sum(), search.scores[j])
            continue
        moves = [(m, step) for m in range(M)]
        moves += [(m, -min(step, w[m])) for m in range(M) if w[m] > 0 and w.sum() - min(step, w[m]) > 0]
        scores = s * search.propose(moves)
        best = scores.argmax(0)
        choice = [int(k) if scores[k, j] > s * search.scores[j] + 1e-12 else None for j, k in enumerate(best)]
        for srch, sub, k in _branch(search, fits, choice):
            if k is None:
                work.append((srch, sub, step / 2, rounds_done + 1))
            else:
                srch.accept(k)  # a downward move is at most the whole weight, so it leaves w >= 0 exactly
                work.append((srch, sub, step, rounds_done + 1))
    return out


def _search_many(method, probs, y, metric, rows_list, hill_steps, data: Optional[_SearchData] = None):
    """Fit 'hill' or 'weighted' on each row subset of `rows_list` (None = all rows) at once; [(weights, score)]."""
    data = _search_data(probs) if data is None else data
    C, N = probs[0].shape[1], len(probs[0])
    masks = []
    for rows in rows_list:
        mask = None
        if rows is not None:
            mask = np.zeros(N, dtype=bool)
            mask[rows] = True
        masks.append(mask)
    scorers = [_LabelScorer(metric, y, C, mask) for mask in masks]
    if C < 2:  # one class: every combination predicts it
        return [(np.full(len(probs), 1 / len(probs)), sc(np.zeros(N, np.int64))) for sc in scorers]
    if method == "hill":
        return _fit_hill(probs, data, scorers, hill_steps)
    return _fit_weights(probs, data, scorers)


# -- combiners -----------------------------------------------------------------------------------------------------

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
        if self.method in ("mean", "weighted", "hill"):
            return _weighted_sum(probs_list, self.weights, rows)
        if self.method == "rank":
            return _rank_mean(probs_list, rows)
        if self.method == "vote":
            return _vote(probs_list, self.weights, rows)
        return _stack_predict(self.model, probs_list, rows, self.n_classes)


def _rank_mean(probs, rows=None) -> np.ndarray:
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


def _vote(probs, weights, rows=None) -> np.ndarray:
    """Weighted fractions of members voting for each class; ties broken by the mean probability."""
    votes = mean = None
    for m, p in enumerate(probs):
        if votes is None:
            n = _n_rows(p, rows)
            votes, mean = np.zeros((n, p.shape[1]), dtype=np.float64), np.zeros((n, p.shape[1]), dtype=np.float32)
        for lo in range(0, n, _CHUNK):
            x = _take(p, rows, lo, lo + _CHUNK)
            votes[lo + np.arange(len(x)), x.argmax(1)] += weights[m]
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
            score = scorer.sign * scorer(lr.classes_[lr.predict_proba(X[hold]).argmax(1)])
            if score > best:  # ties keep the stronger regularisation
                best_C, best = c, score
    if not hasattr(lr, "classes_") or len(lr.classes_) != len(np.unique(y)):
        lr = LogisticRegression(max_iter=300, random_state=seed)  # a class only in the holdout: start afresh
    return make_pipeline(scaler, lr.set_params(C=best_C).fit(X, y))


def _stack_predict(model, probs, rows, C) -> np.ndarray:
    X = _stack_features(probs, rows)
    out = np.zeros((len(X), C), dtype=np.float32)
    if isinstance(model, (int, np.integer)):  # only one class in the fitted rows
        out[:, int(model)] = 1
    else:  # the model only knows the classes present in its training rows
        out[:, model.classes_] = model.predict_proba(X)
    return out


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


def _needs_search(method: str, weights) -> bool:
    """Whether `method` fits weights by the greedy argmax search."""
    return method == "hill" or (method == "weighted" and weights is None)


def _fits(method: str, weights) -> bool:
    """Whether `method` fits anything on validation labels (then it is scored by cross-validation)."""
    return method == "stack" or _needs_search(method, weights)


def _fit(method, probs_list, targets, metric, weights, rows, seed, hill_steps, score_fit=True):
    """`fit_combiner`, with an option to skip scoring the fit."""
    _check_method(method, weights)
    if len(probs_list) == 0:
        raise FastclsError("No member probabilities to combine.")
    M, C = len(probs_list), probs_list[0].shape[1]
    needs_fit = _fits(method, weights)
    if needs_fit and (targets is None or (metric is None and method != "stack")):
        raise FastclsError(f"Method {method!r} fits on validation labels: pass targets and a metric.")
    w = _normalise_weights(weights, M) if weights is not None else np.full(M, 1.0 / M)
    y = None if targets is None else np.asarray(targets, dtype=np.int64)
    yr = None if y is None else (y if rows is None else y[rows])
    scorer = _LabelScorer(metric, yr, C) if (metric is not None and y is not None) else None
    if needs_fit and method != "stack":
        (w, fit_score), = _search_many(method, probs_list, y, metric, [rows], hill_steps)
        return Combiner(method, C, weights=w, fit_score=fit_score)
    comb = Combiner(method, C, weights=w if method != "stack" else None)
    if method == "stack":
        classes = np.unique(yr)
        if len(classes) < 2:
            comb.model = int(classes[0])
        else:
            comb.model = _fit_stack(_stack_features(probs_list, rows), yr, metric or "accuracy", C, seed)
    if scorer is not None and score_fit:
        comb.fit_score = scorer(_argmax(comb.apply(probs_list, rows)))
    return comb


def combine(probs_list: Sequence, method: str = "mean", targets=None, metric: Optional[str] = None, weights=None,
            seed: int = 0, hill_steps: int = 50) -> np.ndarray:
    """Fit `method` on all rows and return the combined (N, C) float32 probabilities.

    Args:
        probs_list: one (N, C) probability array per member, rows in the same order.
        method: 'mean', 'weighted', 'rank', 'vote', 'hill' or 'stack'.
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
    C = probs_list[0].shape[1]
    if _needs_search(method, weights):  # all folds in one joint search (see `_ArgmaxSearch`)
        _check_method(method, weights)
        trains = [np.flatnonzero(fold != k) for k in range(int(fold.max()) + 1)]
        fitted = _search_many(method, probs_list, y, metric, trains, hill_steps)
        return _cv_predict(len(y), C, fold, lambda k, train, held: Combiner(method, C, weights=fitted[k][0])
                           .apply(probs_list, held)), fold

    def fit_apply(k, train, held):
        comb = _fit(method, probs_list, y, metric, weights, train, seed, hill_steps, score_fit=False)
        return comb.apply(probs_list, held)

    return _cv_predict(len(y), C, fold, fit_apply), fold


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
    la = _argmax(np.asarray(a)) if np.ndim(a) == 2 else np.asarray(a, dtype=np.int64)
    lb = _argmax(np.asarray(b)) if np.ndim(b) == 2 else np.asarray(b, dtype=np.int64)
    m = get_metric(metric)
    sign = 1.0 if m.higher_is_better else -1.0
    C = int(max(y.max(), la.max(), lb.max())) + 1
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


# -- reading members from the store -----------------------------------------------------------------------------

def _run_label(run: StoredRun) -> str:
    return f"{run.id} ({run.name})" if run.name and run.name != run.id else run.id


def _examples(ids, k: int = 3) -> str:
    ids = sorted(ids)
    return ", ".join(repr(i) for i in ids[:k]) + (", ..." if len(ids) > k else "")


def _alignment(ref_ids: list, ids: list, run: StoredRun, ref: StoredRun, split: str):
    """Permutation that puts `run`'s rows in `ref`'s item order (None when already equal)."""
    if len(set(ids)) != len(ids):
        raise FastclsError(f"Run {_run_label(run)} lists some {split} item ids more than once; rows cannot be "
                           "aligned by id.")
    if ids == ref_ids:
        return None
    if set(ids) != set(ref_ids):
        only_ref, only_run = set(ref_ids) - set(ids), set(ids) - set(ref_ids)
        raise FastclsError(
            f"Runs {_run_label(ref)} and {_run_label(run)} have different {split} items ({len(ref_ids)} vs "
            f"{len(ids)}): {len(only_ref)} only in {ref.id} ({_examples(only_ref)}), {len(only_run)} only in "
            f"{run.id} ({_examples(only_run)}). Ensemble runs that share a validation split (same recipe split, "
            "fold and seed).")
    pos = {i: k for k, i in enumerate(ids)}
    return np.fromiter((pos[i] for i in ref_ids), dtype=np.int64, count=len(ref_ids))


def _checked_views(run: StoredRun, split: str, arr, ids: Callable[[], list], order):
    """(plain, mean of TTA views or None), aligned; every view is checked for NaN and row sums block by block."""
    V, N, _ = arr.shape
    aug = np.zeros(arr.shape[1:], dtype=np.float32) if V > 1 else None
    for v in range(V):
        for lo in range(0, N, _CHUNK):
            x = arr[v, lo:lo + _CHUNK]
            err = np.abs(x.sum(1) - 1)  # NaN or inf anywhere in a row makes its sum NaN or inf: one pass checks both
            if not err.max(initial=0) <= _SUM_TOL:
                bad = ~np.isfinite(x).all(1)
                i = int(np.argmax(bad)) if bad.any() else int(np.nanargmax(err))
                what = "contain NaN or infinite values" if bad.any() else \
                    f"have rows that do not sum to 1 (sum {x[i].sum(dtype=np.float64):.4g})"
                raise FastclsError(f"Run {_run_label(run)}: stored {split} probabilities (view {v}) {what}, first at "
                                   f"item {ids()[lo + i]!r}. Predict that run again or leave it out of the ensemble.")
            if v > 0:
                aug[lo:lo + _CHUNK] += x
    plain = arr[0] if order is None else arr[0][order]
    if aug is not None:
        aug /= np.float32(V - 1)
        if order is not None:
            aug = aug[order]
    return plain, aug


class _Member:
    """One run's aligned validation probabilities: the plain view and the TTA mean, with blends and tops cached."""

    def __init__(self, run: StoredRun, order, test_order=None):
        self.run, self.order, self.test_order = run, order, test_order
        self.plain, self.aug = _checked_views(run, "validation", run.valid_probs, lambda: run.valid_ids, order)
        self._blend, self._tops = (None, None), {}

    def probs(self, beta):
        if self.aug is None or beta in (0, 1, None):
            return lerp_blend(self.plain, self.aug, 1 if beta is None else beta)
        if self._blend[0] != beta:
            self._blend = (None, None)  # one materialised blend per member at a time
            self._blend = (beta, lerp_blend(self.plain, self.aug, beta))
        return self._blend[1]

    def tops(self, beta, U):
        """`_member_tops` of the blend at `beta` for candidate classes U (U is fixed for one ensemble call)."""
        key = None if self.aug is None else beta
        if key not in self._tops:
            self._tops[key] = _member_tops(self.probs(beta), U)
        return self._tops[key]

    def labels(self, beta) -> np.ndarray:
        return _argmax(self.probs(beta))

    def test(self, beta):
        plain, aug = _checked_views(self.run, "test", self.run.test_probs, lambda: self.run.test_ids, self.test_order)
        return lerp_blend(plain, aug, 1 if beta is None else beta)


class _Lazy(Sequence):
    """A sequence whose items are computed on access: each member's test blend, read once by `Combiner.apply`."""

    def __init__(self, n: int, fn: Callable[[int], np.ndarray]):
        self.n, self.fn = n, fn

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.fn(i)


def check_runs(runs: Sequence[StoredRun]) -> tuple[str, list, str]:
    """(recipe, vocab, metric) that the stored `runs` share; a clear error when their recipe, vocab (classes and
    their order) or metric differ, before any probabilities are combined."""
    ref = runs[0]
    recipe, vocab = ref.config.get("recipe"), list(ref.vocab)
    metric = ref.config.get("metric") or ref.metrics.get("metric_name")
    for run in runs[1:]:
        if run.config.get("recipe") != recipe:
            raise FastclsError(f"Runs come from different recipes: {_run_label(ref)} is {recipe!r}, "
                               f"{_run_label(run)} is {run.config.get('recipe')!r}. Ensemble runs of one recipe.")
        other = list(run.vocab)
        if other != vocab:
            if sorted(map(str, other)) == sorted(map(str, vocab)):
                moved = [str(c) for i, c in enumerate(vocab) if other[i] != c]
                raise FastclsError(f"Runs {_run_label(ref)} and {_run_label(run)} have the same classes in a "
                                   f"different order (e.g. {', '.join(moved[:3])}); their probability columns "
                                   "do not match.")
            a, b = set(map(str, vocab)) - set(map(str, other)), set(map(str, other)) - set(map(str, vocab))
            raise FastclsError(f"Runs {_run_label(ref)} and {_run_label(run)} have different vocabularies "
                               f"({len(vocab)} vs {len(other)} classes; only in {ref.id}: {_examples(a) or '-'}; "
                               f"only in {run.id}: {_examples(b) or '-'}).")
        m = run.config.get("metric") or run.metrics.get("metric_name")
        if m != metric:
            raise FastclsError(f"Runs are scored with different metrics: {_run_label(ref)} uses {metric!r}, "
                               f"{_run_label(run)} uses {m!r}.")
    if metric is None:
        raise FastclsError(f"Run {_run_label(ref)} records no metric (config 'metric' or metrics 'metric_name').")
    get_metric(metric)
    return recipe, vocab, metric


def aligned_probs(runs: Sequence[StoredRun], split: str = "test", beta: float = 0.25) -> tuple[list, np.ndarray]:
    """The mean over `runs` of their TTA-blended stored probabilities on `split` ('test' or 'valid'), rows aligned
    by item id to the first run: (item ids, (N, C) probabilities). For teachers (`fastcls.student`).

    Raises:
        FastclsError: the runs differ in recipe, vocab or metric (`check_runs`); a run has no probabilities on
            `split`; the runs hold different items; stored probabilities that are not finite rows summing to 1.
    """
    check_runs(runs)
    name = "validation" if split == "valid" else "test"
    for run in runs:
        if getattr(run, f"{split}_probs") is None:
            raise FastclsError(f"Run {_run_label(run)} has no stored {name} probabilities (its data had no "
                               f"{name} items), so it cannot teach. Give runs trained on data with {name} items.")
    ref_ids = [str(i) for i in getattr(runs[0], f"{split}_ids")]
    probs = []
    for run in runs:
        ids = [str(i) for i in getattr(run, f"{split}_ids")]
        order = _alignment(ref_ids, ids, run, runs[0], name)
        plain, aug = _checked_views(run, name, getattr(run, f"{split}_probs"), lambda: ids, order)
        probs.append(lerp_blend(plain, aug, beta))
    return ref_ids, combine(probs, "mean")


def _load_members(store: RunStore, refs: Sequence[str]):
    """Load and cross-check the runs; returns (members, runs, metric, targets, valid_ids, test_ids or None)."""
    if not refs:
        raise FastclsError("No runs to ensemble: give at least one run id or name (list them with `fastcls runs`).")
    runs = [store.load(r) for r in refs]
    ref = runs[0]
    recipe, vocab, metric = check_runs(runs)
    ref_ids = [str(i) for i in ref.valid_ids]
    targets = np.asarray(ref.valid_targets, dtype=np.int64)
    with_test = all(r.test_probs is not None for r in runs)
    ref_test = [str(i) for i in ref.test_ids] if with_test else None
    orders, test_orders = [], []
    for run in runs:
        shape = run.valid_probs.shape
        if len(shape) != 3 or shape[2] != len(vocab) or shape[1] != len(run.valid_ids):
            raise FastclsError(f"Run {_run_label(run)}: stored validation probabilities have shape {shape}; expected "
                               f"(views, {len(run.valid_ids)} items, {len(vocab)} classes).")
        order = _alignment(ref_ids, [str(i) for i in run.valid_ids], run, ref, "validation")
        t = np.asarray(run.valid_targets, dtype=np.int64)
        t = t if order is None else t[order]
        if (t != targets).any():
            bad = np.flatnonzero(t != targets)
            raise FastclsError(f"Runs {_run_label(ref)} and {_run_label(run)} disagree on the labels of {len(bad)} "
                               f"validation items (e.g. {ref_ids[bad[0]]!r}: {vocab[targets[bad[0]]]!r} vs "
                               f"{vocab[t[bad[0]]]!r}).")
        orders.append(order)
        if with_test and (run.test_probs.ndim != 3 or run.test_probs.shape[1:] != (len(run.test_ids), len(vocab))):
            raise FastclsError(f"Run {_run_label(run)}: stored test probabilities have shape {run.test_probs.shape}; "
                               f"expected (views, {len(run.test_ids)} items, {len(vocab)} classes).")
        test_orders.append(_alignment(ref_test, [str(i) for i in run.test_ids], run, ref, "test")
                           if with_test else None)
        # drop the runs' cached id lists (cached_property: read again if an error needs them); 100k ids are some
        # 6 MB of str objects per run
        vars(run).pop("valid_ids", None)
        vars(run).pop("test_ids", None)
    members = [_Member(run, o, to) for run, o, to in zip(runs, orders, test_orders)]
    return members, runs, metric, targets, ref_ids, ref_test


# -- the ensemble entry point --------------------------------------------------------------------------------------

@dataclass
class EnsembleResult:
    """What `ensemble` stored and how it scored.

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


def ensemble(store: RunStore, refs: list[str], method: str = "mean", tta_beta: Optional[float] = None,
             weights: Optional[list[float]] = None, name: Optional[str] = None, seed: int = 0, hill_steps: int = 50,
             n_boot: int = 1000, folds: int = 5) -> EnsembleResult:
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

    Returns:
        An `EnsembleResult`; its `table` has one row per member and one for the ensemble, with the metric score,
        how it was evaluated ('cv-K' or 'direct'), the in-sample `fit_score`, each member's beta and weight, and the
        ensemble's gain over the best member with its bootstrap interval.
    """
    t0 = time.perf_counter()
    _check_method(method, weights)
    if tta_beta is not None and not 0 <= tta_beta <= 1:
        raise FastclsError(f"tta_beta is the weight of the plain view and must lie in [0, 1]; got {tta_beta}.")
    if weights is not None:
        _normalise_weights(weights, len(refs))
    members, runs, metric, y, valid_ids, test_ids = _load_members(store, refs)
    M, N, C = len(members), len(y), members[0].plain.shape[1]
    scorer = _LabelScorer(metric, y, C)
    s = scorer.sign

    # TTA betas: fixed, absent (one view) or chosen per run (then per fold for the honest estimate)
    choose = [m.aug is not None and tta_beta is None for m in members]
    fits = _fits(method, weights) or any(choose)
    fold = kfold_indices(y, min(folds, N), seed) if fits else None
    K = 0 if fold is None else int(fold.max()) + 1
    betas = [None if m.aug is None else tta_beta for m in members]
    fold_betas = np.array([[b] * K for b in betas], dtype=object).reshape(M, K)
    member_score, member_fit, member_labels = np.empty(M), np.empty(M), []
    for i, mem in enumerate(members):
        if choose[i]:
            labels = _beta_labels(mem.plain, mem.aug)
            sc = np.array([[s * _LabelScorer(metric, y[fold != k], C)(lab[fold != k]) for lab in labels]
                           for k in range(K)])
            picks = sc.argmax(1)
            fold_betas[i] = [BETA_GRID[g] for g in picks]
            oof = np.empty(N, dtype=np.int64)
            for k in range(K):
                oof[fold == k] = labels[picks[k], fold == k]
            full = int(np.argmax([s * scorer(lab) for lab in labels]))
            betas[i] = BETA_GRID[full]
            member_score[i], member_fit[i] = scorer(oof), scorer(labels[full])
            member_labels.append(oof)
        else:
            lab = mem.labels(betas[i])
            member_score[i] = member_fit[i] = scorer(lab)
            member_labels.append(lab)

    # out-of-fold predictions of the whole procedure (betas included), then the fit on all rows
    probs = [mem.probs(b) for mem, b in zip(members, betas)]
    oof_probs = None
    if _needs_search(method, weights):
        # the fits whose members use the same betas (usually all folds and the fit on all rows) are searched jointly;
        # candidate classes only change the search's speed, never its result, so one set serves them all
        U = _candidate_classes(probs)
        keys = [tuple(fold_betas[:, k]) for k in range(K)] + [tuple(betas)]
        rows_list = [np.flatnonzero(fold != k) for k in range(K)] + [None]
        fitted = [None] * (K + 1)
        for key in dict.fromkeys(keys):
            ids = [i for i, other in enumerate(keys) if other == key]
            kprobs = [mem.probs(b) for mem, b in zip(members, key)]
            data = _search_data(kprobs, U, [mem.tops(b, U) for mem, b in zip(members, key)])
            for i, res in zip(ids, _search_many(method, kprobs, y, metric, [rows_list[i] for i in ids], hill_steps,
                                                data)):
                fitted[i] = res
        oof_probs = _cv_predict(N, C, fold, lambda k, train, held: Combiner(method, C, weights=fitted[k][0]).apply(
            [mem.probs(b) for mem, b in zip(members, fold_betas[:, k])], held))
        comb = Combiner(method, C, weights=fitted[K][0], fit_score=fitted[K][1])
    else:
        if fits:
            def fit_apply(k, train, held):
                fprobs = [mem.probs(b) for mem, b in zip(members, fold_betas[:, k])]
                return _fit(method, fprobs, y, metric, weights, train, seed, hill_steps, score_fit=False).apply(
                    fprobs, held)

            oof_probs = _cv_predict(N, C, fold, fit_apply)
        comb = _fit(method, probs, y, metric, weights, None, seed, hill_steps, score_fit=False)
    valid_probs = comb.apply(probs)
    del probs
    test_probs = None
    if test_ids is not None:
        test_probs = comb.apply(_Lazy(M, lambda i: members[i].test(betas[i])))

    evaluated = f"cv-{K}" if fits else "direct"
    stored = oof_probs if oof_probs is not None else valid_probs
    ens_labels = _argmax(stored)
    score, fit_score = scorer(ens_labels), scorer(_argmax(valid_probs))
    best = int(np.argmax(s * member_score))
    gain, lo, hi = paired_bootstrap(y, ens_labels, member_labels[best], metric, n_boot, seed)

    member_ids = [r.id for r in runs]
    w_out = None if comb.weights is None or method == "rank" else [float(x) for x in comb.weights]
    config = {"recipe": runs[0].config.get("recipe"), "arch": "ensemble", "method": method, "members": member_ids,
              "metric": metric, "tta_beta": betas, "weights": w_out, "seed": seed, "folds": K or None}
    if method == "hill":
        config["hill_steps"] = hill_steps
    metrics = {"metric_name": metric, metric: score, f"fit_{metric}": fit_score, "evaluated": evaluated,
               "gain": gain, "gain_lo": lo, "gain_hi": hi, "best_member": member_ids[best]}
    run_id = store.save(RunData(
        config=config, vocab=list(runs[0].vocab), valid_probs=stored[None], valid_targets=y, valid_ids=valid_ids,
        metrics=metrics, test_probs=None if test_probs is None else test_probs[None], test_ids=test_ids,
        kind="ensemble", name=name, seconds=time.perf_counter() - t0,
        extra={"ensemble": {"members": member_ids, "valid_probs": "out-of-fold" if fits else "fitted on all rows",
                            "member_scores": member_score.tolist(), "member_evaluated":
                                [f"cv-{K}" if c else "direct" for c in choose]}}))

    rows = [{"kind": "member", "id": r.id, "name": r.name, "arch": r.config.get("arch"), "method": None,
             "beta": np.nan if b is None else b, "weight": np.nan if w_out is None else w_out[i], "metric": metric,
             "score": member_score[i],
             "fit_score": member_fit[i], "evaluated": f"cv-{K}" if choose[i] else "direct",
             "gain": np.nan, "gain_lo": np.nan, "gain_hi": np.nan}
            for i, (r, b) in enumerate(zip(runs, betas))]
    rows.append({"kind": "ensemble", "id": run_id, "name": store.resolve(run_id)["name"], "arch": "ensemble",
                 "method": method, "beta": np.nan, "weight": np.nan, "metric": metric, "score": score,
                 "fit_score": fit_score, "evaluated": evaluated, "gain": gain, "gain_lo": lo, "gain_hi": hi})
    return EnsembleResult(run_id=run_id, table=pd.DataFrame(rows), method=method, metric=metric, score=score,
                          evaluated=evaluated, weights=w_out, betas=betas, valid_ids=valid_ids,
                          valid_probs=valid_probs, oof_probs=oof_probs, test_ids=test_ids, test_probs=test_probs)
