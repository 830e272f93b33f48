"""Optimizers (`--opt`, `Recipe.opt`) and learning-rate schedules (`--sched`, `--warmup`, `Recipe.sched`) of a run.

Every optimizer is one of fastai's (`Adam`, `SGD`, `Lamb`, `ranger`), so the checkpoint saves its state as it does
the default's. Every schedule is fastai's `ParamScheduler` over the stage's fit (or fastai's `fit_one_cycle`, the
default, or fastai's `ReduceLROnPlateau`); discriminative learning rates (``slice(lo, hi)``) scale every group alike.
"""

__all__ = ["SCHEDULES", "OPTIMIZERS", "opt_func", "fit_stage", "lr_curve", "plateau", "Plateau", "check_schedule",
           "Accumulate", "accumulation"]

import functools
import math

import numpy as np
from fastai.callback.schedule import ParamScheduler, SchedCos, SchedLin, combine_scheds
from fastai.callback.core import CancelBatchException
from fastai.callback.tracker import ReduceLROnPlateau
from fastai.callback.training import GradientAccumulation
from fastai.optimizer import SGD, Adam, Lamb, Optimizer, average_grad, ranger, weight_decay
from fastcore.basics import listify

from ..errors import FastclsError
from ..recipe import Recipe
from .callbacks import KeepBest, ordered, skipped_epoch
from .checkpoint import Checkpointer

SCHEDULES = ("one-cycle", "cosine", "flat-cos", "step", "exp", "plateau")
OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "ranger")
WARMUP_DIV = 25  # a warm-up starts at lr / 25 (as fastai's one-cycle does)
FLAT_PCT = 0.75  # flat-cos: flat for the first 75% of the stage (fastai's fit_flat_cos)


def nesterov_step(p, lr, mom, grad_avg, **kwargs):
    """SGD's Nesterov step (torch's formula): ``p -= lr * (grad + mom * grad_avg)``."""
    p.data.add_(p.grad.data.add(grad_avg, alpha=mom), alpha=-lr)


def _sgd(params, lr, mom=0.0, wd=0.0, nesterov=False):
    if not nesterov:
        return SGD(params, lr, mom=mom, wd=wd)
    return Optimizer(params, [weight_decay, average_grad, nesterov_step], lr=lr, mom=mom, wd=wd)


def opt_func(recipe: Recipe):
    """The fastai optimizer factory of `recipe.opt` ('adamw': fastai's default Adam, decoupled weight decay;
    'adam': L2 weight decay), with `recipe.momentum` (Adam's beta1, SGD's momentum) when set."""
    mom = {} if recipe.momentum is None else {"mom": recipe.momentum}
    if recipe.opt == "adamw":
        return functools.partial(Adam, **mom)
    if recipe.opt == "adam":
        return functools.partial(Adam, decouple_wd=False, **mom)
    if recipe.opt == "sgd":
        return functools.partial(_sgd, nesterov=recipe.nesterov, **mom)
    return functools.partial(Lamb if recipe.opt == "lamb" else ranger, **mom)


def lr_curve(recipe: Recipe, n_epoch: int, lr_max):
    """The stage's lr as a function of the fraction of its training done (`ParamScheduler`'s argument), or None for
    'one-cycle' and 'plateau' (fastai's own). A warm-up rises linearly from lr / 25 over its first `warmup` epochs."""
    s, lr_max = recipe.sched, np.asarray(lr_max, dtype=float)
    if s in ("one-cycle", "plateau"):
        return None
    w = min(recipe.warmup / n_epoch, 1.0) if n_epoch else 0.0
    rest = n_epoch * (1 - w)  # epochs after the warm-up
    gamma = recipe.lr_gamma if recipe.lr_gamma is not None else (0.1 if s == "step" else 0.95)
    if s == "cosine":
        main = SchedCos(lr_max, 0.0)
    elif s == "flat-cos":
        main = combine_scheds([FLAT_PCT, 1 - FLAT_PCT], [SchedLin(lr_max, lr_max), SchedCos(lr_max, 0.0)])
    else:  # step / exp: one factor per epoch after the warm-up (per `lr_step` epochs for step)
        every = recipe.lr_step if s == "step" else 1

        def main(pos):
            return lr_max * gamma ** (min(math.floor(pos * rest + 1e-9), math.ceil(rest) - 1) // every)
    if w <= 0:
        return main
    if w >= 1:
        return SchedLin(lr_max / WARMUP_DIV, lr_max)
    return combine_scheds([w, 1 - w], [SchedLin(lr_max / WARMUP_DIV, lr_max), main])


@ordered
class Plateau(ReduceLROnPlateau):
    """fastai's `ReduceLROnPlateau` that leaves the epochs a resumed fit skips alone; it cuts the lr before the
    checkpoint is written, which saves its state (`state_dict`) with the lr."""

    run_after, run_before = KeepBest, Checkpointer

    def after_epoch(self):
        if not skipped_epoch(self.learn):
            super().after_epoch()

    def state_dict(self) -> dict:
        return {"best": float(self.best), "wait": int(self.wait)}

    def load_state_dict(self, state: dict):
        self.best, self.wait = state["best"], state["wait"]


class Accumulate(GradientAccumulation):
    """fastai's `GradientAccumulation` counted in micro-batches: one optimizer step per `n_acc` micro-batches, each
    micro-batch's loss scaled by 1 / n_acc, so n equal micro-batches step exactly like one batch n times larger.

    Every epoch starts a fresh accumulation (its last micro-batches that do not fill a step are dropped, as fastai's
    `drop_last` drops a partial batch), so an epoch's steps do not depend on the one before and a resumed run stays
    exact. The lr schedules advance per micro-batch; EMA and the step-counting optimizers per step.
    """

    def before_train(self):
        self.count = 0
        self.learn.opt.zero_grad()

    def after_loss(self):
        self.learn.loss_grad /= self.n_acc

    def before_step(self):
        self.learn.loss_grad *= self.n_acc  # the recorded loss is the micro-batch's own
        self.count += 1
        if self.count < self.n_acc:
            raise CancelBatchException()  # no step, no zero_grad: the gradients add up
        self.count = 0


def accumulation(recipe: Recipe):
    """The run's `Accumulate` callback for `recipe.accum` > 1 micro-batches per step, or None."""
    return Accumulate(recipe.accum) if recipe.accum > 1 else None


def plateau(recipe: Recipe, monitor: str):
    """The run's `Plateau` callback for `sched='plateau'` (one for every stage; it starts afresh with each), or None."""
    if recipe.sched != "plateau":
        return None
    gamma = recipe.lr_gamma if recipe.lr_gamma is not None else 0.1
    return Plateau(monitor=monitor, comp=np.greater, patience=recipe.lr_patience, factor=1 / gamma)


def fit_stage(learn, recipe: Recipe, n_epoch: int, lr, cbs, start_epoch: int = 0):
    """Fit one stage of `n_epoch` epochs at `lr` (a float, a slice or one lr per group) with the recipe's schedule.

    'one-cycle': fastai's `fit_one_cycle` (a warm-up sets its `pct_start`); 'plateau': a constant lr, which the
    `plateau` callback among `cbs` multiplies by `lr_gamma` (default 0.1) when the monitored metric stalls for
    `lr_patience` epochs; the others: `lr_curve`.
    """
    cbs = listify(cbs)
    if recipe.sched == "one-cycle":
        kw = {"pct_start": min(recipe.warmup / n_epoch, 0.99)} if recipe.warmup else {}
        if recipe.momentum is not None:
            kw["moms"] = (recipe.momentum,) * 3  # a given momentum stays constant
        return learn.fit_one_cycle(n_epoch, lr, cbs=cbs, start_epoch=start_epoch, **kw)
    if learn.opt is None:
        learn.create_opt()
    learn.opt.set_hyper("lr", learn.lr if lr is None else lr)
    lr_max = np.array([h["lr"] for h in learn.opt.hypers])
    if recipe.sched != "plateau":
        cbs = [ParamScheduler({"lr": lr_curve(recipe, n_epoch, lr_max)}), *cbs]
    learn.fit(n_epoch, lr=lr_max, cbs=cbs, start_epoch=start_epoch)  # (fit sets the lr: learn.lr without one)


def check_schedule(recipe: Recipe):
    """Refuse optimizer and schedule settings that make no sense, before training."""
    name = f"Recipe {recipe.name!r}"
    if recipe.nesterov and not (recipe.opt == "sgd" and recipe.momentum):
        raise FastclsError(f"{name}: nesterov=true is SGD's momentum variant; it needs --opt sgd and --momentum > 0 "
                           f"(got --opt {recipe.opt}, --momentum {recipe.momentum}).")
    if recipe.warmup and recipe.sched == "plateau":
        raise FastclsError(f"{name}: --warmup with --sched plateau: the plateau schedule sets the lr from the "
                           "validation metric alone; use --sched cosine/step/exp/flat-cos for a warm-up.")
    if recipe.epochs and recipe.warmup >= recipe.epochs:
        raise FastclsError(f"{name}: --warmup {recipe.warmup} epochs is not shorter than the {recipe.epochs} epochs "
                           "of the stage it warms; give fewer.")
