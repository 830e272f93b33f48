"""Post-hoc steps fitted on validation predictions and applied to every stored view: logit adjustment, per-class
offsets, temperature scaling (calibration)."""

__all__ = ["PostHoc", "apply_offsets", "fit_posthoc", "fit_thresholds", "logit_adjust", "tune_tau",
           "fit_temperature", "apply_temperature", "DEFAULT_TAU_GRID", "DEFAULT_OFFSET_GRID"]

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import FastclsError
from .imbalance import to_numpy
from .metrics import get_metric, macro_f1_from_counts, score

_EPS = 1e-12
DEFAULT_TAU_GRID = np.round(np.linspace(0.0, 2.0, 21), 6)
DEFAULT_OFFSET_GRID = np.round(np.linspace(-4.0, 4.0, 81), 6)


# ----------------------------------------------------------------------------------------------------- post-hoc
def _probs(probs) -> np.ndarray:
    p = to_numpy(probs)
    if p.ndim != 2 or p.shape[1] < 1:
        raise FastclsError(f"Expected class probabilities of shape (items, classes), got shape {p.shape}.")
    return p


def _targets(targets, n: int, n_classes: int) -> np.ndarray:
    y = to_numpy(targets).reshape(-1).astype(np.int64)
    if len(y) != n:
        raise FastclsError(f"Got {len(y)} targets for {n} rows of probabilities.")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise FastclsError(f"Targets must be class indices in [0, {n_classes}); got {y.min()}..{y.max()}.")
    return y


def _reweight(p: np.ndarray, log_factor: np.ndarray) -> np.ndarray:
    """softmax(log p + log_factor), computed as p * exp(log_factor) renormalised, in p's float dtype."""
    out_dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
    q = np.clip(p.astype(np.float64), _EPS, None) * np.exp(log_factor - log_factor.max())
    return (q / q.sum(1, keepdims=True)).astype(out_dtype)


def logit_adjust(probs, prior, tau: float = 1.0) -> np.ndarray:
    """Post-hoc logit adjustment (Menon et al. 2021): ``softmax(log p - tau * log prior)``.

    Divides out the training prior so rare classes are predicted more often; ``tau=0`` or a uniform prior leaves
    the probabilities unchanged (up to renormalisation).

    Args:
        probs: class probabilities, N x C (numpy or tensor).
        prior: training class prior, length C (counts are fine: they are normalised).
        tau: adjustment strength.

    Returns:
        Adjusted probabilities (rows sum to 1) as a numpy array.
    """
    p = _probs(probs)
    pr = to_numpy(prior).astype(np.float64).reshape(-1)
    if pr.shape[0] != p.shape[1]:
        raise FastclsError(f"Prior has {pr.shape[0]} classes but probabilities have {p.shape[1]}.")
    if (pr < 0).any() or pr.sum() <= 0:
        raise FastclsError("The prior must be non-negative with a positive sum.")
    log_prior = np.log(np.clip(pr / pr.sum(), _EPS, None))
    return _reweight(p, -float(tau) * log_prior)


def tune_tau(probs, targets, prior, metric: str = "macro_f1", grid=None) -> float:
    """The logit-adjustment strength that scores best on validation.

    Args:
        probs: validation (or OOF) probabilities, N x C.
        targets: validation class indices, length N.
        prior: training class prior (or counts), length C.
        metric: a name from `fastcls.metrics.METRICS`.
        grid: candidate taus; default 0, 0.1, ..., 2. On ties the earliest candidate wins (so with the default
            grid, the weakest adjustment).

    Returns:
        The best tau, as a float.
    """
    p = _probs(probs)
    y = _targets(targets, len(p), p.shape[1])
    m = get_metric(metric)
    taus = [float(t) for t in (DEFAULT_TAU_GRID if grid is None else np.asarray(grid).reshape(-1))]
    if not taus:
        raise FastclsError("tune_tau needs at least one candidate tau.")
    sign = 1.0 if m.higher_is_better else -1.0
    scores = [sign * m(y, logit_adjust(p, prior, t)) for t in taus]
    return taus[int(np.argmax(scores))]


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """Temperature scaling of probabilities: ``softmax(log p / T)``; T > 1 softens, T < 1 sharpens, argmax unchanged."""
    p = _probs(probs)
    if not temperature > 0:
        raise FastclsError(f"A temperature must be > 0; got {temperature}.")
    from scipy.special import softmax
    out_dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
    return softmax(np.log(np.clip(p.astype(np.float64), _EPS, None)) / float(temperature), axis=1).astype(out_dtype)


def fit_temperature(probs, targets, bounds=(0.05, 20.0)) -> float:
    """The temperature minimising the negative log-likelihood of `targets` (Guo et al. 2017), fitted on validation or
    out-of-fold probabilities; a one-parameter convex fit (in 1/T), so it hardly overfits even small valid splits.

    Args:
        probs: N x C probabilities (the model's, after any other post-hoc step).
        targets: class indices, length N.
        bounds: the range searched.

    Returns:
        The temperature (1.0 when there are no rows).
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax
    p = _probs(probs)
    y = _targets(targets, len(p), p.shape[1])
    if not len(y):
        return 1.0
    logp = np.log(np.clip(p.astype(np.float64), _EPS, None))

    def nll(log_t):
        return float(-log_softmax(logp / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    res = minimize_scalar(nll, bounds=np.log(bounds), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def apply_offsets(probs, offsets) -> np.ndarray:
    """Add per-class offsets to log-probabilities and renormalise: ``softmax(log p + offsets)``.

    Args:
        probs: class probabilities, N x C.
        offsets: length-C offsets, e.g. from `fit_thresholds`.

    Returns:
        Adjusted probabilities (rows sum to 1) as a numpy array.
    """
    p = _probs(probs)
    b = to_numpy(offsets).astype(np.float64).reshape(-1)
    if b.shape[0] != p.shape[1]:
        raise FastclsError(f"Got {b.shape[0]} offsets for {p.shape[1]} classes.")
    return _reweight(p, b)


def _macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    tp = np.bincount(y[y == pred], minlength=n_classes)
    return float(macro_f1_from_counts(tp, np.bincount(pred, minlength=n_classes),
                                       np.bincount(y, minlength=n_classes)))


def _top2(z: np.ndarray):
    """First-argmax index/value per row and the first argmax with that column removed."""
    rows = np.arange(len(z))
    i1 = z.argmax(1)
    zz = z.copy()
    zz[rows, i1] = -np.inf
    i2 = zz.argmax(1)
    return i1, z[rows, i1], i2, zz[rows, i2]


def fit_thresholds(probs, targets, iters: int = 5, grid=None) -> np.ndarray:
    """Per-class offsets on log-probabilities that maximise macro-F1, by coordinate ascent.

    Each pass tries every candidate value of ``grid`` for each class in turn (all candidates at once, vectorised)
    and keeps a change only when it strictly improves macro-F1; passes stop early when nothing improves. It starts
    from zeros, re-scores every pass without shortcuts, and finally compares `apply_offsets` predictions with the
    unadjusted ones, so the result never scores below the unadjusted probabilities on the rows it was fitted on.
    Fit on validation / OOF rows and judge it on other rows: the in-sample gain is optimistic.

    Args:
        probs: validation (or OOF) probabilities, N x C.
        targets: class indices, length N.
        iters: maximum number of passes over the classes.
        grid: candidate offset values; default -4, -3.9, ..., 4. On equal scores the smallest magnitude wins.

    Returns:
        A float64 array of C offsets for `apply_offsets` (all zeros when nothing helps).
    """
    p = _probs(probs)
    n, n_cls = p.shape
    y = _targets(targets, n, n_cls)
    offsets = np.zeros(n_cls)
    if n == 0 or n_cls < 2:
        return offsets
    v = np.unique(np.asarray(DEFAULT_OFFSET_GRID if grid is None else grid, dtype=np.float64).reshape(-1))
    if v.size == 0:
        raise FastclsError("fit_thresholds needs at least one candidate offset.")
    n_g = len(v)
    prefer = np.lexsort((v, np.abs(v)))  # tie-break order: smallest |offset| first, then the smaller value
    support = np.bincount(y, minlength=n_cls)

    s = np.log(np.clip(p.astype(np.float64), _EPS, None))
    s_cols = np.ascontiguousarray(s.T)  # one class's column is read per step: keep it contiguous

    def exact(b):  # the decision rule without the fast path's shortcuts: argmax of the offset log-probabilities
        return _macro_f1(y, (s + b).argmax(1), n_cls)

    z = s.copy()
    i1, v1, i2, v2 = _top2(z)
    cur = best_exact = _macro_f1(y, i1, n_cls)
    for _ in range(max(int(iters), 0)):
        start = offsets.copy()
        changed = False
        for c in range(n_cls):
            k = np.where(i1 == c, i2, i1)  # best other class per row (first argmax without c)
            d = np.where(i1 == c, v2, v1) - s_cols[c]
            # the row predicts c for candidates v >= d when c wins ties (lower index), else for v > d
            first = np.searchsorted(v, d, "left")
            first += (first < n_g) & (v[np.minimum(first, n_g - 1)] == d) & (c > k)
            hit = k == y
            cum_k = np.bincount(first * n_cls + k, minlength=(n_g + 1) * n_cls).reshape(n_g + 1, n_cls)[:n_g]
            cum_k = cum_k.cumsum(0)
            cum_tp = np.bincount(first[hit] * n_cls + k[hit], minlength=(n_g + 1) * n_cls)
            cum_tp = cum_tp.reshape(n_g + 1, n_cls)[:n_g].cumsum(0)
            pred = np.bincount(k, minlength=n_cls) - cum_k
            tp = np.bincount(k[hit], minlength=n_cls) - cum_tp
            pred[:, c] = cum_k.sum(1)
            tp[:, c] = np.bincount(first[y == c], minlength=n_g + 1)[:n_g].cumsum()
            scores = macro_f1_from_counts(tp, pred, support)
            g = prefer[np.argmax(scores[prefer])]
            if scores[g] > cur + 1e-12 and v[g] != offsets[c]:
                offsets[c], cur, changed = v[g], float(scores[g]), True
                z[:, c] = s_cols[c] + v[g]
                # only rows where c was or may become one of the top two need their top two recomputed
                rows = np.flatnonzero((i1 == c) | (i2 == c) | (z[:, c] >= v2))
                if len(rows):
                    i1[rows], v1[rows], i2[rows], v2[rows] = _top2(z[rows])
        if not changed:
            break
        now = exact(offsets)
        if now <= best_exact:  # float rounding disagreed with the fast path: keep the last verified offsets
            offsets = start
            break
        best_exact, cur = now, now
    # the promise is about what users score: the renormalised probabilities against the unadjusted ones
    if not offsets.any() or score("macro_f1", y, apply_offsets(p, offsets)) < score("macro_f1", y, p):
        return np.zeros(n_cls)
    return offsets


# ------------------------------------------------------------------------------------------- a run's post-hoc steps
@dataclass(frozen=True)
class PostHoc:
    """Post-hoc adjustments fitted on a run's validation predictions (see `fit_posthoc`).

    Attributes:
        tau: logit-adjustment strength (None: no logit adjustment).
        prior: training class prior used by the logit adjustment (None without it).
        offsets: per-class offsets from `fit_thresholds`, applied after the logit adjustment (None: not fitted).
        metric: the metric both steps were tuned for.
        temperature: temperature scaling fitted last, by log-likelihood (None: not calibrated).
    """

    tau: Optional[float] = None
    prior: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None
    metric: str = "macro_f1"
    temperature: Optional[float] = None

    @property
    def applied(self) -> bool:
        """Whether any step was fitted (so the stored predictions differ from the model's own)."""
        return self.tau is not None or self.offsets is not None or self.temperature is not None

    def apply(self, probs) -> np.ndarray:
        """The adjusted probabilities: one N x C array, or stacked views V x N x C (each view adjusted alike)."""
        p = to_numpy(probs)
        if p.ndim == 3:
            return np.stack([self.apply(v) for v in p])
        if self.tau is not None:
            p = logit_adjust(p, self.prior, self.tau)
        if self.offsets is not None:
            p = apply_offsets(p, self.offsets)
        if self.temperature is not None:
            p = apply_temperature(p, self.temperature)
        return p

    def undo(self, probs) -> np.ndarray:
        """The model's own probabilities back from adjusted ones (`apply` is a per-class reweighting: invertible up
        to the clipping of zero probabilities); one N x C array or stacked views V x N x C."""
        p = to_numpy(probs)
        if p.ndim == 3:
            return np.stack([self.undo(v) for v in p])
        if self.temperature is not None:
            p = apply_temperature(p, 1.0 / self.temperature)
        if self.offsets is not None:
            p = apply_offsets(p, -np.asarray(self.offsets, dtype=np.float64))
        if self.tau is not None:
            p = logit_adjust(p, self.prior, -self.tau)
        return p

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "PostHoc":
        """The steps a run recorded with `to_dict` (its meta.json `posthoc`); an empty PostHoc for None."""
        if not d:
            return cls()
        arr = (lambda v: None if v is None else np.asarray(v, dtype=np.float64))
        return cls(tau=d.get("tau"), prior=arr(d.get("prior")), offsets=arr(d.get("offsets")),
                   metric=d.get("metric", "macro_f1"), temperature=d.get("temperature"))

    def describe(self) -> str:
        """One line for metrics tables, saying what was fitted where."""
        steps = ([f"logit-adjust tau={self.tau:g}"] if self.tau is not None else []) + \
            ([f"thresholds ({int(np.count_nonzero(self.offsets))} classes offset)"] if self.offsets is not None else []) + \
            ([f"temperature T={self.temperature:.3g} (log loss)"] if self.temperature is not None else [])
        return (f"{' + '.join(steps)}, tuned for {self.metric} on valid: valid scores are in-sample (optimistic), "
                "test scores are held out; *_raw = before post-hoc")

    def to_dict(self) -> dict:
        """JSON-able record of the fitted steps (for the run's meta.json)."""
        return {"tau": self.tau, "prior": None if self.prior is None else [float(v) for v in self.prior],
                "offsets": None if self.offsets is None else [float(v) for v in self.offsets],
                "metric": self.metric, "temperature": self.temperature, "fitted_on": "valid (plain view)"}


def fit_posthoc(valid_probs, valid_targets, prior=None, thresholds: bool = False,
                metric: str = "macro_f1", calibrate: bool = False) -> PostHoc:
    """Fit a run's post-hoc steps on its validation predictions: logit adjustment, then per-class offsets.

    Args:
        valid_probs: validation probabilities of the plain view, N x C.
        valid_targets: validation class indices, length N.
        prior: training class prior (or counts) to tune a logit adjustment for; None skips that step.
        thresholds: also fit per-class offsets (`fit_thresholds`, macro-F1) on the adjusted probabilities.
        metric: what `tune_tau` maximises. Macro-F1 by default: on a validation split that is as skewed as the
            training set, tuning for accuracy would undo the adjustment that a balanced test set rewards.
        calibrate: fit a temperature (`fit_temperature`) last, on the adjusted probabilities.

    Returns:
        A `PostHoc`; ``apply`` it to every stored view of valid and test.
    """
    p = _probs(valid_probs)
    tau = pr = offsets = None
    if prior is not None:
        pr = to_numpy(prior).astype(np.float64).reshape(-1)
        pr = pr / pr.sum()
        tau = tune_tau(p, valid_targets, pr, metric=metric)
        p = logit_adjust(p, pr, tau)
    if thresholds:
        offsets = fit_thresholds(p, valid_targets)
        p = apply_offsets(p, offsets)
    temperature = fit_temperature(p, valid_targets) if calibrate else None
    return PostHoc(tau=tau, prior=pr, offsets=offsets, metric=metric, temperature=temperature)
