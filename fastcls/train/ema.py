"""An exponential moving average of the weights (`--ema DECAY`, `Recipe.ema`): timm's `ModelEmaV3` kept during the
run's last (unfrozen) stage, updated after every optimizer step; after training the run predicts with the raw model
(its best epoch) and with the average, and keeps the one better on valid (`choose`)."""

__all__ = ["Ema", "choose"]

import copy
from typing import Callable, Optional

import torch
from sklearn.metrics import log_loss
from fastai.callback.core import Callback

from .distributed import bare_model
from ..metrics import get_metric
from ..recipe import Recipe


class Ema(Callback):
    """timm's `ModelEmaV3` of the model: started at the fit it is added to (the unfrozen stage) from the weights
    the stage starts with, updated after every optimizer step: ``ema = decay * ema + (1 - decay) * weights`` for
    every floating tensor of the state dict (parameters and batch-norm statistics).

    Its state (`state_dict` / `load_state_dict`) is saved in every checkpoint, so a resumed run continues the same
    average.
    """

    def __init__(self, decay: float):
        self.decay, self.avg, self.updates = float(decay), None, 0

    def start(self, model):
        from timm.utils.model_ema import ModelEmaV3
        self.avg, self.updates = ModelEmaV3(bare_model(model), decay=self.decay), 0

    def before_fit(self):
        if self.avg is None:
            self.start(self.learn.model)

    def after_step(self):
        self.avg.update(bare_model(self.learn.model))
        self.updates += 1

    @property
    def weights(self) -> Optional[dict]:
        """The averaged state dict (None before the stage started)."""
        return None if self.avg is None else self.avg.module.state_dict()

    def state_dict(self) -> dict:
        return {"updates": self.updates, "weights": self.weights}

    def load_state_dict(self, state: dict, model):
        """Restore a saved average; without one (saved before the stage started) start afresh from `model`'s
        weights, as the stage would have."""
        self.start(model)
        if state.get("weights"):
            self.avg.module.load_state_dict(state["weights"])
            self.updates = int(state["updates"] or 0)


def choose(learn, ema: Ema, recipe: Recipe, predict: Callable[[], tuple]) -> tuple[tuple, dict, dict]:
    """Predict with the raw model and with the average; keep the better on valid.

    Args:
        learn: the trained learner (its model holds the raw, best-epoch weights).
        ema: the run's `Ema` callback.
        recipe: scores with its monitored metric (`monitor`, else `metric`), on the plain valid view.
        predict: returns the run's predictions (valid probs, valid targets, test probs) for `learn`'s current model.

    Returns:
        (the better model's predictions, its metrics entries, its meta entry); `learn.model` holds its weights.
        The metrics hold both models' valid scores (`<monitor>_raw_model`, `<monitor>_ema_model`) and `ema_used`.
    """
    name = recipe.monitor or recipe.metric
    metric = get_metric(name)
    raw_preds = predict()
    raw_state = copy.deepcopy(bare_model(learn.model).state_dict())
    with torch.no_grad():
        bare_model(learn.model).load_state_dict(ema.weights)
    ema_preds = predict()
    both = {"raw": raw_preds, "ema": ema_preds}
    scores = {k: float(metric(p[1], p[0][0])) for k, p in both.items()}
    losses = {k: float(log_loss(p[1], p[0][0], labels=range(p[0].shape[-1]))) for k, p in both.items()}
    use_ema = scores["ema"] > scores["raw"]  # a tie keeps the raw model
    if not use_ema:
        with torch.no_grad():
            bare_model(learn.model).load_state_dict(raw_state)
    metrics = {"ema_decay": ema.decay, "ema_used": use_ema, f"{name}_raw_model": scores["raw"],
               f"{name}_ema_model": scores["ema"]}
    meta = {"decay": ema.decay, "updates": ema.updates, "used": "ema" if use_ema else "raw", "metric": name,
            "valid": scores, "valid_loss": losses}
    return (ema_preds if use_ema else raw_preds), metrics, meta
