"""Class imbalance during training: strategy parsing, class weights, focal loss, oversampling (post-hoc steps: posthoc.py).

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
- ``ldam``: the label-distribution-aware margin loss (Cao et al. 2019): cross-entropy on logits whose true class is
  lowered by a margin ``m_c ~ n_c ** -1/4`` (the rarest class 0.5), see `ldam_margins`, `LDAMLoss`.
- ``drw``: deferred re-weighting (Cao et al. 2019): the loss (cross-entropy, focal or LDAM) is weighted by the
  inverse effective number of items per class (`drw_weights`) from `Recipe.drw_start` of the last stage on
  (`DeferredReweight`); before that it is unweighted.
- ``soft-f1``: one minus the batch's macro soft F1 (`SoftF1Loss`): F1 from probabilities instead of hard counts.
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
    "WeightedFocalLoss",
    "WeightedFocalLossFlat",
    "LDAMLoss",
    "LDAMLossFlat",
    "SoftF1Loss",
    "SoftF1LossFlat",
    "DeferredReweight",
    "ldam_margins",
    "drw_weights",
    "class_counts",
    "class_weights",
    "loss_func",
    "oversample_weights",
    "parse_imbalance",
    "plan",
    "to_numpy",
]

from dataclasses import dataclass
from typing import Iterable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.losses import BaseLoss, CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from torch import nn

from .errors import FastclsError, suggest

STRATEGIES = ("none", "weights", "focal", "ldam", "soft-f1", "drw", "oversample", "logit-adjust")
_CONFLICTS = [
    ({"weights", "oversample"}, "both rebalance the classes and together over-correct (effective weight 1/n^2); "
                                "use one of them, or 'weights' with a smaller power"),
    ({"focal", "ldam"}, "both are the training loss; give one"),
    ({"focal", "soft-f1"}, "both are the training loss; give one"),
    ({"ldam", "soft-f1"}, "both are the training loss; give one"),
    ({"weights", "drw"}, "'drw' is the class weighting switched on late in training, 'weights' the one on from the "
                         "start; give one"),
    ({"drw", "oversample"}, "both rebalance the classes and together over-correct; use one of them"),
    ({"soft-f1", "weights"}, "the macro soft F1 already weighs every class alike; it takes no class weights"),
    ({"soft-f1", "drw"}, "the macro soft F1 already weighs every class alike; it takes no class weights"),
]


_EPS = 1e-12

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
def to_numpy(x) -> np.ndarray:
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
    y = to_numpy(labels).reshape(-1)
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise FastclsError(f"class_counts needs integer class indices, got dtype {y.dtype}; "
                               "map labels to indices with the vocab first.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        bad = y[(y < 0) | (y >= n_classes)][0]
        raise FastclsError(f"Label {bad} is outside [0, {n_classes}); is n_classes (the vocab size) right?")
    return np.bincount(y, minlength=n_classes).astype(np.int64)


def _present(counts) -> np.ndarray:
    """Counts as floats, a class without items counted like the rarest present class (finite margins, weights)."""
    c = to_numpy(counts).astype(np.float64).reshape(-1)
    if c.size == 0 or (c < 0).any() or c.sum() <= 0:
        raise FastclsError(f"Class counts must be non-negative with at least one item, got {c.tolist()}.")
    return np.where(c > 0, c, c[c > 0].min())


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
    w = _present(counts) ** -float(power)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def ldam_margins(counts, max_m: float = 0.5) -> torch.Tensor:
    """LDAM's per-class margins ``m_c = C / n_c ** (1/4)``, C such that the rarest class's is `max_m`."""
    m = _present(counts) ** -0.25
    return torch.tensor(m * (max_m / m.max()), dtype=torch.float32)


def drw_weights(counts, beta: float = 0.9999) -> torch.Tensor:
    """Deferred re-weighting's class weights: the inverse effective number ``(1 - beta) / (1 - beta ** n_c)`` of each
    class (Cui et al. 2019), normalised to sum to the number of classes (as the LDAM-DRW code does)."""
    w = (1 - beta) / (1 - beta ** _present(counts))
    return torch.tensor(w * (len(w) / w.sum()), dtype=torch.float32)


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
    y = to_numpy(labels).reshape(-1)
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


class LDAMLoss(WeightedFocalLoss):
    """LDAM: `WeightedFocalLoss` (gamma 0: weighted, label-smoothed cross-entropy) of the logits with the true class's
    logit lowered by its margin, ``x_y - m_y``. No scale `s`: fastai's head gives plain (not cosine) logits. The
    margins are only used in training; predictions are the softmax of the logits themselves."""

    def __init__(self, margins, weight: Optional[torch.Tensor] = None, eps: float = 0.0, reduction: str = "mean"):
        super().__init__(gamma=0.0, weight=weight, eps=eps, reduction=reduction)
        self.register_buffer("margins", torch.as_tensor(margins, dtype=torch.float32))

    def forward(self, inp: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
        targ = targ.long()
        shift = F.one_hot(targ, inp.shape[-1]).float() * self.margins.to(inp.device)[targ][:, None]
        return super().forward(inp.float() - shift, targ)


class LDAMLossFlat(WeightedFocalLossFlat):
    """`LDAMLoss` as a fastai flat loss (softmax activation, argmax decodes)."""

    def __init__(self, margins, weight=None, eps: float = 0.0, reduction: str = "mean", axis: int = -1):
        BaseLoss.__init__(self, LDAMLoss, margins, weight=weight, eps=eps, reduction=reduction, axis=axis)


class SoftF1Loss(nn.Module):
    """One minus the macro soft F1 of a batch: per class ``2 tp / (2 tp + fp + fn)`` with the counts taken from the
    softmax probabilities (tp = sum of p_c over the items of class c, fp over the others, fn = sum of 1 - p_c over
    the class's items), averaged over the classes. A batch-level loss: no per-item reduction."""

    y_int = True

    def __init__(self, eps: float = 1e-7, reduction: str = "mean"):
        super().__init__()
        self.eps = eps
        if reduction != "mean":
            raise FastclsError("The soft-F1 loss is one number per batch; it has no per-item losses (reduction "
                               f"{reduction!r}).")

    def forward(self, inp: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
        p = F.softmax(inp.float(), dim=-1)
        y = F.one_hot(targ.long(), p.shape[-1]).to(p.dtype)
        tp, fp, fn = (p * y).sum(0), (p * (1 - y)).sum(0), ((1 - p) * y).sum(0)
        return 1 - (2 * tp / (2 * tp + fp + fn + self.eps)).mean()


class SoftF1LossFlat(WeightedFocalLossFlat):
    """`SoftF1Loss` as a fastai flat loss (softmax activation, argmax decodes)."""

    def __init__(self, axis: int = -1):
        BaseLoss.__init__(self, SoftF1Loss, axis=axis)


class DeferredReweight(Callback):
    """DRW: the loss's class weights are `weight` from epoch ``int(start * n_epoch)`` of the fit on, none before
    (`train` adds it to the last stage). Set from the epoch alone, so a resumed fit sets them as the first did."""

    def __init__(self, weight: torch.Tensor, start: float):
        self.weight, self.start = weight, start

    def before_epoch(self):
        on = self.epoch >= int(self.start * self.n_epoch)
        func = getattr(self.learn.loss_func, "func", None)
        if not hasattr(func, "weight"):
            loss = type(func or self.learn.loss_func).__name__
            raise FastclsError(f"--imbalance drw re-weights the run's loss, but this loss ({loss}) has no class "
                               "weights; drop 'drw' here.")
        func.weight = self.weight if on else None


def loss_func(strategies, counts=None, label_smoothing: float = 0.0, gamma: float = 2.0,
              power: float = 1.0) -> BaseLoss:
    """The fastai flat loss for a set of strategies.

    - no ``focal``, no smoothing: fastai `CrossEntropyLossFlat` (class-weighted with ``weights``);
    - no ``focal``, smoothing: fastai `LabelSmoothingCrossEntropyFlat` (its ``weight`` applies to the NLL part;
      the uniform smoothing part is unweighted, as in fastai);
    - ``focal``: `WeightedFocalLossFlat` (class weights as alpha with ``weights``; smoothing applied to targets);
    - ``ldam``: `LDAMLossFlat` (margins from `counts`; class weights and smoothing as for focal);
    - ``drw`` without focal/ldam: `WeightedFocalLossFlat` with gamma 0 (cross-entropy), whose weights
      `DeferredReweight` switches on late;
    - ``soft-f1``: `SoftF1LossFlat` (no class weights, no smoothing).

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
    if {"weights", "ldam"} & set(strategies) and counts is None:
        raise FastclsError(f"The {'weights' if 'weights' in strategies else 'ldam'} imbalance strategy needs the "
                           "training class counts.")
    if "weights" in strategies:
        weight = class_weights(counts, power)
    if "soft-f1" in strategies:
        if label_smoothing:
            raise FastclsError("The soft-F1 loss (--imbalance soft-f1) scores hard targets; it takes no label "
                               f"smoothing (got {label_smoothing}). Drop --label-smoothing.")
        return SoftF1LossFlat()
    if "ldam" in strategies:
        return LDAMLossFlat(ldam_margins(counts), weight=weight, eps=label_smoothing)
    if "focal" in strategies or "drw" in strategies:  # drw: gamma 0 is cross-entropy, with weights to switch on
        return WeightedFocalLossFlat(gamma=gamma if "focal" in strategies else 0.0, weight=weight, eps=label_smoothing)
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
        drw: the deferred re-weighting's class weights (`drw_weights`), or None without 'drw'.
    """

    strategies: tuple
    loss: BaseLoss
    sample_weights: Optional[np.ndarray]
    logit_adjust: bool
    counts: np.ndarray
    drw: Optional[torch.Tensor] = None

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
        drw=drw_weights(counts) if "drw" in strategies else None,
    )
