"""One run from recipe to store: prepare (items checked, recipe resolved), train (frozen + unfrozen stages with the
callbacks), predict, store; resume an interrupted run."""

__all__ = ["check_new_name", "Prepared", "prepare", "train", "fit_run", "resume_run", "RunResult", "Predictions", "run_metrics",
           "fit_posthoc_steps", "with_posthoc", "store_run", "posthoc_metric"]

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.torch_core import set_seed
from fastcore.basics import noop

from .. import data as fdata
from . import distributed as fdist
from ..config import RunConfig
from ..archs import get_arch
from .callbacks import EarlyStop, EpochLine, KeepBest, KeepBnStats
from .checkpoint import Checkpointer, RunInterrupted, interrupt_signals, read_checkpoint
from .learner import imbalance_plan, learner, metric_names, schedule
from .mixing import check_mixing, mixing
from .ema import Ema, choose
from .resize import ProgressiveResize, check_progressive, epoch_sizes, size_loaders
from .schedules import accumulation, check_schedule, fit_stage, plateau
from ..errors import FastclsError
from ..posthoc import PostHoc, fit_posthoc
from ..imbalance import DeferredReweight, parse_imbalance
from ..metrics import expected_calibration_error, get_metric
from ..predict import choose_tta_beta, encode_labels, predict_views, tta_blend, view_count
from ..recipe import Recipe
from ..runs import RunData, RunStore


@dataclass(frozen=True)
class Prepared:
    """A run's inputs, checked once before anything trains (see `prepare`)."""

    cfg: RunConfig  # its recipe resolved (e.g. a size inferred from the images: stored as the run's size)
    items: fdata.Items  # read and image-checked (`cfg.on_bad_image`)
    imbalance: tuple  # the recipe's imbalance strategies, parsed (`fastcls.imbalance.parse_imbalance`)

    def dls(self, **changes):
        """The run's fastai DataLoaders: its split or fold, sample, workers and normalisation (`cfg.norm_stats`);
        `changes` override recipe settings (e.g. ``bs``)."""
        cfg = self.cfg
        return fdata.dls(cfg.recipe.override(**changes) if changes else cfg.recipe, self.items, seed=cfg.seed,
                         sample=cfg.sample, num_workers=cfg.workers, stats=cfg.norm_stats,
                         fold=(cfg.fold, cfg.folds) if cfg.folds else None)


def check_new_name(store: RunStore, name: Optional[str], allow=()) -> None:
    """Refuse a run name `store` already holds (but for runs in `allow`): a name must find one run, or `show`,
    `submit`, `ensemble` would answer "matches 2 runs". Checked before anything trains."""
    if not name or not fdist.is_main() or not (store.root / "index.sqlite").exists():
        return  # (under a launcher only rank 0 stores the run: the other ranks would find rank 0's new run)
    df = store.leaderboard(status=None, sort="newest")
    taken = df[(df["name"] == name) & ~df["id"].isin(list(allow))]
    if len(taken):
        r = taken.iloc[0]
        todo = f"continue it with `fastcls resume {r['id']}`, or " if r["status"] in ("interrupted", "failed") else ""
        raise FastclsError(f"--name {name!r} is taken: run {r['id']} ({r['kind']}, {r['status']}) in {store.root} has "
                           f"it, and a name must find one run. Nothing was trained; {todo}choose another --name, or "
                           f"leave it out (a unique name is made), or delete {store.root / r['id']} first.")


def prepare(cfg: RunConfig, items: Optional[fdata.Items] = None, store: Optional[RunStore] = None) -> Prepared:
    """Everything a run (or a cv, a student, a probe, a sweep) checks before training, done once.

    Args:
        cfg: the run's config.
        items: already-read items (else read from `cfg.data`); checked again only if not checked already.
        store: checked to be writable (before the data is read), when given.

    Returns:
        The `Prepared` inputs: config with the resolved recipe, checked items, parsed imbalance strategies.

    Raises:
        FastclsError: an unknown arch or metric, a bad imbalance spec (before the data is read), an unwritable
            store, unusable data or images.
    """
    get_arch(cfg.arch)
    metric_names(cfg.recipe)  # unknown metrics and a bad imbalance spec fail before the data is read
    strategies = parse_imbalance(cfg.recipe.imbalance)
    check_mixing(cfg.recipe, strategies)
    check_schedule(cfg.recipe)
    check_progressive(cfg)
    if store is not None:
        store.check_writable()
    items = items if items is not None else fdata.read_items(cfg.recipe, cfg.data)
    items = fdata.check_images(items, cfg.on_bad_image, cache_dir=fdata.cache_home())
    recipe = fdata.resolve_recipe(cfg.recipe, items)
    return Prepared(dataclasses.replace(cfg, recipe=recipe), items, strategies)


def train(learn: Learner, cfg: RunConfig, progress: str = "auto", stages=None, cbs: tuple = (),
          checkpoint: Optional[Checkpointer] = None,
          sized: Optional[dict] = None) -> tuple[pd.DataFrame, Optional[int]]:
    """Frozen stage, then the unfrozen stage with discriminative LRs, each with the recipe's optimizer and lr
    schedule (`fastcls.train.schedules`); the best epoch's weights are kept.

    Args:
        learn: from `learner`.
        cfg: the run's config (epochs, freeze_epochs, lr, patience come from its recipe).
        progress: 'bar' (fastprogress bars), 'line' (one line per epoch), 'none', or 'auto' (bar on a terminal).
        stages: (name, epochs, lr, unfreeze) tuples to run instead of `schedule(cfg)` (the sweeps' fast path runs
            the frozen stage alone, on cached features: not mixed).
        cbs: extra callbacks for every stage.
        checkpoint: saves the training state after every epoch; when it holds a checkpoint, training continues
            from there (fastai's `start_epoch`) instead of starting over.
        sized: {size: DataLoaders} of the recipe's `progressive_sizes` (`fastcls.train.resize.size_loaders`): each
            epoch trains at its size (`epoch_sizes`), validation stays on `learn.dls` (the final size).

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
    better = get_metric(recipe.monitor or recipe.metric).better  # log loss: lower is better
    keep = KeepBest(monitor, comp=better)
    lines = EpochLine(echo=progress == "line")
    cbs = [keep, lines, *cbs]
    if stages is None and cfg.keep_bn_stats:  # a full model (the fast path's heads read cached features)
        cbs.append(KeepBnStats())
    es = None
    if recipe.patience:
        es = EarlyStop(monitor=monitor, comp=better, patience=recipe.patience, reset_on_fit=False)
        cbs.append(es)
    ema = Ema(recipe.ema) if recipe.ema and stages is None else None  # for the last stage only
    plan = getattr(learn, "imbalance", None)
    drw = DeferredReweight(plan.drw, recipe.drw_start) if plan is not None and plan.drw is not None else None
    learn.run_ema = ema  # (not `learn.ema`: fastai names an added callback `ema` on the learner and deletes it after)
    cut = plateau(recipe, monitor)
    if cut is not None:
        cbs.append(cut)
    if checkpoint is not None:
        checkpoint.attach(keep, lines, es, ema, cut)
        cbs.append(checkpoint)
    mix = mixing(recipe) if stages is None else None
    if mix is not None:
        cbs.append(mix)
    acc = accumulation(recipe)
    if acc is not None:
        cbs.append(acc)
    set_seed(cfg.seed)
    resize = None
    if sized and stages is None:  # (not on the fast path's cached features)
        resize = ProgressiveResize(sized, epoch_sizes(recipe, sum(n for _, n, _, _ in schedule(cfg))), learn.dls)
        cbs.append(resize)
    stages = schedule(cfg, len(learn.splitter(learn.model))) if stages is None else stages
    for i, (stage, n_epochs, lr, unfreeze) in enumerate(stages):
        if unfreeze:
            learn.unfreeze()
        if resize is not None:
            resize.first = sum(n for _, n, _, _ in stages[:i])
        if mix is not None:  # the last stage's last `mix_off_epoch` epochs train on plain batches
            last = i == len(stages) - 1 and recipe.mix_off_epoch
            mix.off_from = n_epochs - recipe.mix_off_epoch if last else None
        lines.stage = stage
        start = 0
        if checkpoint is not None:
            checkpoint.stage = i
            start = checkpoint.start_epoch(i, n_epochs)
        if start < n_epochs:  # a resumed run skips the stages and epochs it had finished
            last = [c for c in (ema, drw) if c is not None] if i == len(stages) - 1 else []
            fit_stage(learn, recipe, n_epochs, lr, cbs + last, start)
    if checkpoint is not None and checkpoint.pending:  # every epoch was done before: only the state is left to load
        checkpoint.restore(learn)
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
            sweep: Optional[str] = None, run_id: Optional[str] = None, kind: str = "train",
            extra: Optional[dict] = None, cbs: tuple = ()) -> RunResult:
    """Train one run and store it: the whole flow recipe -> dls -> learner -> train -> predict -> store.

    Every check that can fail (data table, unreadable images, runs folder writable and large enough) happens
    before training. The run is in the store from the start with status 'running' and a checkpoint after every
    epoch; Ctrl-C or SIGTERM marks it 'interrupted' and raises `RunInterrupted` (resume with `resume_run`).

    Args:
        cfg: the run's config.
        store: where the run is saved.
        progress: see `train`.
        items: already-read items (saves re-reading the data folder in sweeps).
        sweep: the sweep id this run belongs to, if any.
        run_id: continue this interrupted run of `store` from its checkpoint instead of starting a new one.
        kind: the run's kind in the store (e.g. 'pseudo' for a noisy-student round).
        extra: more facts for the run's meta.json (e.g. how many pseudo-labels it used).
        cbs: extra fastai callbacks for training (e.g. `fastcls.student`'s soft targets).
    """
    t0 = time.time()
    store = fdist.rank_store(store)  # several processes (accelerate launch): only rank 0 writes to the real store
    progress = progress if fdist.is_main() else "none"
    prep = prepare(cfg, items, store)
    cfg, items, recipe = prep.cfg, prep.items, prep.cfg.recipe
    d = prep.dls()
    sized = size_loaders(prep.dls, recipe)  # progressive resizing: the smaller sizes' loaders
    resume = read_checkpoint(store.checkpoint_path(run_id)) if run_id else None
    learn = learner(d, cfg, load_weights=resume is None, plan=imbalance_plan(recipe, d, prep.imbalance))
    store.check_writable(_bytes_needed(learn, d, items, recipe))
    prior = 0.0
    if run_id:
        store.claim(run_id)
        prior = float(store.load(run_id, any_status=True).meta.get("seconds") or 0)
    rid = run_id or store.begin(cfg.to_dict(), name=cfg.name, kind=kind, sweep=sweep)
    ckpt = Checkpointer(store.checkpoint_path(rid), resume)
    try:
        with interrupt_signals():
            return _train_and_store(cfg, store, rid, learn, d, items, ckpt, progress, t0 - prior, sweep, kind, extra,
                                    cbs, sized)
    except KeyboardInterrupt as e:
        if store.is_done(rid):  # Ctrl-C in the last instant of saving: the run is complete
            raise
        e = str(e)  # a bare Ctrl-C has no message: say "Ctrl-C", never "()"
        total = sum(n for _, n, _, _ in schedule(cfg))
        _quietly(store.set_status, rid, "interrupted", seconds=time.time() - t0 + prior, epochs_done=ckpt.epochs_done,
                 note=f"interrupted ({e or 'Ctrl-C'}) after {ckpt.epochs_done} of {total} epochs")
        if kind in REBUILT_BY:
            raise RunInterrupted(f"Run {rid} interrupted ({e or 'Ctrl-C'}) after {ckpt.epochs_done} of {total} "
                                 f"epochs. {_rebuild_hint(kind)}", rid) from None
        raise RunInterrupted(f"Run {rid} interrupted ({e or 'Ctrl-C'}) after {ckpt.epochs_done} of {total} epochs. "
                             f"Its state at the end of the last finished epoch is saved in {store.run_dir(rid)}. "
                             f"Continue it with `fastcls resume {rid}"
                             + (f" --runs-dir {store.root}" if str(store.root) != "runs" else "") + "`.", rid) from None
    except BaseException as e:
        if store.is_done(rid):
            raise
        full = _disk_full(e)
        _quietly(store.set_status, rid, "failed", seconds=time.time() - t0 + prior, epochs_done=ckpt.epochs_done,
                 note=f"the disk filled ({e})" if full else f"{type(e).__name__}: {e}")
        if full:  # not a bug: say what happened and how to go on
            raise FastclsError(f"The disk of {store.root} filled while run {rid} was being written ({e}). Its last "
                               f"finished epoch ({ckpt.epochs_done}) is kept; free some space, then continue it with "
                               f"`fastcls resume {rid} --runs-dir {store.root}`.") from None
        raise


def _train_and_store(cfg: RunConfig, store: RunStore, rid: str, learn: Learner, d, items: fdata.Items,
                     ckpt: Checkpointer, progress: str, t0: float, sweep: Optional[str], kind: str = "train",
                     extra: Optional[dict] = None, cbs: tuple = (), sized: Optional[dict] = None) -> RunResult:
    recipe = cfg.recipe
    with fdist.distrib(learn):
        history, best_epoch = train(learn, cfg, progress, checkpoint=ckpt, cbs=cbs, sized=sized)
    if sized:
        extra = {**(extra or {}), "epoch_sizes": epoch_sizes(recipe, sum(n for _, n, _, _ in schedule(cfg)))}
    tdl = fdata.test_dl(d, items)

    def predict():
        return (*predict_views(learn, d.valid, recipe.tta, recipe.tta_views),
                predict_views(learn, tdl, recipe.tta, recipe.tta_views)[0] if tdl is not None else None)
    ema_metrics, ema_meta = {}, {}
    if learn.run_ema is not None and learn.run_ema.weights is not None:  # raw and averaged model: keep the better
        (valid_probs, valid_targets, test_probs), ema_metrics, ema_meta = choose(learn, learn.run_ema, recipe, predict)
        ema_meta = {"ema": ema_meta}
    else:
        valid_probs, valid_targets, test_probs = predict()
    has_test = test_probs is not None
    preds = Predictions(list(d.vocab), d.valid_ds.items["id"].tolist(), valid_probs, valid_targets,
                        items.test["id"].tolist() if has_test else None, test_probs,
                        encode_labels(items.test["label"], d.vocab) if has_test and "label" in items.test else None)
    return store_run(cfg, store, preds, history, best_epoch, len(d.train_ds), learn.model.state_dict(),
                     time.time() - t0, learn=learn, sweep=sweep, stats=d.stats, run_id=rid, kind=kind,
                     extra={**({"bad_images": items.bad} if items.bad else {}), "accel": learn.accel,
                            **({"processes": fdist.world_size()} if fdist.world_size() > 1 else {}),
                            "image_cache": d.cached, **ema_meta, **(extra or {})}, metrics_extra=ema_metrics)


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


def run_metrics(recipe: Recipe, preds: Predictions, best_epoch: Optional[int], n_train: int,
                raw: Optional[Predictions] = None, posthoc: Optional[PostHoc] = None) -> dict:
    """Final metrics of a run from its stored predictions: each of the recipe's metrics (see `_metric_names`) plain
    and TTA-blended on valid, and on test where the data has test labels; valid loss. The TTA blend is the recipe's
    `tta_blend`, else the one that scores best on valid (`predict.choose_tta_beta`), recorded as `tta_beta`.

    With post-hoc steps (`posthoc`, fitted on valid), `preds` are the adjusted predictions and `raw` the model's own:
    their scores get a `_raw` suffix. Valid scores after a post-hoc step are in-sample (optimistic); test scores are
    held out.
    """
    names = metric_names(recipe)
    vp, vt = preds.valid_probs, preds.valid_targets
    has_test = preds.test_probs is not None and preds.test_targets is not None
    metrics = {"metric_name": recipe.metric}
    if posthoc is not None and posthoc.applied:
        metrics["posthoc"] = posthoc.describe()
        if posthoc.tau is not None:
            metrics["logit_adjust_tau"] = posthoc.tau
    beta = recipe.tta_blend
    beta = choose_tta_beta(vp, vt, recipe.monitor or recipe.metric) if beta is None else beta
    metrics["tta_beta"] = beta
    metrics.update(_scores(names, vt, vp, beta))
    if has_test:
        metrics.update(_scores(names, preds.test_targets, preds.test_probs, beta, prefix="test_"))
    if raw is not None:
        metrics.update(_scores(names, vt, raw.valid_probs, beta, suffix="_raw"))
        if has_test:
            metrics.update(_scores(names, raw.test_targets, raw.test_probs, beta, prefix="test_", suffix="_raw"))
    metrics.update(valid_loss=_nll(vp[0], vt), best_epoch=best_epoch, n_train=n_train, n_valid=len(vt))
    metrics["ece"] = expected_calibration_error(vt, vp[0])
    if raw is not None:
        metrics["ece_raw"] = expected_calibration_error(vt, raw.valid_probs[0])
    return metrics


def fit_posthoc_steps(recipe: Recipe, preds: Predictions, learn=None, prior=None) -> PostHoc:
    """The recipe's post-hoc steps (logit adjustment, thresholds) fitted on the valid plain view of `preds`.

    Tau is tuned for the recipe's `monitor` (macro-F1 when it has none); the prior is `prior` (class counts or
    frequencies) or else the learner's training classes (its imbalance plan, `learn.imbalance`).
    """
    if prior is None and learn is not None:  # the plan the learner was built with: nothing parsed or built again
        adjust, prior = learn.imbalance.logit_adjust, learn.imbalance.prior
    else:
        adjust = "logit-adjust" in parse_imbalance(recipe.imbalance)
    if not adjust:
        prior = None
    elif prior is None:
        raise FastclsError("Logit adjustment needs the training class counts: pass the learner to store_run.")
    return fit_posthoc(preds.valid_probs[0], preds.valid_targets, prior, recipe.tune_thresholds,
                       metric=posthoc_metric(recipe), calibrate=recipe.calibrate)


def posthoc_metric(recipe: Recipe) -> str:
    """What post-hoc steps and ensembles optimise on valid: the recipe's monitor (it stands for the test score), else
    its metric, except plain accuracy (tuning for it on a skewed valid split undoes the adjustment: macro-F1)."""
    return recipe.monitor or (recipe.metric if recipe.metric != "accuracy" else "macro_f1")


def with_posthoc(recipe: Recipe, preds: Predictions, learn=None, prior=None):
    """The recipe's post-hoc steps fitted on valid and applied to every stored view of valid and test.

    Returns (adjusted predictions, the model's own predictions or None when no step applies, the `PostHoc`).
    """
    post = fit_posthoc_steps(recipe, preds, learn, prior)
    if not post.applied:
        return preds, None, post
    test = None if preds.test_probs is None else post.apply(preds.test_probs)
    return dataclasses.replace(preds, valid_probs=post.apply(preds.valid_probs), test_probs=test), preds, post


def store_run(cfg: RunConfig, store: RunStore, preds: Predictions, history: pd.DataFrame, best_epoch: Optional[int],
              n_train: int, weights: dict, seconds: float, learn=None, sweep: Optional[str] = None,
              kind: str = "train", config_extra: Optional[dict] = None, stats=None, run_id: Optional[str] = None,
              extra: Optional[dict] = None, metrics_extra: Optional[dict] = None) -> RunResult:
    """Score `preds` and save the run (config, metrics, history, weights, probabilities) atomically in `store`.

    `stats` is the data set's own mean/std (normalize='dataset'): predicting later must reuse them (dls(stats=...)).
    `run_id`: the run started with `store.begin` that these results finish; `extra`: more facts for its meta.json;
    `metrics_extra`: more final metrics (e.g. the raw and EMA models' valid scores).
    """
    preds, raw, post = with_posthoc(cfg.recipe, preds, learn)
    if post.applied:
        extra = {**(extra or {}), "posthoc": post.to_dict()}
    metrics = {**run_metrics(cfg.recipe, preds, best_epoch, n_train, raw=raw, posthoc=post), **(metrics_extra or {})}
    run = RunData(config={**cfg.to_dict(), **(config_extra or {})}, vocab=preds.vocab, valid_probs=preds.valid_probs,
                  valid_targets=preds.valid_targets, valid_ids=preds.valid_ids, metrics=metrics,
                  test_probs=preds.test_probs, test_ids=preds.test_ids, history=history, weights=weights,
                  kind=kind, name=cfg.name, seconds=seconds, sweep=sweep,
                  extra={**({"normalize_stats": stats} if stats is not None else {}), **(extra or {})})
    rid = store.finish(run_id, run) if run_id else store.save(run)
    return RunResult(rid, metrics, history, learn, seconds)


# kinds of run whose training set only the command that made them can rebuild (from their teachers' stored
# probabilities): `resume` would read the recipe's own data instead and train something else
REBUILT_BY = {"pseudo": "fastcls pseudo-label", "distill": "fastcls distill"}


def _rebuild_hint(kind: str) -> str:
    return (f"It is a {kind} student: its training set (the teachers' pseudo-labels or soft targets) is built by "
            f"`{REBUILT_BY[kind]}`, so run that command again (the student trains from the start).")


def resume_run(store: RunStore, ref: str, progress: str = "auto", recipes=(), data: Optional[str] = None,
               items: Optional[fdata.Items] = None) -> RunResult:
    """Continue an interrupted (or failed) run from its last checkpoint to the result an uninterrupted run gives.

    Args:
        store: the run store holding the run.
        ref: run id, unique id prefix or name.
        progress: see `train`.
        recipes: extra recipe folders (when the run's recipe is not built in).
        data: the data folder, when it moved since the run started.
        items: already-read items of that data (sweeps).
    """
    run = store.load(ref, any_status=True)
    if run.status == "done":
        raise FastclsError(f"Run {run.id} is already done; nothing to resume.")
    if run.kind in REBUILT_BY:
        raise FastclsError(f"Run {run.id} cannot be resumed. {_rebuild_hint(run.kind)}")
    cfg = RunConfig.from_dict(run.config, recipes)
    if data is not None:
        cfg = dataclasses.replace(cfg, data=str(data))
    return fit_run(cfg, store, progress, items=items, sweep=run.row.get("sweep"), run_id=run.id)


def _bytes_needed(learn: Learner, d, items: fdata.Items, recipe: Recipe) -> int:
    """Disk a run needs: final weights, a checkpoint (model, best, optimizer moments) written beside the old one
    while it is replaced, and the stored probabilities; plus a margin."""
    weights = sum(v.numel() * v.element_size() for v in learn.model.state_dict().values())
    n_items = len(d.valid_ds) + (len(items.test) if items.test is not None else 0)
    probs = 4 * view_count(recipe) * n_items * len(d.vocab)
    return weights * (1 + 2 * 4) + probs + 16 * 2**20


def _disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk is full (an OSError ENOSPC, or safetensors' / torch's wrapped IoError)."""
    import errno
    return (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        s in str(e) for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))


def _quietly(fn, *args, **kwargs):
    """Record a run's status on the way out without hiding the error that brought us here."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001  (the original exception matters more)
        print(f"fastcls: could not record the run's status: {e}", file=sys.stderr)


def _scores(names, y, views, beta: float, prefix: str = "", suffix: str = "") -> dict:
    """Each metric on the plain view and on the TTA blend at `beta` of stacked `views`."""
    blend = tta_blend(views, beta)
    out = {}
    for n in names:
        m = get_metric(n)
        out[f"{prefix}{n}{suffix}"] = m(y, views[0])
        out[f"{prefix}{n}_tta{suffix}"] = m(y, blend)
    return out


def _nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the targets under stored probabilities."""
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-8, None)).mean())
