"""Progressive resizing (`--size 128,224`, `Recipe.progressive_sizes`): fastbook's recipe of training at a small
image size first and a larger one after, each size with its own loaders.

The run's epochs (all stages, in order) are split evenly, in order, between the sizes: `progressive_sizes` then
`size`, the final size. `ProgressiveResize` hands the learner the loaders of the current epoch's size before each
training epoch and gives the final size's back after it, so every validation pass, the best epoch's choice, the
TTA views and the stored predictions are at the final size. One shuffling stream runs through all sizes: fastai's
training loader draws a new generator from its own at every epoch, which the swap hands over, and the final size's
loader holds it after every epoch, where the checkpoint saves it, so a resumed run stays exact.
"""

__all__ = ["epoch_sizes", "check_progressive", "size_loaders", "ProgressiveResize"]

from fastai.callback.core import Callback

from ..archs import check_size
from ..config import RunConfig
from ..errors import FastclsError
from . import distributed as fdist
from .learner import schedule


def epoch_sizes(recipe, n_epochs: int) -> list:
    """The image size of each of the run's `n_epochs` epochs: (*progressive_sizes, size) in order, evenly split (the
    later sizes get the extra epochs when they do not divide: 3 epochs at 128,224 are 128, 224, 224)."""
    sizes = [*recipe.progressive_sizes, recipe.size]
    k = len(sizes)
    return [sizes[k - 1 - (n_epochs - 1 - e) * k // n_epochs] for e in range(n_epochs)]


def check_progressive(cfg: RunConfig):
    """Refuse progressive resizing that cannot work, before the data is read: fewer epochs than sizes (a size would
    never train, or the final one), a size the arch cannot take, several processes (one set of loaders each)."""
    r = cfg.recipe
    if not r.progressive_sizes:
        return
    sizes = [*r.progressive_sizes, r.size]
    total = sum(n for _, n, _, _ in schedule(cfg))
    if total < len(sizes):
        raise FastclsError(f"--size {','.join(map(str, sizes))} trains at {len(sizes)} sizes in turn, but the run has "
                           f"{total} epoch(s): give at least {len(sizes)} epochs (frozen + unfrozen) or fewer sizes.")
    for s in r.progressive_sizes:
        check_size(cfg.arch, s)
    if fdist.world_size() > 1:
        raise FastclsError("Progressive resizing (--size with several sizes) is not supported under accelerate launch /"
                           " torchrun yet: train at one --size, or in one process.")


def size_loaders(make, recipe) -> dict:
    """{size: DataLoaders} for each of `recipe.progressive_sizes`, built by `make(size=...)` (the run's own
    `Prepared.dls`)."""
    return {s: make(size=s) for s in dict.fromkeys(recipe.progressive_sizes)}


class ProgressiveResize(Callback):
    """Train each epoch at its size (`epoch_sizes`), validate at the final size. `first`: the run's epoch index of
    the fit's epoch 0 (`train` sets it before each stage)."""

    order = -5  # before the others look at the batches

    def __init__(self, loaders: dict, sizes: list, final):
        self.loaders, self.sizes, self.final, self.first = loaders, sizes, final, 0

    def before_epoch(self):  # (fastai picks the epoch's training loader before `before_train`)
        d = self.loaders.get(self.sizes[self.first + self.epoch], self.final)
        if d is not self.final:
            d.train.rng = self.final.train.rng  # the one shuffling stream continues
        self.learn.dls = d

    def after_train(self):
        if self.learn.dls is not self.final:
            self.final.train.rng = self.learn.dls.train.rng  # (fastai replaced it when the epoch began)
        self.learn.dls = self.final

    def after_fit(self):
        self.learn.dls = self.final
