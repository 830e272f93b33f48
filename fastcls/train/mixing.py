"""MixUp and CutMix (fastai's callbacks) for a run, switched off for the last epochs of its last stage.

`Recipe.mixup` / `Recipe.cutmix` give the Beta(alpha, alpha) of fastai's `MixUp` / `CutMix` (0: off; one of them at a
time); `Recipe.mix_off_epoch` N trains the last N epochs of the last stage on plain batches (the "mix-off" trick:
the model ends on the real image distribution). `check_mixing` refuses the settings that make no sense before
anything is read or trained.
"""

__all__ = ["MixUpOff", "CutMixOff", "mixing", "check_mixing"]

from typing import Optional

from fastai.callback.mixup import CutMix, MixUp

from ..errors import FastclsError
from ..recipe import Recipe


class _Off:
    """Mixing only while `learn.epoch < off_from` (the fit's epoch; `train` sets `off_from` before each stage)."""

    off_from: Optional[int] = None  # None: mix every epoch

    @property
    def mixing(self) -> bool:
        return self.off_from is None or self.epoch < self.off_from

    def before_train(self):
        self.on = self.mixing
        if self.on:
            super().before_train()

    def before_batch(self):
        if self.on:
            super().before_batch()

    def after_train(self):
        if self.on:  # restores the loss it replaced in before_train
            super().after_train()


class MixUpOff(_Off, MixUp):
    """fastai's `MixUp` that stops mixing at epoch `off_from` of the fit."""


class CutMixOff(_Off, CutMix):
    """fastai's `CutMix` that stops mixing at epoch `off_from` of the fit."""


def mixing(recipe: Recipe):
    """The run's mixing callback (`MixUpOff` / `CutMixOff`), or None when the recipe mixes nothing."""
    if recipe.mixup > 0:
        return MixUpOff(recipe.mixup)
    if recipe.cutmix > 0:
        return CutMixOff(recipe.cutmix)
    return None


def check_mixing(recipe: Recipe, strategies: tuple):
    """Refuse mixing settings that make no sense, before training.

    Args:
        recipe: the run's recipe (`mixup`, `cutmix`, `mix_off_epoch`, `epochs`).
        strategies: its parsed imbalance strategies (`fastcls.imbalance.parse_imbalance`).

    Raises:
        FastclsError: both mixings at once; `mix_off_epoch` without mixing or longer than the last stage; mixing
            with the class-weighted loss ('weights').
    """
    name = f"Recipe {recipe.name!r}"
    if recipe.mixup > 0 and recipe.cutmix > 0:
        raise FastclsError(f"{name}: --mixup {recipe.mixup} and --cutmix {recipe.cutmix} both mix every batch; "
                           "fastai applies one mixing per batch, so give one of them.")
    mixes = recipe.mixup > 0 or recipe.cutmix > 0
    if recipe.mix_off_epoch and not mixes:
        raise FastclsError(f"{name}: --mix-off-epoch {recipe.mix_off_epoch} stops a mixing that is not on; add "
                           "--mixup ALPHA or --cutmix ALPHA, or drop --mix-off-epoch.")
    if mixes and recipe.epochs and recipe.mix_off_epoch > recipe.epochs:
        raise FastclsError(f"{name}: --mix-off-epoch {recipe.mix_off_epoch} is more than the {recipe.epochs} epochs "
                           "of the last stage it counts from; give at most --epochs.")
    if mixes and "soft-f1" in strategies:
        raise FastclsError(f"{name}: mixing (--{'mixup' if recipe.mixup > 0 else 'cutmix'}) cannot wrap the soft-F1 "
                           "loss (--imbalance soft-f1): fastai's MixUp/CutMix blend per-item losses, and the soft F1 "
                           "is one number per batch. Drop the mixing or use another loss.")
    if mixes and "drw" in strategies:
        raise FastclsError(f"{name}: mixing (--{'mixup' if recipe.mixup > 0 else 'cutmix'}) cannot wrap the deferred "
                           "re-weighting (--imbalance drw), for the reason it cannot wrap 'weights': fastai's "
                           "MixUp/CutMix average the per-item losses plainly, dropping the weighted mean. Drop one.")
    if mixes and "weights" in strategies:
        raise FastclsError(f"{name}: mixing (--{'mixup' if recipe.mixup > 0 else 'cutmix'}) cannot wrap the "
                           "class-weighted loss (--imbalance weights): fastai's MixUp/CutMix average the per-item "
                           "losses plainly, which drops the weighted mean sum(w_y*loss)/sum(w_y) and with it the "
                           "weighting's scale, and a mixed item has two classes to weight. Rebalance with "
                           "--imbalance oversample (or focal) instead, or drop the mixing.")
