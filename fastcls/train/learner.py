"""The fastai Learner of a run: the arch's model and splitter, the recipe's loss (imbalance plan) and metrics, and the
run's stages (frozen, then unfrozen with discriminative learning rates)."""

__all__ = ["learner", "schedule", "imbalance_plan", "metric_names"]

from typing import Optional

import numpy as np
from fastai.learner import Learner
from fastai.torch_core import set_seed, trainable_params

from ..archs import build_model, check_size, get_arch, layer_decay_lrs, splitter, stage_splitter
from ..config import RunConfig
from ..hardware import accelerate
from ..imbalance import ImbalancePlan, parse_imbalance, plan
from ..metrics import check_metric, get_metric
from ..recipe import Recipe
from .schedules import opt_func


def imbalance_plan(recipe: Recipe, dls, strategies: Optional[tuple] = None) -> ImbalancePlan:
    """The imbalance toolkit's plan (loss, sampler weights, post-hoc flag, prior) for the training items of `dls`.

    `strategies`: the recipe's imbalance setting already parsed (`Prepared.imbalance`); default: parse it here.
    """
    vocab = {v: i for i, v in enumerate(dls.vocab)}
    labels = np.array([vocab[l] for l in dls.train_ds.items["label"]])
    strategies = parse_imbalance(recipe.imbalance) if strategies is None else strategies
    return plan(strategies, labels, len(dls.vocab), label_smoothing=recipe.label_smoothing)


def learner(dls, cfg: RunConfig, model=None, load_weights: bool = True,
            plan: Optional[ImbalancePlan] = None) -> Learner:
    """A fastai Learner for `cfg.arch` on `dls`: fastai head with dropout `ps`, >= 3 parameter groups, the metric.

    `model` replaces the arch's full model and is trained whole (the sweeps' fast path passes a head that reads
    cached body features); loss, metrics and weight decay are the recipe's either way. `load_weights=False` skips
    reading pretrained weights (a resumed run takes every weight from its checkpoint). `plan`: the run's imbalance
    plan when already built (else built here from `dls`); the learner keeps it as `learn.imbalance` (its loss here,
    its prior for the post-hoc steps after training).
    """
    recipe = cfg.recipe
    spec = get_arch(cfg.arch)
    full = model is None
    if full:
        check_size(cfg.arch, recipe.size)
        set_seed(cfg.seed)
        model = build_model(cfg.arch, len(dls.vocab), ps=recipe.ps, pretrained=recipe.pretrained and load_weights,
                            weights=cfg.weights if load_weights else None, drop_path=recipe.drop_path)
        model.body_groups = spec.body_groups
    metrics = [get_metric(n).make_fastai() for n in metric_names(recipe)]  # the monitored metric last (see `train`)
    plan = plan if plan is not None else imbalance_plan(recipe, dls)
    learn = Learner(dls, model, loss_func=plan.loss, metrics=metrics, opt_func=opt_func(recipe),
                    splitter=(stage_splitter if recipe.layer_decay else splitter) if full else trainable_params, wd=recipe.wd if recipe.wd is not None else None)
    if full and (recipe.pretrained or cfg.weights):
        learn.freeze()
    learn.imbalance = plan
    accelerate(learn, cfg.amp, cfg.channels_last, cfg.compile)
    return learn


def schedule(cfg: RunConfig, n_groups: Optional[int] = None) -> list[tuple[str, int, object, bool]]:
    """The run's stages as (name, epochs, lr, unfreeze): the frozen stage (pretrained bodies), then the unfrozen one.

    The unfrozen stage's lr is fastai's discriminative ``slice(lr / 100, lr)`` over the arch's groups, or with
    `recipe.layer_decay` one lr per group (`fastcls.archs.layer_decay_lrs` over `n_groups`, the learner's groups).
    """
    recipe = cfg.recipe
    lr = recipe.lr
    frozen = bool((recipe.pretrained or cfg.weights) and recipe.freeze_epochs > 0)
    stages = []
    if frozen:
        stages.append(("frozen", recipe.freeze_epochs, lr, False))
        lr /= 2
    if recipe.epochs > 0:
        if recipe.layer_decay and n_groups:
            lrs = layer_decay_lrs(n_groups, lr, recipe.layer_decay)
        else:
            lrs = slice(lr / 100, lr) if frozen else lr
        stages.append(("unfrozen" if frozen else "train", recipe.epochs, lrs, True))
    return stages


def metric_names(recipe: Recipe) -> list:
    """Metrics a run scores (validated): accuracy, the recipe's metric and extra metrics, the monitored one last."""
    monitor = recipe.monitor or recipe.metric
    names = [n for n in dict.fromkeys(["accuracy", recipe.metric, *recipe.extra_metrics]) if n != monitor] + [monitor]
    for n in names:
        check_metric(n, recipe.classes, f"recipe {recipe.name!r}")
    return names
