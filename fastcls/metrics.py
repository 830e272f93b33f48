"""Competition metrics: one registry serves training (fastai metric objects) and stored-probability scoring."""

__all__ = ["Metric", "METRICS", "PATTERNS", "COUNT_METRICS", "get_metric", "score", "accuracy_from_counts",
           "macro_f1_from_counts", "log_loss", "roc_auc", "map_at_k", "top_k_accuracy", "qwk", "macro_f_beta",
           "expected_calibration_error", "calibration_bins", "check_metric"]

import re
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import numpy as np

from .errors import FastclsError, suggest


@dataclass(frozen=True)
class Metric:
    """A metric by name: `fn(y_true, y_pred)`, its fastai counterpart, its direction and what it reads.

    Attributes:
        fn: `fn(y_true, labels)` for label metrics; `fn(y_true, probs)` (N x C) when `needs_probs`.
        fastai: builds the fastai metric object scored every epoch; None: built from `fn` (`_fastai_from`).
        higher_is_better: the direction every consumer (best epoch, searches, reports) optimises.
        needs_probs: scored on class probabilities (log loss, AUC, MAP@k, top-k), not on argmax labels.
        ordered: needs classes in a meaningful order (QWK): refused for a recipe without `classes`.
    """

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    fastai: Optional[Callable[[], object]] = None
    higher_is_better: bool = True
    needs_probs: bool = False
    ordered: bool = False

    def __call__(self, y_true, probs) -> float:
        """Score class probabilities (N x C), or predicted labels (N) for a label metric, against integer targets."""
        y_pred = np.asarray(probs)
        if self.needs_probs:
            if y_pred.ndim != 2:
                raise FastclsError(f"Metric {self.name!r} scores class probabilities (items x classes), but got "
                                   f"predicted labels of shape {y_pred.shape}. Pass the probabilities.")
            return float(self.fn(np.asarray(y_true), y_pred))
        if y_pred.ndim == 2:
            y_pred = y_pred.argmax(1)
        return float(self.fn(np.asarray(y_true), y_pred))

    @property
    def better(self):
        """The numpy comparison that says a new value beats the best so far (fastai's TrackerCallback `comp`)."""
        return np.greater if self.higher_is_better else np.less

    def make_fastai(self):
        """The fastai metric object for a Learner (named like this metric, so the recorder column matches)."""
        return self.fastai() if self.fastai is not None else _fastai_from(self)


def _fastai_accuracy():
    from fastai.metrics import accuracy
    return accuracy


def _fastai_macro_f1():
    from fastai.metrics import F1Score
    m = F1Score(average="macro")
    m.name = "macro_f1"  # the recorder column is named like the recipe's metric
    return m


def _balanced_accuracy(y, p):
    with warnings.catch_warnings():  # a small valid split may lack a predicted class: recall is over true classes
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        from sklearn.metrics import balanced_accuracy_score
        return balanced_accuracy_score(y, p)


def _fastai_balanced_accuracy():
    from fastai.metrics import skm_to_fastai
    m = skm_to_fastai(_balanced_accuracy)  # fastai's BalancedAccuracy, without sklearn's warning
    m.name = "balanced_accuracy"
    return m


def _accuracy(y, p):
    from sklearn.metrics import accuracy_score  # imported when scoring: `fastcls.runs` needs no scikit-learn
    return accuracy_score(y, p)


def _macro_f1(y, p):
    from sklearn.metrics import f1_score
    return f1_score(y, p, average="macro", zero_division=0)


def _fastai_from(metric: Metric):
    """A fastai AccumMetric for any registry metric: softmax probabilities (not flattened) for a probability metric,
    argmax labels otherwise; scored once per epoch on the whole validation set, like the stored-run metric."""
    from fastai.metrics import AccumMetric, ActivationType
    if metric.needs_probs:
        m = AccumMetric(metric.fn, dim_argmax=-1, activation=ActivationType.Softmax, flatten=False, to_np=True,
                        invert_arg=True)  # dim_argmax: the softmax axis (no argmax follows an activation)
    else:
        m = AccumMetric(metric.fn, dim_argmax=-1, to_np=True, invert_arg=True)
    m.name = metric.name
    return m


# -- probability metrics (Kaggle's definitions) --------------------------------------------------------------------
LOG_LOSS_EPS = 1e-15  # Kaggle's clipping: one confident mistake costs log(1e15) = 34.5, not infinity


def log_loss(y, probs) -> float:
    """Kaggle's multi-class log loss: probabilities clipped to [eps, 1 - eps], rows renormalised, mean -log p(true)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    p = p / p.sum(1, keepdims=True)
    y = np.asarray(y, dtype=np.int64)
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def roc_auc(y, probs) -> float:
    """ROC AUC: of the positive class (column 1) for two classes; else one-vs-rest, macro-averaged over the classes
    that have both positives and negatives among the targets (a class absent from a valid split has no AUC)."""
    from sklearn.metrics import roc_auc_score
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    aucs = [roc_auc_score(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def _ranks(y, probs, k: int) -> np.ndarray:
    """0-based position of each row's true class among its k most probable classes (k where it is not among them);
    equal probabilities rank by class index, like np.argsort(-p, kind='stable')."""
    p, y = np.asarray(probs), np.asarray(y, dtype=np.int64)
    top = np.argsort(-p, axis=1, kind="stable")[:, :k]
    hit = top == y[:, None]
    return np.where(hit.any(1), hit.argmax(1), k)


def map_at_k(y, probs, k: int = 3) -> float:
    """Mean average precision at k with one true label per row (QuickDraw's MAP@3): 1 / (position + 1) of the true
    class among the k guesses, 0 when it is not among them."""
    r = _ranks(y, probs, k)
    return float(np.where(r < k, 1.0 / (r + 1), 0.0).mean())


def top_k_accuracy(y, probs, k: int = 5) -> float:
    """Share of rows whose true class is among the k most probable."""
    return float((_ranks(y, probs, k) < k).mean())


def qwk(y, pred) -> float:
    """Quadratic weighted kappa on ordered class indices (the index order is the recipe's `classes` order)."""
    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    n = int(max(y.max(initial=0), pred.max(initial=0))) + 1  # index distances, not the positions of present labels
    from sklearn.metrics import cohen_kappa_score
    return float(cohen_kappa_score(y, pred, weights="quadratic", labels=np.arange(n)))


def macro_f_beta(y, pred, beta: float = 1.0) -> float:
    """Macro-averaged F-beta (beta > 1 weighs recall more)."""
    from sklearn.metrics import fbeta_score
    return float(fbeta_score(y, pred, beta=beta, average="macro", zero_division=0))


def calibration_bins(y, probs, bins: int = 15) -> tuple:
    """Per equal-width bin of top-class confidence: (items, correct ones, summed confidence), each `bins` long;
    the reliability diagram's data (`fastcls.report`) and the ECE's."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(y, dtype=np.int64)
    conf, right = p.max(1), (p.argmax(1) == y)
    which = np.minimum((conf * bins).astype(np.int64), bins - 1)
    return np.bincount(which, None, bins), np.bincount(which, right, bins), np.bincount(which, conf, bins)


def expected_calibration_error(y, probs, bins: int = 15) -> float:
    """Expected calibration error of the top class: the bin-weighted |accuracy - confidence| over equal-width
    confidence bins (Guo et al. 2017)."""
    n, right, conf = calibration_bins(y, probs, bins)
    return float(np.abs(right - conf).sum() / max(int(n.sum()), 1))


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", _accuracy, _fastai_accuracy),
    "macro_f1": Metric("macro_f1", _macro_f1, _fastai_macro_f1),
    # mean per-class recall: on a skewed validation split, the estimate of accuracy on a balanced test set
    "balanced_accuracy": Metric("balanced_accuracy", _balanced_accuracy, _fastai_balanced_accuracy),
    "log_loss": Metric("log_loss", log_loss, higher_is_better=False, needs_probs=True),
    "roc_auc": Metric("roc_auc", roc_auc, needs_probs=True),
    "qwk": Metric("qwk", qwk, ordered=True),
    "ece": Metric("ece", expected_calibration_error, higher_is_better=False, needs_probs=True),
}

# metrics with a parameter in their name: pattern, example, factory(match) -> Metric
PATTERNS: dict[str, tuple] = {
    r"map@([1-9][0-9]*)": ("map@3", lambda name, k: Metric(name, partial(map_at_k, k=int(k)), needs_probs=True)),
    r"top([1-9][0-9]*)": ("top5", lambda name, k: Metric(name, partial(top_k_accuracy, k=int(k)), needs_probs=True)),
    r"f([0-9]+(?:\.[0-9]+)?)": ("f2", lambda name, b: Metric(name, partial(macro_f_beta, beta=float(b)))),
}


def get_metric(name: str) -> Metric:
    """The registered metric `name` (or one of `PATTERNS`: `map@3`, `top5`, `f2`), or a clear error listing them."""
    if name in METRICS:
        return METRICS[name]
    for pattern, (_, make) in PATTERNS.items():
        m = re.fullmatch(pattern, str(name))
        if m and float(m.group(1)) > 0:
            return make(name, m.group(1))
    examples = ", ".join(ex for ex, _ in PATTERNS.values())
    raise FastclsError(f"Unknown metric {name!r}.{suggest(str(name), METRICS)} Known metrics: {', '.join(METRICS)}; "
                       f"with a parameter: {examples} (MAP@k, top-k accuracy, macro F-beta).")


def check_metric(name: str, classes=None, where: str = "") -> Metric:
    """`get_metric(name)`, refusing an ordinal metric (QWK) when no class order is declared (`classes` is None)."""
    m = get_metric(name)
    if m.ordered and not classes:
        raise FastclsError(f"Metric {name!r} needs ordered classes, but {where or 'the recipe'} declares none. Set the "
                           "recipe's `classes` to the grades in order (e.g. classes=('0', '1', '2', '3', '4')).")
    return m


def score(name: str, y_true, probs) -> float:
    """Score probabilities (N x C) or labels with the registered metric `name`."""
    return get_metric(name)(y_true, probs)


# -- the same metrics from label counts ----------------------------------------------------------------------------
# Accuracy and macro-F1 are functions of per-class (true positives, predicted counts, true counts), so a search step
# or a bootstrap resample only needs bincounts, not a call to sklearn. Both agree with the registry's sklearn
# definitions (tests check this); both work over leading axes (many candidates at once).

def accuracy_from_counts(tp, npred, ntrue) -> np.ndarray:
    """Accuracy from per-class true positives, predicted counts and true counts (last axis: classes)."""
    return tp.sum(-1) / np.maximum(ntrue.sum(-1), 1)


def macro_f1_from_counts(tp, npred, ntrue) -> np.ndarray:
    """Macro-F1 like sklearn's (average over classes present in targets or predictions) from per-class counts."""
    denom = npred + ntrue  # = 2tp + fp + fn
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


COUNT_METRICS: dict[str, Callable] = {"accuracy": accuracy_from_counts, "macro_f1": macro_f1_from_counts}
