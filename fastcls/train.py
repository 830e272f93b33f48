"""One run from recipe to store: learner, frozen + unfrozen schedule, best-epoch tracking, predictions, save."""

__all__ = ["RunConfig", "learner", "train", "fit_run", "RunResult", "KeepBest", "EpochLine"]

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import EarlyStoppingCallback, TrackerCallback
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastcore.basics import noop

from . import data as fdata
from .archs import build_model, get_arch, splitter
from .errors import FastclsError
from .metrics import get_metric
from .predict import predict_views, tta_blend
from .recipe import Recipe
from .runs import RunData, RunStore


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run: the (overridden) recipe plus the run's own choices."""

    recipe: Recipe
    arch: str
    data: Optional[str] = None
    seed: int = 42
    weights: Optional[str] = None
    sample: Optional[int] = None
    name: Optional[str] = None

    def to_dict(self) -> dict:
        d = self.recipe.to_dict()
        d["recipe"] = d.pop("name")
        d.update(arch=self.arch, data=self.data, seed=self.seed, weights=self.weights, sample=self.sample,
                 run_name=self.name)
        return d


class KeepBest(TrackerCallback):
    """Track the monitored metric over both stages and restore the best epoch's weights at the end (in memory)."""

    order = TrackerCallback.order + 1

    def __init__(self, monitor: str, comp=np.greater):
        super().__init__(monitor=monitor, comp=comp, reset_on_fit=False)
        self.best_state, self.best_epoch, self.global_epoch = None, None, 0

    def after_epoch(self):
        super().after_epoch()
        if self.new_best:
            self.best_state = copy.deepcopy(self.learn.model.state_dict())
            self.best_epoch = self.global_epoch
        self.global_epoch += 1

    def restore(self, model):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


class EpochLine(Callback):
    """Collect one history row per epoch over all stages; print it as one line when there is no progress bar."""

    order = 60  # after the Recorder has logged the epoch

    def __init__(self, stage: str = "", echo: bool = True):
        self.rows, self.stage, self.echo = [], stage, echo

    def after_epoch(self):
        names = self.learn.recorder.metric_names[1:]
        vals = self.learn.recorder.log[1:]
        row = {"epoch": len(self.rows), "stage": self.stage}
        row.update({n: (float(v) if isinstance(v, (int, float, np.floating)) or hasattr(v, "item") else v)
                    for n, v in zip(names, vals)})
        self.rows.append(row)
        if self.echo:
            shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                              if k not in ("stage",))
            print(f"[{self.stage}] {shown}", flush=True)


def imbalance_plan(recipe: Recipe, dls):
    """The imbalance toolkit's plan (loss, sampler weights, post-hoc flag) for the recipe's training items."""
    from .imbalance import parse_imbalance, plan
    vocab = {v: i for i, v in enumerate(dls.vocab)}
    labels = np.array([vocab[l] for l in dls.train_ds.items["label"]])
    return plan(parse_imbalance(recipe.imbalance), labels, len(dls.vocab), label_smoothing=recipe.label_smoothing)


def learner(dls, cfg: RunConfig) -> Learner:
    """A fastai Learner for `cfg.arch` on `dls`: fastai head with dropout `ps`, >= 3 parameter groups, the metric."""
    recipe = cfg.recipe
    spec = get_arch(cfg.arch)
    if recipe.size is not None and recipe.size < spec.min_size:  # None: inferred by dls, see resolve_recipe
        raise FastclsError(f"Image size {recipe.size} is too small for {cfg.arch} (needs at least {spec.min_size}). "
                           f"Use --size {spec.min_size} or more.")
    set_seed(cfg.seed)
    model = build_model(cfg.arch, len(dls.vocab), ps=recipe.ps, pretrained=recipe.pretrained, weights=cfg.weights)
    model.body_groups = spec.body_groups
    metric = get_metric(recipe.metric)
    metrics = [metric.fastai()]
    if recipe.metric != "accuracy":
        metrics.insert(0, get_metric("accuracy").fastai())
    learn = Learner(dls, model, loss_func=imbalance_plan(recipe, dls).loss, metrics=metrics, splitter=splitter,
                    wd=recipe.wd if recipe.wd is not None else None)
    if recipe.pretrained or cfg.weights:
        learn.freeze()
    return learn


def train(learn: Learner, cfg: RunConfig, progress: str = "auto") -> tuple[pd.DataFrame, Optional[int]]:
    """Frozen stage, then the unfrozen stage with discriminative LRs; the best epoch's weights are kept.

    Args:
        learn: from `learner`.
        cfg: the run's config (epochs, freeze_epochs, lr, patience come from its recipe).
        progress: 'bar' (fastprogress bars), 'line' (one line per epoch), 'none', or 'auto' (bar on a terminal).

    Returns:
        The per-epoch history and the index of the best epoch.
    """
    recipe = cfg.recipe
    if progress == "auto":
        progress = "bar" if sys.stdout.isatty() else "line"
    if progress != "bar":
        learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ProgressCallback)])
        learn.logger = noop  # the Recorder would print raw lists; EpochLine prints readable ones
    monitor = learn.metrics[-1].name
    keep = KeepBest(monitor)
    lines = EpochLine(echo=progress == "line")
    cbs = [keep, lines]
    if recipe.patience:
        cbs.append(EarlyStoppingCallback(monitor=monitor, comp=np.greater, patience=recipe.patience, reset_on_fit=False))
    set_seed(cfg.seed)
    lr = recipe.lr
    frozen = (recipe.pretrained or cfg.weights) and recipe.freeze_epochs > 0
    if frozen:
        lines.stage = "frozen"
        learn.fit_one_cycle(recipe.freeze_epochs, lr, cbs=cbs)
        lr /= 2
    if recipe.epochs > 0:
        learn.unfreeze()
        lines.stage = "unfrozen" if frozen else "train"
        learn.fit_one_cycle(recipe.epochs, slice(lr / 100, lr) if frozen else lr, cbs=cbs)
    keep.restore(learn.model)
    return pd.DataFrame(lines.rows), keep.best_epoch


@dataclass
class RunResult:
    """What `fit_run` returns: the stored run id, its final metrics, and the live learner for notebooks."""

    run_id: str
    metrics: dict
    history: pd.DataFrame
    learn: Learner
    seconds: float


def fit_run(cfg: RunConfig, store: RunStore, progress: str = "auto", items: Optional[fdata.Items] = None,
            sweep: Optional[str] = None) -> RunResult:
    """Train one run and store it: the whole flow recipe -> dls -> learner -> train -> predict -> store.

    Args:
        cfg: the run's config.
        store: where the run is saved.
        progress: see `train`.
        items: already-read items (saves re-reading the data folder in sweeps).
        sweep: the sweep id this run belongs to, if any.
    """
    t0 = time.time()
    recipe = cfg.recipe
    get_arch(cfg.arch)
    get_metric(recipe.metric)
    store.check_writable()
    items = items if items is not None else fdata.read_items(recipe, cfg.data)
    recipe = fdata.resolve_recipe(recipe, items)  # e.g. a size inferred from the images, stored as the run's size
    cfg = dataclasses.replace(cfg, recipe=recipe)
    d = fdata.dls(recipe, items, seed=cfg.seed, sample=cfg.sample)
    learn = learner(d, cfg)
    history, best_epoch = train(learn, cfg, progress)
    valid_probs, valid_targets = predict_views(learn, d.valid, recipe.tta)
    tdl = fdata.test_dl(d, items)
    test_probs = predict_views(learn, tdl, recipe.tta)[0] if tdl is not None else None
    metric = get_metric(recipe.metric)
    vloss = _nll(valid_probs[0], valid_targets)
    metrics = {"metric_name": recipe.metric, recipe.metric: metric(valid_targets, valid_probs[0]),
               f"{recipe.metric}_tta": metric(valid_targets, tta_blend(valid_probs)), "valid_loss": vloss,
               "best_epoch": best_epoch, "n_train": len(d.train_ds),
               "n_valid": len(valid_targets)}
    if recipe.metric != "accuracy":
        metrics["accuracy"] = get_metric("accuracy")(valid_targets, valid_probs[0])
    if test_probs is not None and "label" in items.test:
        y = _encode(items.test["label"], d.vocab)
        if y is not None:
            metrics[f"test_{recipe.metric}"] = metric(y, test_probs[0])
            metrics[f"test_{recipe.metric}_tta"] = metric(y, tta_blend(test_probs))
    seconds = time.time() - t0
    run = RunData(config=cfg.to_dict(), vocab=list(d.vocab), valid_probs=valid_probs, valid_targets=valid_targets,
                  valid_ids=d.valid_ds.items["id"].tolist(), metrics=metrics, test_probs=test_probs,
                  test_ids=items.test["id"].tolist() if test_probs is not None else None, history=history,
                  weights=learn.model.state_dict(), name=cfg.name, seconds=seconds, sweep=sweep,
                  # the data set's own mean/std (normalize='dataset'): predicting later must reuse them (dls(stats=...))
                  extra={"normalize_stats": d.stats} if d.stats is not None else {})
    rid = store.save(run)
    return RunResult(rid, metrics, history, learn, seconds)


def _nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the targets under stored probabilities."""
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-8, None)).mean())


def _encode(labels: pd.Series, vocab) -> Optional[np.ndarray]:
    idx = {str(v): i for i, v in enumerate(vocab)}
    if not all(str(l) in idx for l in labels):
        return None
    return np.array([idx[str(l)] for l in labels])
