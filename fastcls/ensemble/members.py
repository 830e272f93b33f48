"""Stored runs as ensemble members: cross-checking runs (recipe, vocab, metric, items, labels), aligning their rows
by item id, checking stored probabilities, and each member's view of them (plain view, TTA mean, blends).

Probabilities stay memory-mapped; a member materialises at most one blend at a time. When the members' in-memory
copies (TTA means, re-ordered rows, blends) would exceed the memory budget (`fastcls.budget.memory_budget`,
`$FASTCLS_MEMORY_BUDGET`), no member holds any: each view is a `_Rows` that computes the rows asked for from the
memory-mapped file, with the same arithmetic, so the results are identical and memory stays flat in the number of
runs.
"""

__all__ = ["check_runs", "aligned_probs"]

from typing import Callable, Optional, Sequence

import numpy as np

from ..budget import memory_budget
from ..errors import FastclsError
from ..metrics import get_metric
from ..predict import lerp_blend, run_tta_beta
from ..runs import RunStore, StoredRun
from .combiners import combine
from .scoring import _CHUNK, _argmax, _release
from .search import _member_tops

_SUM_TOL = 1e-3  # same tolerance as the store's own check when a run is saved


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


class _Rows:
    """A member's (N, C) float32 probabilities computed on access from its memory-mapped (V, N, C) array: the plain
    view, the mean of the TTA views, or their blend at `beta`, rows in the reference order (`order`). Indexing with a
    slice or an index array reads only those rows; `np.asarray` builds the whole array block by block. The arithmetic
    is `_checked_views`' and `lerp_blend`'s, so the values are identical to the in-memory ones."""

    ndim, dtype = 2, np.dtype(np.float32)

    def __init__(self, arr, order, beta):
        self.arr, self.order, self.beta = arr, order, beta  # beta: 1 plain, 0 TTA mean, else the blend
        self.shape = arr.shape[1:]

    def __len__(self):
        return self.shape[0]

    def _rows(self, idx) -> np.ndarray:
        V = self.arr.shape[0]
        plain = np.asarray(self.arr[0, idx], dtype=np.float32) if self.beta != 0 else None
        if self.beta == 1:
            return plain
        aug = None
        for v in range(1, V):
            x = self.arr[v, idx]
            aug = np.zeros(x.shape, dtype=np.float32) if aug is None else aug
            aug += x
        aug /= np.float32(V - 1)
        return aug if self.beta == 0 else plain * np.float32(self.beta) + aug * np.float32(1 - self.beta)

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if self.order is not None:
            key = self.order[key]
        elif not isinstance(key, slice):
            key = np.asarray(key)
        out = self._rows(key)
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype=np.float32)
        for lo in range(0, len(out), _CHUNK):
            out[lo:lo + _CHUNK] = self[lo:lo + _CHUNK]
        return out if dtype is None else out.astype(dtype, copy=False)


def _checked_views(run: StoredRun, split: str, arr, ids: Callable[[], list], order, keep: bool = True):
    """(plain, mean of TTA views or None), aligned; every view is checked for NaN and row sums block by block.
    `keep` False: nothing is materialised, both come back as `_Rows` computed on access."""
    V, N, _ = arr.shape
    aug = np.zeros(arr.shape[1:], dtype=np.float32) if V > 1 and keep else None
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
            if v > 0 and keep:
                aug[lo:lo + _CHUNK] += x
    if not keep:
        _release(arr)
        return (arr[0] if order is None else _Rows(arr, order, 1)), (_Rows(arr, order, 0) if V > 1 else None)
    plain = arr[0] if order is None else arr[0][order]
    _release(arr)  # every view was read: drop its pages (see `_release`)
    if aug is not None:
        aug /= np.float32(V - 1)
        if order is not None:
            aug = aug[order]
    return plain, aug


class _Member:
    """One run's aligned validation probabilities: the plain view and the TTA mean, with blends and tops cached."""

    def __init__(self, run: StoredRun, order, test_order=None, keep: bool = True):
        self.run, self.order, self.test_order, self.keep = run, order, test_order, keep
        self.plain, self.aug = _checked_views(run, "validation", run.valid_probs, lambda: run.valid_ids, order, keep)
        self._blend, self._tops = (None, None), {}

    def probs(self, beta):
        if self.aug is None or beta in (0, 1, None):
            return lerp_blend(self.plain, self.aug, 1 if beta is None else beta)
        if not self.keep:  # streamed: the blend is computed block by block where it is read
            return _Rows(self.run.valid_probs, self.order, beta)
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
        plain, aug = _checked_views(self.run, "test", self.run.test_probs, lambda: self.run.test_ids, self.test_order,
                                    self.keep)
        if not self.keep and aug is not None and beta not in (0, 1, None):
            return _Rows(self.run.test_probs, self.test_order, beta)
        return lerp_blend(plain, aug, 1 if beta is None else beta)


def _optimised(run: StoredRun) -> Optional[str]:
    """What an ensemble of `run` optimises on valid: its recipe's monitor (it stands for the test score, e.g.
    balanced accuracy on a long-tailed valid split), else its metric."""
    return run.config.get("monitor") or run.config.get("metric") or run.metrics.get("metric_name")


def check_runs(runs: Sequence[StoredRun]) -> tuple[str, list, str]:
    """(recipe, vocab, metric) that the stored `runs` share; a clear error when their recipe, vocab (classes and
    their order) or metric differ, before any probabilities are combined. The metric is the recipe's monitor
    when it has one (see `_optimised`)."""
    ref = runs[0]
    recipe, vocab = ref.config.get("recipe"), list(ref.vocab)
    metric = _optimised(ref)
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
        m = _optimised(run)
        if m != metric:
            raise FastclsError(f"Runs are scored with different metrics: {_run_label(ref)} uses {metric!r}, "
                               f"{_run_label(run)} uses {m!r}.")
    if metric is None:
        raise FastclsError(f"Run {_run_label(ref)} records no metric (config 'metric' or metrics 'metric_name').")
    get_metric(metric)
    return recipe, vocab, metric


def aligned_probs(runs: Sequence[StoredRun], split: str = "test",
                  beta: Optional[float] = None) -> tuple[list, np.ndarray]:
    """The mean over `runs` of their TTA-blended stored probabilities on `split` ('test' or 'valid'), rows aligned
    by item id to the first run: (item ids, (N, C) probabilities). For teachers (`fastcls.student`). `beta`: the
    blend of every run; None: each run's own (`predict.run_tta_beta`: chosen on valid, 0.25 for older runs).

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
        probs.append(lerp_blend(plain, aug, run_tta_beta(run.meta) if beta is None else beta))
    return ref_ids, combine(probs, "mean")


def _in_memory_bytes(runs, orders) -> int:
    """What the members would hold in memory: per run a TTA mean and a blend (runs with TTA views) and its plain
    view re-ordered (runs whose rows are in another order), each (N, C) float32."""
    total = 0
    for run, order in zip(runs, orders):
        V, N, C = run.valid_probs.shape
        total += N * C * 4 * (2 * (V > 1) + (order is not None))
    return total


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
    keep = _in_memory_bytes(runs, orders) <= memory_budget()
    members = [_Member(run, o, to, keep) for run, o, to in zip(runs, orders, test_orders)]
    return members, runs, metric, targets, ref_ids, ref_test

