"""Block-wise array helpers and label scoring shared by the ensemble modules.

Member probabilities may be memory-mapped (N, C) arrays; the helpers here read them block by block so temporaries
stay small. `_LabelScorer` scores argmax labels, through per-class counts for the count metrics, which is what makes
the greedy search and the bootstrap cheap; for a probability metric (log loss, AUC, MAP@k) it scores probabilities,
and `pred` says which of the two a consumer must hand it.
"""

import mmap
from typing import Optional

import numpy as np

from ..metrics import COUNT_METRICS, get_metric

__all__ = []  # internal to the ensemble package

_CHUNK = 16384  # rows per block: keeps temporaries of a (rows, classes) block small and cache-friendly


class _LabelScorer:
    """Scores predicted labels against fixed targets, optionally on a subset of rows (`mask`); for count metrics
    also from (true positive, predicted) counts per class."""

    def __init__(self, metric: str, targets: np.ndarray, n_classes: int, mask: Optional[np.ndarray] = None):
        self.name, self.metric = metric, get_metric(metric)
        self.sign = 1.0 if self.metric.higher_is_better else -1.0
        self.needs_probs = self.metric.needs_probs
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

    def pred(self, probs, rows=None) -> np.ndarray:
        """What this scorer reads from (N, C) probabilities: the probabilities themselves for a probability metric
        (rows `rows`, None = all), argmax labels otherwise."""
        if self.needs_probs:
            return np.asarray(probs) if rows is None else np.asarray(probs)[rows]
        return _argmax(probs, rows)

    def __call__(self, labels) -> float:
        """The metric of labels (N,) or probabilities (N, C) (argmax taken for a label metric)."""
        x = np.asarray(labels)
        if self.needs_probs:
            return float(self.metric(self._rows(self.y), self._rows(x)))  # refuses labels with a clear error
        labels = (_argmax(x) if x.ndim == 2 else x).astype(np.int64, copy=False)
        if self.counts_fn is not None:
            return self.from_counts(*self.counts(labels))
        return float(self.metric(self._rows(self.y), self._rows(labels)))


def _score(metric: str, targets, probs_or_labels) -> float:
    """The registry metric of probabilities (N x C) or labels, through the fast count path where there is one."""
    x = np.asarray(probs_or_labels)
    C = x.shape[1] if x.ndim == 2 else int(max(np.max(targets, initial=0), np.max(x, initial=0))) + 1
    return _LabelScorer(metric, targets, C)(x)


def _release(a):
    """Drop the pages of a memory-mapped array (or a `_Rows` over one) from this process once it has been read: the
    file stays in the page cache, but resident memory no longer grows by every member read (MADV_DONTNEED on a
    read-only shared mapping; the next read faults the pages back in from the cache)."""
    m = getattr(getattr(a, "arr", a), "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            m.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):  # a closed or unsupported mapping: nothing to release
            pass


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
    _release(a)
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
        _release(p)
    return out

