"""One run from recipe to store: learner, frozen + unfrozen schedule, best-epoch tracking, predictions, save."""

__all__ = ["RunConfig", "learner", "schedule", "train", "fit_run", "RunResult", "Predictions", "run_metrics",
           "store_run", "KeepBest", "EpochLine"]

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
from fastai.torch_core import set_seed, trainable_params
from fastcore.basics import noop

from . import data as fdata
from .archs import build_model, check_size, get_arch, splitter
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


def learner(dls, cfg: RunConfig, model=None) -> Learner:
    """A fastai Learner for `cfg.arch` on `dls`: fastai head with dropout `ps`, >= 3 parameter groups, the metric.

    `model` replaces the arch's full model and is trained whole (the sweeps' fast path passes a head that reads
    cached body features); loss, metrics and weight decay are the recipe's either way.
    """
    recipe = cfg.recipe
    spec = get_arch(cfg.arch)
    full = model is None
    if full:
        check_size(cfg.arch, recipe.size)
        set_seed(cfg.seed)
        model = build_model(cfg.arch, len(dls.vocab), ps=recipe.ps, pretrained=recipe.pretrained, weights=cfg.weights)
        model.body_groups = spec.body_groups
    metric = get_metric(recipe.metric)
    metrics = [metric.fastai()]
    if recipe.metric != "accuracy":
        metrics.insert(0, get_metric("accuracy").fastai())
    learn = Learner(dls, model, loss_func=imbalance_plan(recipe, dls).loss, metrics=metrics,
                    splitter=splitter if full else trainable_params, wd=recipe.wd if recipe.wd is not None else None)
    if full and (recipe.pretrained or cfg.weights):
        learn.freeze()
    return learn


def schedule(cfg: RunConfig) -> list[tuple[str, int, object, bool]]:
    """The run's stages as (name, epochs, lr, unfreeze): the frozen stage (pretrained bodies), then the unfrozen one."""
    recipe = cfg.recipe
    lr = recipe.lr
    frozen = bool((recipe.pretrained or cfg.weights) and recipe.freeze_epochs > 0)
    stages = []
    if frozen:
        stages.append(("frozen", recipe.freeze_epochs, lr, False))
        lr /= 2
    if recipe.epochs > 0:
        stages.append(("unfrozen" if frozen else "train", recipe.epochs, slice(lr / 100, lr) if frozen else lr, True))
    return stages


def train(learn: Learner, cfg: RunConfig, progress: str = "auto", stages=None,
          cbs: tuple = ()) -> tuple[pd.DataFrame, Optional[int]]:
    """Frozen stage, then the unfrozen stage with discriminative LRs; the best epoch's weights are kept.

    Args:
        learn: from `learner`.
        cfg: the run's config (epochs, freeze_epochs, lr, patience come from its recipe).
        progress: 'bar' (fastprogress bars), 'line' (one line per epoch), 'none', or 'auto' (bar on a terminal).
        stages: (name, epochs, lr, unfreeze) tuples to run instead of `schedule(cfg)` (the sweeps' fast path runs
            the frozen stage alone).
        cbs: extra callbacks for every stage.

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
    cbs = [keep, lines, *cbs]
    if recipe.patience:
        cbs.append(EarlyStoppingCallback(monitor=monitor, comp=np.greater, patience=recipe.patience, reset_on_fit=False))
    set_seed(cfg.seed)
    for stage, n_epochs, lr, unfreeze in (schedule(cfg) if stages is None else stages):
        if unfreeze:
            learn.unfreeze()
        lines.stage = stage
        learn.fit_one_cycle(n_epochs, lr, cbs=cbs)
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
    has_test = test_probs is not None
    preds = Predictions(list(d.vocab), d.valid_ds.items["id"].tolist(), valid_probs, valid_targets,
                        items.test["id"].tolist() if has_test else None, test_probs,
                        _encode(items.test["label"], d.vocab) if has_test and "label" in items.test else None)
    return store_run(cfg, store, preds, history, best_epoch, len(d.train_ds), learn.model.state_dict(),
                     time.time() - t0, learn=learn, sweep=sweep, stats=d.stats)


@dataclass
class Predictions:
    """A run's stored predictions: plain + TTA views of the valid and (optional) test items, in item-id order."""

    vocab: list
    valid_ids: list
    valid_probs: np.ndarray  # (views, N, C)
    valid_targets: np.ndarray  # (N,)
    test_ids: Optional[list] = None
    test_probs: Optional[np.ndarray] = None  # (views, M, C)
    test_targets: Optional[np.ndarray] = None  # true test labels when the data has them (scoring only)


def run_metrics(recipe: Recipe, preds: Predictions, best_epoch: Optional[int], n_train: int) -> dict:
    """Final metrics of a run from its stored predictions: the recipe's metric plain and TTA-blended, valid loss."""
    metric = get_metric(recipe.metric)
    vp, vt = preds.valid_probs, preds.valid_targets
    metrics = {"metric_name": recipe.metric, recipe.metric: metric(vt, vp[0]),
               f"{recipe.metric}_tta": metric(vt, tta_blend(vp)), "valid_loss": _nll(vp[0], vt),
               "best_epoch": best_epoch, "n_train": n_train, "n_valid": len(vt)}
    if recipe.metric != "accuracy":
        metrics["accuracy"] = get_metric("accuracy")(vt, vp[0])
    if preds.test_probs is not None and preds.test_targets is not None:
        metrics[f"test_{recipe.metric}"] = metric(preds.test_targets, preds.test_probs[0])
        metrics[f"test_{recipe.metric}_tta"] = metric(preds.test_targets, tta_blend(preds.test_probs))
    return metrics


def store_run(cfg: RunConfig, store: RunStore, preds: Predictions, history: pd.DataFrame, best_epoch: Optional[int],
              n_train: int, weights: dict, seconds: float, learn=None, sweep: Optional[str] = None,
              kind: str = "train", config_extra: Optional[dict] = None, stats=None) -> RunResult:
    """Score `preds` and save the run (config, metrics, history, weights, probabilities) atomically in `store`.

    `stats` is the data set's own mean/std (normalize='dataset'): predicting later must reuse them (dls(stats=...)).
    """
    metrics = run_metrics(cfg.recipe, preds, best_epoch, n_train)
    run = RunData(config={**cfg.to_dict(), **(config_extra or {})}, vocab=preds.vocab, valid_probs=preds.valid_probs,
                  valid_targets=preds.valid_targets, valid_ids=preds.valid_ids, metrics=metrics,
                  test_probs=preds.test_probs, test_ids=preds.test_ids, history=history, weights=weights,
                  kind=kind, name=cfg.name, seconds=seconds, sweep=sweep,
                  extra={"normalize_stats": stats} if stats is not None else {})
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
