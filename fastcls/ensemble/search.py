"""Greedy searches for member weights that optimise a metric of the argmax (or, `_ProbSearch`, of the probabilities): Caruana et al. (2004) hill climbing
(`_fit_hill`) and coordinate search on the simplex (`_fit_weights`), both driven by `_ArgmaxSearch`.

Speed: `_ArgmaxSearch` evaluates a move only on the rows and classes it can change and scores it from bincounts,
and several fits (the K cross-validation folds and the fit on all rows) run as one search for as long as they make
the same moves.
"""

from typing import NamedTuple, Optional

import numpy as np

from .scoring import _CHUNK, _LabelScorer, _release, _weighted_sum

__all__ = []  # internal to the ensemble package: `fastcls.ensemble.combiners` fits 'hill' and 'weighted' with it

_N_CAND = 16  # candidate classes per row that the greedy search works on (see `_ArgmaxSearch`)


def _top2(S) -> tuple:
    """First argmax of each row and the gap between its two largest values."""
    C = S.shape[1]
    part = np.partition(S, C - 2, axis=1)[:, C - 2:]
    return S.argmax(1), part[:, 1].astype(np.float64) - part[:, 0]


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
    _release(p)
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


class _ProbSearch:
    """`_ArgmaxSearch`'s moves for a probability metric (log loss, AUC, MAP@k): S = sum_m w_m P_m is kept in full
    and a move scores the metric of the normalised S + c * P_m on each fit's rows. No bounds to exploit (every row's
    probabilities matter), so a step costs one pass over the members' probabilities per move."""

    def __init__(self, probs, scorers, w0):
        self.P, self.scorers = probs, list(scorers)
        self.w = np.asarray(w0, dtype=np.float64).copy()
        self.S = _weighted_sum(probs, self.w) * np.float32(self.w.sum())
        self.scores = np.array([sc(self.S / self.w.sum()) for sc in self.scorers])
        self._pending = []

    def split(self, fits) -> "_ProbSearch":
        new = object.__new__(_ProbSearch)
        new.__dict__.update(self.__dict__)
        new.w, new.S = self.w.copy(), self.S.copy()
        return new.keep(fits)

    def keep(self, fits) -> "_ProbSearch":
        fits = list(fits)
        self.scorers, self.scores = [self.scorers[f] for f in fits], self.scores[fits]
        return self

    def propose(self, moves) -> np.ndarray:
        out = []
        self._pending = []
        for m, c in moves:
            new = self.S + np.asarray(self.P[m], dtype=np.float32) * np.float32(c)
            total = self.w.sum() + c
            out.append([sc(new / total) for sc in self.scorers])
            self._pending.append((m, c))
        return np.array(out).reshape(len(moves), len(self.scorers))

    def accept(self, k: int) -> None:
        m, c = self._pending[k]
        self.S += np.asarray(self.P[m], dtype=np.float32) * np.float32(c)
        self.w[m] += c
        self.scores = np.array([sc(self.S / self.w.sum()) for sc in self.scorers])
        self._pending = []


def _new_search(probs, data, scorers, w0):
    """The greedy search for these scorers: `_ProbSearch` for a probability metric, `_ArgmaxSearch` otherwise."""
    if scorers[0].needs_probs:
        return _ProbSearch(probs, scorers, w0)
    return _ArgmaxSearch(probs, data, scorers, w0)


def _member_preds(probs, data, sc):
    """What scorer `sc` reads of each member alone: its argmax labels, or its probabilities."""
    return list(probs) if sc.needs_probs else [t.a1 for t in data.tops]


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
    best = [int(np.argmax([s * sc(x) for x in _member_preds(probs, data, sc)])) for sc in scorers]
    seqs, paths = [[b] for b in best], [[] for _ in scorers]
    work = []
    for b in dict.fromkeys(best):
        fits = [f for f in range(len(scorers)) if best[f] == b]
        work.append((_new_search(probs, data, [scorers[f] for f in fits], np.eye(M)[b]), fits))
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
        return [(np.ones(1), sc(_member_preds(probs, data, sc)[0])) for sc in scorers]
    out = [None] * len(scorers)
    work = [(_new_search(probs, data, scorers, np.ones(M)), list(range(len(scorers))), 0.5, 0)]
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
        return [(np.full(len(probs), 1 / len(probs)), sc(np.ones((N, 1)) if sc.needs_probs else np.zeros(N, np.int64)))
                for sc in scorers]
    if method == "hill":
        return _fit_hill(probs, data, scorers, hill_steps)
    return _fit_weights(probs, data, scorers)

