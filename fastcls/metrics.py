"""Competition metrics: one registry serves training (fastai metric objects) and stored-probability scoring."""

__all__ = ["Metric", "METRICS", "COUNT_METRICS", "get_metric", "score", "accuracy_from_counts",
           "macro_f1_from_counts"]

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from .errors import FastclsError, suggest


@dataclass(frozen=True)
class Metric:
    """A metric by name: `fn(y_true, y_pred)` on label indices, its fastai counterpart, and its direction."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float]
    fastai: Callable[[], object]
    higher_is_better: bool = True

    def __call__(self, y_true, probs) -> float:
        """Score class probabilities (N x C) or predicted labels (N) against integer targets."""
        y_pred = np.asarray(probs)
        if y_pred.ndim == 2:
            y_pred = y_pred.argmax(1)
        return float(self.fn(np.asarray(y_true), y_pred))


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
        return balanced_accuracy_score(y, p)


def _fastai_balanced_accuracy():
    from fastai.metrics import skm_to_fastai
    m = skm_to_fastai(_balanced_accuracy)  # fastai's BalancedAccuracy, without sklearn's warning
    m.name = "balanced_accuracy"
    return m


def _macro_f1(y, p):
    return f1_score(y, p, average="macro", zero_division=0)


METRICS: dict[str, Metric] = {
    "accuracy": Metric("accuracy", accuracy_score, _fastai_accuracy),
    "macro_f1": Metric("macro_f1", _macro_f1, _fastai_macro_f1),
    # mean per-class recall: on a skewed validation split, the estimate of accuracy on a balanced test set
    "balanced_accuracy": Metric("balanced_accuracy", _balanced_accuracy, _fastai_balanced_accuracy),
}


def get_metric(name: str) -> Metric:
    """The registered metric `name`, or a clear error listing the known ones."""
    try:
        return METRICS[name]
    except KeyError:
        raise FastclsError(f"Unknown metric {name!r}.{suggest(name, METRICS)} Known metrics: {', '.join(METRICS)}.")


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
