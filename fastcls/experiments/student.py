"""Students of stored runs: noisy-student pseudo-labelling and distillation from stored probabilities.

Both read the teacher from the run store only (`fastcls.ensemble.aligned_probs`: each run's TTA blend, the mean over
several runs); no teacher model is loaded. The student is a normal training run (`fastcls.train.fit_run`) of the
teacher's recipe, validated on the recipe's own split for the seed, so its valid metric is comparable with (and
ensembles with) runs trained the usual way.

- `pseudo_label`: test items whose teacher probability reaches the threshold join the training set with the
  teacher's label; the student trains with noise (the recipe's augmentation, head dropout `ps`, stochastic depth
  where the arch has it); each round's student is the next round's teacher. Every round is a run of kind 'pseudo'.
- `distill`: the student's loss is alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(hard label)
  (Hinton et al. 2015), soft targets taken from the teacher's stored validation probabilities (the out-of-fold ones
  of a cv run cover every training item) and, with `unlabeled`, its test probabilities (soft targets only).
"""

__all__ = ["StudentResult", "teacher_config", "pseudo_label", "distill", "distill_loss", "SoftTargets"]

import dataclasses
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from .. import data as fdata
from ..archs import drop_path_rate, get_arch
from ..ensemble import aligned_probs
from ..errors import FastclsError
from .executors import run_one
from ..metrics import get_metric
from ..recipe import Recipe
from ..runs import RunStore, StoredRun
from ..config import RunConfig
from ..predict import encode_labels
from ..train import check_new_name, fit_run, prepare


@dataclass
class StudentResult:
    """What `pseudo_label` and `distill` return: the student run ids (one per round) and the table printed."""

    run_ids: list
    table: pd.DataFrame


def teacher_config(store: RunStore, run: StoredRun, recipes=()) -> RunConfig:
    """The training config behind a stored run (an ensemble's first member's, a cv run's without its folds)."""
    seen = set()
    while run.kind == "ensemble":
        if run.id in seen or not run.config.get("members"):
            raise FastclsError(f"Ensemble run {run.id} lists no member runs to take the recipe's settings from.")
        seen.add(run.id)
        run = store.load(run.config["members"][0])
    if "arch" not in run.config or "seed" not in run.config:
        raise FastclsError(f"Run {run.id} ({run.kind}) records no training config to train a student from.")
    cfg = RunConfig.from_dict(run.config, recipes)
    return dataclasses.replace(cfg, fold=None, folds=None, name=None)


def _student_config(store: RunStore, runs: list, arch: Optional[str], recipes, data, overrides: dict) -> RunConfig:
    if not runs:
        raise FastclsError("Give at least one teacher run (id, id prefix or name; see `fastcls runs`).")
    cfg = teacher_config(store, runs[0], recipes)
    if arch is not None:
        get_arch(arch)
    recipe = cfg.recipe.override(**{k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(cfg, arch=arch or cfg.arch, recipe=recipe, data=str(data) if data else cfg.data)


def _split_items(cfg: RunConfig, items: fdata.Items) -> pd.DataFrame:
    """The training items (after --sample) with the (resolved) recipe's own validation split for the seed in
    `is_valid`."""
    train = fdata.sample_items(items.train, cfg.sample, cfg.recipe.split_seed)
    return fdata.assign_split(train, cfg.recipe, cfg.recipe.split_seed).reset_index(drop=True)


def _given(cfg: RunConfig, items: fdata.Items, train: pd.DataFrame, name: str) -> tuple[RunConfig, fdata.Items]:
    """A config and items that train on `train` as split in its `is_valid` column (sampling already done)."""
    cols = [c for c in ("id", "x", "label", "src", "is_valid") if c in train]
    return (dataclasses.replace(cfg, recipe=cfg.recipe.override(split="given"), sample=None, name=name),
            dataclasses.replace(items, train=train[cols].reset_index(drop=True)))


def _test_rows(items: fdata.Items, ids: list, sel: np.ndarray, labels: list) -> pd.DataFrame:
    """Test items `ids[sel]` as training rows labelled `labels` (never their true labels), ids prefixed 'test:'."""
    test = items.test.assign(id=items.test["id"].astype(str)).set_index("id", drop=False)
    chosen = [ids[i] for i in np.flatnonzero(sel)]
    cols = [c for c in ("x", "src") if c in test]
    rows = test.loc[chosen, cols].reset_index(drop=True)
    return rows.assign(id=[f"test:{i}" for i in chosen], label=labels, is_valid=False)


def _check_test_ids(items: fdata.Items, ids: list, what: str):
    have = set() if items.test is None else set(items.test["id"].astype(str))
    missing = [i for i in ids if i not in have]
    if missing:
        raise FastclsError(f"The {what} holds test items that the data has not (e.g. {missing[0]!r}); the data "
                           "changed since it was trained, or --data points elsewhere.")


def pseudo_label(store: RunStore, refs: list, threshold: float = 0.9, rounds: int = 1, arch: Optional[str] = None,
                 drop_path: Optional[float] = 0.1, progress: str = "auto", recipes=(), data=None,
                 name: Optional[str] = None, items: Optional[fdata.Items] = None, executor=None,
                 **overrides) -> StudentResult:
    """Noisy-student rounds: pseudo-label the test items the teacher is sure of, train a noisy student, repeat.

    Args:
        store: the run store (teachers are read from it, students saved to it).
        refs: teacher runs (several: the mean of their TTA-blended test probabilities).
        threshold: a test item joins the training set when the teacher's top probability is >= threshold.
        rounds: student generations; round r+1's teacher is round r's student.
        arch: the student's arch (default: the first teacher's).
        drop_path: the student's stochastic depth (where the arch has it; None: the recipe's).
        progress: see `fastcls.train.train`.
        recipes: extra recipe folders; data: the data folder (default: the teacher's).
        name: run names are `<name>-r<round>` (default 'pseudo-<first teacher id>').
        items: already-read items.
        executor: trains each round's student (default: here; `fastcls.executors.RayExecutor`: a Ray task, e.g. on
            a GPU machine of a cluster, stored by this process).
        overrides: recipe settings for the student (e.g. epochs, lr, ps); None keeps the teacher's.

    Returns:
        A `StudentResult`; its table has one row per round: valid metric, pseudo-labels used, and how many of them
        are new, dropped or relabelled against the previous round.

    Raises:
        FastclsError: a threshold outside (0, 1] or one that selects no test item, teachers without test
            probabilities or with different vocabularies, rounds < 1.
    """
    for r in range(1, rounds + 1) if name else ():  # a name given by the user must stay unique (defaults may repeat)
        check_new_name(store, f"{name}-r{r}")
    if not 0 < threshold <= 1:
        raise FastclsError(f"--threshold must be in (0, 1], got {threshold}.")
    if rounds < 1:
        raise FastclsError(f"--rounds must be at least 1, got {rounds}.")
    runs = [store.load(r) for r in refs]
    ids, probs = aligned_probs(runs, "test")  # every teacher check before any data is read
    cfg = _student_config(store, runs, arch, recipes, data, {**overrides, "drop_path": drop_path})
    # the teachers split what was left after the image check: the same rows give the same validation split
    prep = prepare(cfg, items)
    items = prep.items
    _check_test_ids(items, ids, f"teacher {runs[0].id}")
    vocab = list(runs[0].vocab)
    split = _split_items(prep.cfg, items)
    metric = cfg.recipe.metric
    base = name or f"pseudo-{runs[0].id}"
    rows = [{"round": 0, "run": ", ".join(r.id for r in runs), "kind": "teacher", metric: runs[0].metrics.get(metric)
             if len(runs) == 1 else None, "pseudo": 0, "new": 0, "dropped": 0, "relabelled": 0,
             **_test_score(items, ids, probs, vocab, metric)}]
    prev, run_ids = {}, []
    for r in range(1, rounds + 1):
        conf = probs.max(1)
        sel = conf >= threshold
        if not sel.any():
            raise FastclsError(f"--threshold {threshold} selects none of the {len(ids)} test items in round {r} (the "
                               f"teacher's highest probability is {conf.max():.3f}); nothing was trained in this "
                               f"round. Lower --threshold (e.g. {np.floor(np.quantile(conf, 0.5) * 100) / 100}).")
        labels = [str(vocab[i]) for i in probs.argmax(1)[sel]]
        now = dict(zip((ids[i] for i in np.flatnonzero(sel)), labels))
        counts = {"pseudo": len(now), "new": len(now.keys() - prev.keys()), "dropped": len(prev.keys() - now.keys()),
                  "relabelled": sum(prev[i] != lab for i, lab in now.items() if i in prev)}
        train = pd.concat([split, _test_rows(items, ids, sel, labels)], ignore_index=True)
        scfg, sitems = _given(cfg, items, train, f"{base}-r{r}")
        teacher = run_ids[-1:] or [run.id for run in runs]
        res = run_one(executor, partial(fit_run, progress=progress, items=sitems, kind="pseudo", extra={"pseudo": {
            "round": r, "teachers": teacher, "threshold": threshold, **counts, "split": cfg.recipe.split,
            "sample": cfg.sample}}), scfg, store)
        run_ids.append(res.run_id)
        student = store.load(res.run_id)
        ids_s, probs = aligned_probs([student], "test")
        if ids_s != ids:
            raise FastclsError(f"Student {student.id} predicted other test items than its teacher.")
        rows.append({"round": r, "run": res.run_id, "kind": "student", metric: res.metrics.get(metric), **counts,
                     "drop_path": drop_path_rate(res.learn.model) if res.learn is not None else None,
                     **_test_score(items, ids, probs, vocab, metric)})
        prev = now
    return StudentResult(run_ids, pd.DataFrame(rows))


def _test_score(items: fdata.Items, ids: list, probs: np.ndarray, vocab: list, metric: str) -> dict:
    """The metric on the test items when the data knows their labels (scoring only), else nothing."""
    if items.test is None or "label" not in items.test:
        return {}
    true = items.test.assign(id=items.test["id"].astype(str)).set_index("id")["label"].loc[ids]
    y = encode_labels(true, vocab)
    return {} if y is None else {f"test_{metric}": get_metric(metric)(y, probs)}


# -- distillation ------------------------------------------------------------------------------------------------------
def distill_loss(logits: torch.Tensor, target: torch.Tensor, soft: torch.Tensor, has_soft: torch.Tensor,
                 has_hard: torch.Tensor, temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """Mean over the batch of alpha * T^2 * KL(soft_T || student_T) + (1 - alpha) * CE(logits, target).

    `soft` holds the teacher's probabilities at T=1; soft_T = softmax(log(soft) / T) and student_T =
    softmax(logits / T). A row with only a soft target (an unlabeled item) takes the KL term alone, a row with only a
    hard label the cross-entropy alone.

    Args:
        logits: (B, C) student outputs.
        target: (B,) hard labels (ignored where `has_hard` is False).
        soft: (B, C) teacher probabilities (ignored where `has_soft` is False).
        has_soft, has_hard: (B,) booleans.
        temperature: T > 0.
        alpha: weight of the soft term, in [0, 1].
    """
    logits = logits.float()
    T = float(temperature)
    soft_t = F.softmax(torch.log(soft.float().clamp_min(1e-12)) / T, dim=1)
    kl = (soft_t * (torch.log(soft_t.clamp_min(1e-12)) - F.log_softmax(logits / T, dim=1))).sum(1) * T * T
    ce = F.cross_entropy(logits, target.long().clamp_min(0), reduction="none")
    s, h = has_soft.float(), has_hard.float()
    w_soft = torch.where(has_hard, alpha * s, s)
    w_hard = torch.where(has_soft, (1 - alpha) * h, h)
    return (w_soft * kl + w_hard * ce).mean()


class SoftTargets(Callback):
    """Replace each training batch's loss with `distill_loss` on the soft targets of the batch's items.

    The items of a batch are found from the order the training DataLoader drew this epoch (its `get_idxs`, recorded
    per epoch); validation keeps the recipe's loss on hard labels, so metrics and the best epoch are unchanged.
    """

    order = 5  # before the recorder (order 50) reads the loss

    def __init__(self, soft: dict, unlabeled: set, temperature: float, alpha: float):
        self.soft, self.unlabeled, self.T, self.alpha = soft, unlabeled, temperature, alpha

    def before_fit(self):
        dl = self.learn.dls.train
        ids = dl.dataset.items["id"].astype(str).tolist()
        C = len(self.learn.dls.vocab)
        self.table = torch.zeros(len(ids), C)
        self.has_soft = torch.tensor([i in self.soft for i in ids])
        self.has_hard = torch.tensor([i not in self.unlabeled for i in ids])
        for n, i in enumerate(ids):
            if i in self.soft:
                self.table[n] = torch.as_tensor(self.soft[i])
        self._orig, self._dl, self.idxs = dl.get_idxs, dl, []

        def get_idxs():
            self.idxs = list(self._orig())
            return self.idxs
        dl.get_idxs = get_idxs  # an instance attribute, removed in after_fit

    def after_loss(self):
        if not self.training:
            return
        bs, n = self._dl.bs, len(self.pred)
        rows = torch.as_tensor(self.idxs[self.iter * bs:self.iter * bs + n])
        if len(rows) != n:
            raise RuntimeError("SoftTargets: the batch does not match the order the DataLoader drew.")
        dev = self.pred.device
        loss = distill_loss(self.pred, self.yb[0], self.table[rows].to(dev), self.has_soft[rows].to(dev),
                            self.has_hard[rows].to(dev), self.T, self.alpha)
        self.learn.loss_grad = loss
        self.learn.loss = loss.detach().clone()

    def after_fit(self):
        vars(self._dl).pop("get_idxs", None)


def distill(store: RunStore, refs: list, arch: str, temperature: float = 2.0, alpha: float = 0.5,
            unlabeled: bool = False, progress: str = "auto", recipes=(), data=None, name: Optional[str] = None,
            items: Optional[fdata.Items] = None, **overrides) -> StudentResult:
    """Train a student `arch` on soft targets from the teachers' stored probabilities (no teacher model is loaded).

    Soft targets: the teachers' validation probabilities (mean of their TTA blends) for the student's training items
    they cover (a cv run's out-of-fold predictions cover every item; a plain run's cover its validation split only,
    which for the same seed is the student's validation split); with `unlabeled`, the teachers' test probabilities
    for every test item, added as training rows with a soft target only. Training items without a soft target keep
    the hard loss alone.

    Args:
        store: the run store.
        refs: teacher runs (a cv run, an ensemble run, several runs with the same validation items).
        arch: the student's arch.
        temperature: T of the soft targets (> 0).
        alpha: weight of the soft term (in [0, 1]).
        unlabeled: also train on the test items' soft targets.
        progress, recipes, data, name, items, overrides: as for `pseudo_label`.

    Returns:
        A `StudentResult` with the student's run id and a table comparing teacher and student on the student's
        validation items (and on test where the data has test labels).

    Raises:
        FastclsError: teachers with different vocabularies (or recipes, metrics, validation items), no soft target
            for any training item, a temperature <= 0 or alpha outside [0, 1].
    """
    if name:  # a name given by the user must stay unique (the default may repeat)
        check_new_name(store, name)
    if temperature <= 0:
        raise FastclsError(f"--temperature must be > 0, got {temperature}.")
    if not 0 <= alpha <= 1:
        raise FastclsError(f"--alpha must be in [0, 1], got {alpha}.")
    runs = [store.load(r) for r in refs]
    valid_ids, valid_probs = aligned_probs(runs, "valid")
    # with --unlabeled a teacher without test probabilities is an error (aligned_probs says which); else optional
    has_test = unlabeled or all(r.test_probs is not None for r in runs)
    test_ids, test_probs = aligned_probs(runs, "test") if has_test else (None, None)
    cfg = _student_config(store, runs, arch, recipes, data, overrides)
    # the teachers split what was left after the image check: the same rows give the same validation split
    prep = prepare(cfg, items)
    items = prep.items
    vocab = list(runs[0].vocab)
    split = _split_items(prep.cfg, items)
    soft = dict(zip(valid_ids, valid_probs))
    train_ids = split.loc[~split["is_valid"], "id"].astype(str)
    n_soft = int(train_ids.isin(soft.keys()).sum())
    rows = [split]
    unl = set()
    if unlabeled:
        _check_test_ids(items, test_ids, f"teacher {runs[0].id}")
        labels = [str(vocab[i]) for i in test_probs.argmax(1)]  # placeholders: these rows have no hard loss
        extra = _test_rows(items, test_ids, np.ones(len(test_ids), bool), labels)
        soft.update(zip(extra["id"], test_probs))
        unl = set(extra["id"])
        rows.append(extra)
    if n_soft == 0 and not unl:
        raise FastclsError(f"The teachers ({', '.join(r.id for r in runs)}) hold probabilities for none of the "
                           f"student's {len(train_ids)} training items: a plain run's validation items are the "
                           "student's validation split. Distill from a cv run (`fastcls train ... --folds K`: "
                           "out-of-fold probabilities for every item) or add --unlabeled (the test items).")
    scfg, sitems = _given(cfg, items, pd.concat(rows, ignore_index=True), name or f"distill-{runs[0].id}")
    # the soft-target loss reads the batch's own items: a teacher's mixing (inherited with its recipe) is left out
    scfg = dataclasses.replace(scfg, recipe=scfg.recipe.override(mixup=0.0, cutmix=0.0, mix_off_epoch=0))
    info = {"teachers": [r.id for r in runs], "temperature": temperature, "alpha": alpha, "unlabeled": unlabeled,
            "soft_train_items": n_soft, "soft_test_items": len(unl), "split": cfg.recipe.split, "sample": cfg.sample}
    t0 = time.time()
    res = fit_run(scfg, store, progress, items=sitems, kind="distill", extra={"distill": info},
                  cbs=(SoftTargets(soft, unl, temperature, alpha),))
    student = store.load(res.run_id)
    table = _compare(runs, student, valid_ids, valid_probs, test_ids, test_probs, items, vocab, cfg.recipe)
    table.attrs.update(info, seconds=time.time() - t0)
    return StudentResult([res.run_id], table)


def _compare(runs, student: StoredRun, valid_ids, valid_probs, test_ids, test_probs, items, vocab,
             recipe: Recipe) -> pd.DataFrame:
    """Teacher vs student: the metric on the student's validation items the teacher covers, and on test."""
    metric = recipe.metric
    m = get_metric(metric)
    pos = {i: n for n, i in enumerate(valid_ids)}
    s_ids = [str(i) for i in student.valid_ids]
    both = [n for n, i in enumerate(s_ids) if i in pos]
    y = np.asarray(student.valid_targets)[both]
    s_valid = aligned_probs([student], "valid")[1][both]  # the TTA blend, like the teachers' (and test) columns
    t_valid = valid_probs[[pos[s_ids[n]] for n in both]]
    teacher = {"model": "teacher", "runs": ", ".join(r.id for r in runs), "items": len(both),
               metric: m(y, t_valid) if both else None}
    stud = {"model": "student", "runs": student.id, "items": len(both), metric: m(y, s_valid) if both else None}
    if test_ids is not None:
        teacher.update(_test_score(items, test_ids, test_probs, vocab, metric))
        s_test = aligned_probs([student], "test")
        stud.update(_test_score(items, s_test[0], s_test[1], vocab, metric))
    return pd.DataFrame([teacher, stud])
