"""Linear (and not so linear) probes: a scikit-learn classifier on a frozen body's pooled features, stored as a run.

The features are the sweeps' cached ones (`fastcls.features.cached_features`, under `<runs>/cache/features`): the
body runs once per image and view, so probing several classifiers on one body costs one extraction. The classifier
is fitted on the training views, predicts the plain and TTA views of valid and test, and the run (kind 'probe')
stores those probabilities like any run, so `fastcls ensemble` and `fastcls submit` accept it. It stores no model
weights: the classifier is not a torch module (re-run the probe to predict new images).
"""

__all__ = ["CLASSIFIERS", "make_classifier", "probe_run"]

import dataclasses
import time
from typing import Optional

import numpy as np
import pandas as pd
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .. import data as fdata
from ..errors import FastclsError, suggest
from .features import cached_features
from ..runs import RunStore
from .sweep import FEATURES
from ..train import Predictions, RunResult, check_new_name, prepare, store_run
from ..config import RunConfig

CLASSIFIERS = {
    "logreg": lambda seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
    "lda": lambda seed: LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto"),  # shrinkage: features >> items
    "hgb": lambda seed: HistGradientBoostingClassifier(random_state=seed),
}


def make_classifier(name: str, seed: int = 0):
    """A fresh scikit-learn classifier: 'logreg' (standardised logistic regression), 'lda' (shrunk LDA) or 'hgb'
    (histogram gradient boosting)."""
    if name not in CLASSIFIERS:
        raise FastclsError(f"--clf {name!r} is not a probe classifier; choose one of "
                           f"{', '.join(CLASSIFIERS)}.{suggest(name, CLASSIFIERS)}")
    return CLASSIFIERS[name](seed)


def _proba(model, views: np.ndarray, n_classes: int) -> np.ndarray:
    """(V, N, C) probabilities; classes absent from the training items (a small --sample) get probability 0."""
    out = np.zeros((views.shape[0], views.shape[1], n_classes), dtype=np.float32)
    cols = np.asarray(model.classes_, dtype=np.int64)
    for v, x in enumerate(views):
        out[v][:, cols] = model.predict_proba(np.asarray(x, dtype=np.float32))
    return out


def probe_run(cfg: RunConfig, store: RunStore, clf: str = "logreg", views: int = 1, progress: str = "auto",
              items: Optional[fdata.Items] = None) -> RunResult:
    """Fit classifier `clf` on the frozen body's cached pooled features and store a run of kind 'probe'.

    Args:
        cfg: recipe, arch, weights (the frozen body: pretrained, a weights file, or a seeded random init), seed,
            sample, data.
        store: the run store; features are cached under `<store>/cache/features`.
        clf: 'logreg', 'lda' or 'hgb' (`CLASSIFIERS`).
        views: augmented views of the training set (each a copy of the training items for the classifier).
        progress: 'none' prints nothing.
        items: already-read items.

    Returns:
        The stored run's `RunResult` (learn is None).
    """
    t0 = time.time()
    model = make_classifier(clf, cfg.seed)
    if views < 1:
        raise FastclsError(f"--views must be at least 1, got {views}.")
    check_new_name(store, cfg.name)
    # the classifier has no loss, sampler or logit adjustment: the recipe's imbalance steps do not apply
    prep = prepare(dataclasses.replace(cfg, recipe=cfg.recipe.override(imbalance="none")), items, store)
    cfg, items = prep.cfg, prep.items
    fs, _ = cached_features(cfg, items, views, store.cache_dir(FEATURES), progress)
    X = np.asarray(fs.train, dtype=np.float32).reshape(-1, fs.train.shape[-1])
    y = np.tile(fs.train_targets, fs.train.shape[0])
    model.fit(X, y)
    C = len(fs.vocab)
    preds = Predictions(fs.vocab, fs.valid_ids, _proba(model, fs.valid, C), fs.valid_targets, fs.test_ids,
                        _proba(model, fs.test, C) if fs.test is not None else None, fs.test_targets)
    history = pd.DataFrame([{"epoch": 0, "stage": f"probe-{clf}"}])
    return store_run(cfg, store, preds, history, None, fs.train.shape[1], None, time.time() - t0, kind="probe",
                     stats=fs.stats, config_extra={"probe": clf, "features": fs.key, "probe_views": views})
