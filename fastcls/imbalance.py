"""Class imbalance: class weights, focal loss, oversampling, post-hoc logit adjustment, macro-F1 offsets.

A recipe (or `--imbalance`) names a strategy spec such as ``"focal,oversample"``. Training code calls one
function, `plan`, and gets back what to apply:

    p = plan(parse_imbalance(recipe.imbalance), train_labels, n_classes, label_smoothing=recipe.label_smoothing)
    dls = dsets.weighted_dataloaders(p.sample_weights, bs)   # only when p.sample_weights is not None
    learn = Learner(dls, model, loss_func=p.loss)            # plain fastai flat loss
    if p.logit_adjust:                                       # after training, on stored probabilities
        tau = tune_tau(valid_probs, valid_targets, p.prior)
        test_probs = logit_adjust(test_probs, p.prior, tau)

Strategies (combine with commas):

- ``none``: plain cross-entropy. Cannot be combined with anything.
- ``weights``: class-weighted loss, inverse frequency (see `class_weights`).
- ``focal``: focal loss (Lin et al. 2017); with ``weights`` the class weights are its alpha.
- ``oversample``: per-item sampling weights so each class is drawn equally often in expectation.
  Not combinable with ``weights``: both undo the same skew, and together they over-correct (the effective
  class weight becomes 1/n^2). Use one, or ``weights`` with a smaller `power`.
- ``logit-adjust``: post-hoc logit adjustment (Menon et al. 2021) with tau tuned on validation. Combinable with
  all of the above; the tau grid contains 0, so tuning switches it off where training already rebalanced.

`fit_thresholds` / `apply_offsets` (per-class offsets maximising macro-F1) are a separate post-hoc step for the
prediction / ensemble code; they are not a training strategy (``--tune-thresholds``, `Recipe.tune_thresholds`).

`fit_posthoc` fits both post-hoc steps on a run's validation predictions and returns a `PostHoc` that applies them
to any stored views (valid and test) and records what was fitted.
"""

__all__ = [
    "STRATEGIES",
    "ImbalancePlan",
    "PostHoc",
    "WeightedFocalLoss",
    "WeightedFocalLossFlat",
    "apply_offsets",
    "class_counts",
    "class_weights",
    "fit_posthoc",
    "fit_thresholds",
    "logit_adjust",
    "loss_func",
    "oversample_weights",
    "parse_imbalance",
    "plan",
    "tune_tau",
]

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from fastai.losses import BaseLoss, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from torch import nn

from .errors import FastclsError, suggest
from .metrics import get_metric, macro_f1_from_counts, score

STRATEGIES = ("none", "weights", "focal", "oversample", "logit-adjust")
_CONFLICTS = [
    ({"weights", "oversample"}, "both rebalance the classes and together over-correct (effective weight 1/n^2); "
                                "use one of them, or 'weights' with a smaller power"),
]
_EPS = 1e-12
DEFAULT_TAU_GRID = np.round(np.linspace(0.0, 2.0, 21), 6)
DEFAULT_OFFSET_GRID = np.round(np.linspace(-4.0, 4.0, 81), 6)


# ----------------------------------------------------------------------------------------------------- parsing
def parse_imbalance(spec: Union[str, Iterable[str], None]) -> tuple:
    """Parse an imbalance spec such as ``"focal,oversample"`` into canonical strategy names.

    Names are case-insensitive, ``_`` and ``-`` are interchangeable, duplicates are dropped, and the result is in
    the order of `STRATEGIES`. An empty spec means ``none``.

    Args:
        spec: comma-separated names, or an iterable of names (an already parsed tuple passes through).

    Returns:
        A tuple of names from `STRATEGIES`, e.g. ``("focal", "oversample")``; ``("none",)`` for no strategy.

    Raises:
        FastclsError: for an unknown name (with a suggestion), ``none`` combined with another strategy, or a
            contradictory combination (``weights,oversample``).
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec or ())
    names = set()
    for raw in parts:
        name = str(raw).strip().lower().replace("_", "-")
        if not name:
            continue
        if name not in STRATEGIES:
            raise FastclsError(f"Unknown imbalance strategy {str(raw).strip()!r} in {spec!r}."
                               f"{suggest(name, STRATEGIES)} Known strategies: {', '.join(STRATEGIES)} "
                               "(combine with commas, e.g. 'focal,oversample').")
        names.add(name)
    if not names:
        return ("none",)
    if "none" in names and len(names) > 1:
        raise FastclsError(f"Imbalance spec {spec!r} combines 'none' with other strategies; "
                           "drop 'none' or use it alone.")
    for pair, why in _CONFLICTS:
        if pair <= names:
            raise FastclsError(f"Imbalance spec {spec!r} combines {' and '.join(sorted(pair))}: {why}.")
    return tuple(s for s in STRATEGIES if s in names)


# ----------------------------------------------------------------------------------------------------- counts
def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def class_counts(labels, n_classes: int) -> np.ndarray:
    """Number of items per class.

    Args:
        labels: integer class indices (list, numpy array or tensor).
        n_classes: number of classes; classes without items get a count of 0.

    Returns:
        An int64 array of length `n_classes`.

    Raises:
        FastclsError: when a label is not an integer in ``[0, n_classes)``.
    """
    y = _to_numpy(labels).reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise FastclsError(f"class_counts needs integer class indices, got dtype {y.dtype}; "
                               "map labels to indices with the vocab first.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise FastclsError(f"Label {bad} is outside [0, {n_classes}); is n_classes (the vocab size) right?")
    return np.bincount(y, minlength=n_classes).astype(np.int64)


def class_weights(counts, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency class weights, ``(1 / count) ** power``, normalised to mean 1 over the classes.

    A class with no items gets the weight of the rarest present class (it has no training items to weight, but
    a finite value keeps validation losses finite).

    Args:
        counts: items per class (see `class_counts`).
        power: smoothing exponent: 1 for inverse frequency, 0.5 for inverse square root, 0 for no weighting.

    Returns:
        A float32 tensor of length ``len(counts)``.
    """
    c = _to_numpy(counts).astype(np.float64).reshape(-1)
    if c.size == 0 or (c < 0).any() or c.sum() <= 0:
        raise FastclsError(f"class_weights needs non-negative counts with at least one item, got {c.tolist()}.")
    c = np.where(c > 0, c, c[c > 0].min())
    w = c ** -float(power)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def oversample_weights(labels) -> np.ndarray:
    """Per-item sampling weights so that every class is drawn equally often in expectation.

    Pass them, in training-set order, to fastai's ``Datasets.weighted_dataloaders(wgts, bs)`` (its `WeightedDL`
    draws ``len(train)`` items per epoch with replacement). For ``DataBlock.weighted_dataloaders`` pass weights
    for the whole source instead: fastai selects the training rows itself.

    Args:
        labels: one label per item; integer indices or any hashable labels (e.g. strings).

    Returns:
        A float64 array of ``len(labels)`` weights, ``1 / count(class of item)``, normalised to sum 1.
    """
    y = _to_numpy(labels).reshape(-1)
    if y.size == 0:
        raise FastclsError("oversample_weights got no labels; is the training split empty?")
    _, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inv.reshape(-1)]
    return w / w.sum()


# ----------------------------------------------------------------------------------------------------- losses
class WeightedFocalLoss(nn.Module):
    """Focal loss with class weights and label smoothing: ``-w_y * sum_c q_c (1 - p_c)^gamma log p_c``.

    ``q`` is the (optionally smoothed) one-hot target. Unlike fastai's `FocalLoss`, the modulating factor uses
    the true probability when class weights are given (fastai computes it from the weighted cross-entropy), and
    the ``mean`` reduction is weighted like ``F.cross_entropy``: ``sum(w_y * loss) / sum(w_y)``. So with
    ``gamma=0`` it is exactly (weighted, label-smoothed) cross-entropy. The weight is a buffer and follows
    ``.to(device)``.
    """

    y_int = True

    def __init__(self, gamma: float = 2.0, weight: Optional[torch.Tensor] = None, eps: float = 0.0,
                 reduction: str = "mean"):
        super().__init__()
        self.gamma, self.eps, self.reduction = float(gamma), float(eps), reduction
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, inp: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
        """Loss of logits `inp` (N x C) against integer targets `targ` (N)."""
        logp = F.log_softmax(inp.float(), dim=-1)
        targ = targ.long()
        q = F.one_hot(targ, logp.shape[-1]).to(logp.dtype)
        if self.eps:
            q = q * (1 - self.eps) + self.eps / logp.shape[-1]
        # 1 - p via expm1 stays accurate (and > 0) for confident predictions; the clamp keeps gamma < 1 finite
        mod = (-torch.expm1(logp)).clamp(min=_EPS) ** self.gamma if self.gamma else 1.0
        loss = -(q * mod * logp).sum(-1)
        w = None if self.weight is None else self.weight.to(loss.device)[targ]
        if w is not None:
            loss = loss * w
        if self.reduction == "mean":
            return loss.sum() / w.sum() if w is not None else loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class WeightedFocalLossFlat(BaseLoss):
    """`WeightedFocalLoss` as a fastai flat loss: softmax `activation` and argmax `decodes` for `get_preds`."""

    y_int = True

    def __init__(self, *args, gamma: float = 2.0, weight=None, eps: float = 0.0, reduction: str = "mean",
                 axis: int = -1, **kwargs):
        super().__init__(WeightedFocalLoss, *args, gamma=gamma, weight=weight, eps=eps, reduction=reduction,
                         axis=axis, **kwargs)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities from logits."""
        return F.softmax(x, dim=self.axis)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class indices."""
        return x.argmax(dim=self.axis)


def loss_func(strategies, counts=None, label_smoothing: float = 0.0, gamma: float = 2.0,
              power: float = 1.0) -> BaseLoss:
    """The fastai flat loss for a set of strategies.

    - no ``focal``, no smoothing: fastai `CrossEntropyLossFlat` (class-weighted with ``weights``);
    - no ``focal``, smoothing: fastai `LabelSmoothingCrossEntropyFlat` (its ``weight`` applies to the NLL part;
      the uniform smoothing part is unweighted, as in fastai);
    - ``focal``: `WeightedFocalLossFlat` (class weights as alpha with ``weights``; smoothing applied to targets).

    ``oversample`` and ``logit-adjust`` do not change the loss.

    Args:
        strategies: a spec string or a tuple from `parse_imbalance`.
        counts: training items per class (see `class_counts`); required with ``weights``.
        label_smoothing: epsilon in ``[0, 1)``; 0 for none.
        gamma: focal focusing parameter (>= 0; 0 is cross-entropy).
        power: exponent for `class_weights`.

    Returns:
        A `fastai.losses.BaseLoss` whose `activation` is softmax, usable as ``Learner(loss_func=...)``.
    """
    strategies = parse_imbalance(strategies)
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise FastclsError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
    if float(gamma) < 0:
        raise FastclsError(f"Focal gamma must be >= 0, got {gamma}.")
    weight = None
    if "weights" in strategies:
        if counts is None:
            raise FastclsError("The 'weights' imbalance strategy needs the training class counts.")
        weight = class_weights(counts, power)
    if "focal" in strategies:
        return WeightedFocalLossFlat(gamma=gamma, weight=weight, eps=label_smoothing)
    if label_smoothing:
        loss = LabelSmoothingCrossEntropyFlat(eps=float(label_smoothing), weight=weight)
        if weight is not None:
            # fastai stores the weight as a plain attribute, which Learner's loss_func.to(device) would not move
            del loss.func.weight
            loss.func.register_buffer("weight", weight)
        return loss
    return CrossEntropyLossFlat(weight=weight)


# ----------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class ImbalancePlan:
    """What training applies for an imbalance spec (see `plan`).

    Attributes:
        strategies: the parsed strategy names.
        loss: the fastai loss for ``Learner(loss_func=...)``.
        sample_weights: per-item weights for ``Datasets.weighted_dataloaders``, in training order; None for plain
            shuffled batches.
        logit_adjust: whether to apply post-hoc logit adjustment (`tune_tau` on validation, then `logit_adjust`).
        counts: training items per class.
    """

    strategies: tuple
    loss: BaseLoss
    sample_weights: Optional[np.ndarray]
    logit_adjust: bool
    counts: np.ndarray

    @property
    def prior(self) -> np.ndarray:
        """Training class prior (counts / total), the prior for `logit_adjust`."""
        return self.counts / self.counts.sum()


def plan(strategies, train_labels, n_classes: int, label_smoothing: float = 0.0, gamma: float = 2.0,
         power: float = 1.0) -> ImbalancePlan:
    """Everything training needs for an imbalance spec, from the training labels.

    Args:
        strategies: a spec string (e.g. ``"focal,oversample"``) or a tuple from `parse_imbalance`.
        train_labels: integer class index of every training item, in training-set order.
        n_classes: number of classes (the vocab size).
        label_smoothing: epsilon for the loss; 0 for none.
        gamma: focal focusing parameter.
        power: exponent for `class_weights` (1: inverse frequency, 0.5: inverse square root).

    Returns:
        An `ImbalancePlan` with the loss, sampler weights (or None) and the post-hoc flag.
    """
    strategies = parse_imbalance(strategies)
    counts = class_counts(train_labels, n_classes)
    if counts.sum() == 0:
        raise FastclsError("The training split has no labelled items; check the split and the data path.")
    return ImbalancePlan(
        strategies=strategies,
        loss=loss_func(strategies, counts, label_smoothing=label_smoothing, gamma=gamma, power=power),
        sample_weights=oversample_weights(train_labels) if "oversample" in strategies else None,
        logit_adjust="logit-adjust" in strategies,
        counts=counts,
    )


# ----------------------------------------------------------------------------------------------------- post-hoc
def _probs(probs) -> np.ndarray:
    p = _to_numpy(probs)
    if p.ndim != 2 or p.shape[1] < 1:
        raise FastclsError(f"Expected class probabilities of shape (items, classes), got shape {p.shape}.")
    return p


def _targets(targets, n: int, n_classes: int) -> np.ndarray:
    y = _to_numpy(targets).reshape(-1).astype(np.int64)
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
    pr = _to_numpy(prior).astype(np.float64).reshape(-1)
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


def apply_offsets(probs, offsets) -> np.ndarray:
    """Add per-class offsets to log-probabilities and renormalise: ``softmax(log p + offsets)``.

    Args:
        probs: class probabilities, N x C.
        offsets: length-C offsets, e.g. from `fit_thresholds`.

    Returns:
        Adjusted probabilities (rows sum to 1) as a numpy array.
    """
    p = _probs(probs)
    b = _to_numpy(offsets).astype(np.float64).reshape(-1)
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
    """

    tau: Optional[float] = None
    prior: Optional[np.ndarray] = None
    offsets: Optional[np.ndarray] = None
    metric: str = "macro_f1"

    @property
    def applied(self) -> bool:
        """Whether any step was fitted (so the stored predictions differ from the model's own)."""
        return self.tau is not None or self.offsets is not None

    def apply(self, probs) -> np.ndarray:
        """The adjusted probabilities: one N x C array, or stacked views V x N x C (each view adjusted alike)."""
        p = _to_numpy(probs)
        if p.ndim == 3:
            return np.stack([self.apply(v) for v in p])
        if self.tau is not None:
            p = logit_adjust(p, self.prior, self.tau)
        if self.offsets is not None:
            p = apply_offsets(p, self.offsets)
        return p

    def undo(self, probs) -> np.ndarray:
        """The model's own probabilities back from adjusted ones (`apply` is a per-class reweighting: invertible up
        to the clipping of zero probabilities); one N x C array or stacked views V x N x C."""
        p = _to_numpy(probs)
        if p.ndim == 3:
            return np.stack([self.undo(v) for v in p])
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
                   metric=d.get("metric", "macro_f1"))

    def describe(self) -> str:
        """One line for metrics tables, saying what was fitted where."""
        steps = ([f"logit-adjust tau={self.tau:g}"] if self.tau is not None else []) + \
            ([f"thresholds ({int(np.count_nonzero(self.offsets))} classes offset)"] if self.offsets is not None else [])
        return (f"{' + '.join(steps)}, tuned for {self.metric} on valid: valid scores are in-sample (optimistic), "
                "test scores are held out; *_raw = before post-hoc")

    def to_dict(self) -> dict:
        """JSON-able record of the fitted steps (for the run's meta.json)."""
        return {"tau": self.tau, "prior": None if self.prior is None else [float(v) for v in self.prior],
                "offsets": None if self.offsets is None else [float(v) for v in self.offsets],
                "metric": self.metric, "fitted_on": "valid (plain view)"}


def fit_posthoc(valid_probs, valid_targets, prior=None, thresholds: bool = False,
                metric: str = "macro_f1") -> PostHoc:
    """Fit a run's post-hoc steps on its validation predictions: logit adjustment, then per-class offsets.

    Args:
        valid_probs: validation probabilities of the plain view, N x C.
        valid_targets: validation class indices, length N.
        prior: training class prior (or counts) to tune a logit adjustment for; None skips that step.
        thresholds: also fit per-class offsets (`fit_thresholds`, macro-F1) on the adjusted probabilities.
        metric: what `tune_tau` maximises. Macro-F1 by default: on a validation split that is as skewed as the
            training set, tuning for accuracy would undo the adjustment that a balanced test set rewards.

    Returns:
        A `PostHoc`; ``apply`` it to every stored view of valid and test.
    """
    p = _probs(valid_probs)
    tau = pr = offsets = None
    if prior is not None:
        pr = _to_numpy(prior).astype(np.float64).reshape(-1)
        pr = pr / pr.sum()
        tau = tune_tau(p, valid_targets, pr, metric=metric)
        p = logit_adjust(p, pr, tau)
    if thresholds:
        offsets = fit_thresholds(p, valid_targets)
    return PostHoc(tau=tau, prior=pr, offsets=offsets, metric=metric)
