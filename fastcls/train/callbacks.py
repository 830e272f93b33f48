"""The training callbacks: best-epoch tracking, one history row per epoch, early stopping.

Each owns its state (`state_dict` / `load_state_dict`, which `fastcls.train.checkpoint.Checkpointer` saves and
restores) and declares where it runs with fastai's `run_after` / `run_before`; `ordered` turns those into the `order`
fastai sorts by (fastai >= 2.7 sorts callbacks by `order` alone and no longer reads the two attributes).
"""

__all__ = ["KeepBest", "EpochLine", "EarlyStop", "KeepBnStats", "ordered", "skipped_epoch"]

import copy

import numpy as np
from fastai.callback.core import Callback, TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import EarlyStoppingCallback, TrackerCallback
from fastai.learner import SkipToEpoch
from fastcore.basics import listify
from torch import nn

from .distributed import bare_model


def ordered(cls):
    """Class decorator: `cls.order` halfway between its `run_after` and `run_before` callbacks' orders (one past
    `run_after` when it names no `run_before`), so the order follows the callbacks it depends on."""
    lo = max(c.order for c in listify(cls.run_after))
    before = listify(getattr(cls, "run_before", None))
    cls.order = (lo + min(c.order for c in before)) / 2 if before else lo + 1
    return cls


def skipped_epoch(learn) -> bool:
    """Whether the current epoch is one fastai's `start_epoch` skips: callbacks must then leave their state alone."""
    return any(isinstance(cb, SkipToEpoch) and learn.epoch < cb._skip_to for cb in learn.cbs)


@ordered
class KeepBnStats(Callback):
    """Keeps the pretrained body's batch-norm statistics as loaded: its BatchNorm layers run in eval mode while the
    model trains (`Recipe.bn_stats`; the head's own BatchNorm trains as usual, and so do every layer's weights).

    fastai's frozen stage puts the whole model in training mode, so a frozen body's running means and variances
    drift to the new data's batches (at another image size, with augmentation, in batches of a few dozen): on
    imagenette-mini at 96 px this cost EfficientNet-Lite0 0.84 -> 0.72 valid accuracy in one frozen epoch
    (docs/benchmarks.md#transfer-learning). Kept, the body computes what it was pretrained to compute.
    """

    run_after = TrainEvalCallback  # which has just put every module in training mode

    def before_train(self):
        for m in bare_model(self.model)[0].modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


@ordered
class KeepBest(TrackerCallback):
    """Track the monitored metric over both stages and restore the best epoch's weights at the end (in memory)."""

    run_after = TrackerCallback

    def __init__(self, monitor: str, comp=np.greater):
        super().__init__(monitor=monitor, comp=comp, reset_on_fit=False)
        self.best_state, self.best_epoch, self.global_epoch = None, None, 0

    def after_epoch(self):
        if skipped_epoch(self.learn):  # a resumed fit passing epochs already done
            return
        super().after_epoch()
        if self.new_best:
            self.best_state = copy.deepcopy(bare_model(self.learn.model).state_dict())
            self.best_epoch = self.global_epoch
        self.global_epoch += 1

    def restore(self, model):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        """The tracker's state: best value, best epoch, epochs seen, and the best epoch's weights (`weights`)."""
        return {"best": self.best, "best_epoch": self.best_epoch, "global_epoch": self.global_epoch,
                "weights": self.best_state}

    def load_state_dict(self, state: dict):
        self.best, self.best_epoch, self.global_epoch = state["best"], state["best_epoch"], state["global_epoch"]
        self.best_state = state.get("weights") or None


@ordered
class EpochLine(Callback):
    """Collect one history row per epoch over all stages; print it as one line when there is no progress bar."""

    run_after, run_before = ProgressCallback, KeepBest  # after the Recorder has logged the epoch (and the bar)

    def __init__(self, stage: str = "", echo: bool = True):
        self.rows, self.stage, self.echo = [], stage, echo

    def after_epoch(self):
        if skipped_epoch(self.learn):
            return
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

    def state_dict(self) -> dict:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state: dict):
        self.rows = list(state["rows"])


class EarlyStop(EarlyStoppingCallback):
    """fastai's early stopping, leaving epochs that a resumed fit skips alone."""

    def after_epoch(self):
        if not skipped_epoch(self.learn):
            super().after_epoch()

    def state_dict(self) -> dict:
        """The state this epoch leaves (`wait`, and whether it stops the fit), read before its own `after_epoch`
        runs: a checkpoint written in between must hold the state the next epoch starts from."""
        val = self.recorder.values[-1][self.idx]
        wait = 0 if self.comp(val - self.min_delta, self.best) else self.wait + 1
        return {"wait": wait, "stopped": wait >= self.patience}

    def load_state_dict(self, state: dict):
        self.best, self.wait = state["best"], state["wait"]
