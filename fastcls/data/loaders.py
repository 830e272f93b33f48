"""From items to fastai DataLoaders: normalisation and batch augmentation, the sampler's weights, workers, `dls`.

Reading the items (`items`), splitting them (`split`), the item pipeline (`images`) and the pre-resized image cache
(`cache`) live in their own modules; `dls` puts them into one DataBlock.
"""

__all__ = ["NormalizeInplace", "batch_tfms", "dataset_stats", "dls", "default_workers", "norm_stats", "test_dl"]

import os
from typing import Optional

import numpy as np
import pandas as pd
import torch
from fastai.callback.data import WeightedDL  # noqa: F401  (registers DataBlock.weighted_dataloaders, used by dls)
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor, Normalize
from fastai.torch_core import set_seed
from fastai.vision.augment import Hue, Saturation, aug_transforms
from fastai.vision.core import TensorImage
from fastai.vision.data import ImageBlock, imagenet_stats

from ..hardware import reuse_freed_memory
from ..imbalance import oversample_weights, parse_imbalance
from ..recipe import Recipe
from .cache import PresizedDL, pre_resized
from .images import ImageGetter, item_tfms, resolve_recipe
from .items import Items
from .split import assign_folds, assign_split, sample_items


class NormalizeInplace(Normalize):
    """fastai's Normalize, in place: the batch it gets is always a fresh float tensor (made by IntToFloatTensor or
    the augmentations), and on CPU each new 64x3x224x224 float tensor costs ~40 ms of page faults (measured)."""

    def encodes(self, x: TensorImage):
        return x.sub_(self.mean).div_(self.std)


def batch_tfms(recipe: Recipe, stats=None) -> list:
    """GPU-friendly batch augmentation (train only) and normalisation by `stats` (mean, std; None: none)."""
    tfms = []
    if recipe.aug:
        tfms += aug_transforms(do_flip=recipe.flip, max_rotate=recipe.max_rotate, max_zoom=recipe.max_zoom,
                               max_lighting=recipe.max_lighting, max_warp=0.0)
        if recipe.color_jitter:  # torchvision's ColorJitter saturation/hue, as fastai batch transforms
            tfms += [Saturation(max_lighting=recipe.color_jitter), Hue(max_hue=recipe.color_jitter / 2)]
    if stats is not None:
        tfms.append(NormalizeInplace.from_stats(*stats))
    return tfms


def dataset_stats(items: Items, df: pd.DataFrame, n: int = 512, seed: int = 0):
    """Per-channel mean and std (0..1 scale) of up to `n` training images, for recipes normalising by their own data."""
    rng = np.random.default_rng(seed)
    get = ImageGetter(items.arrays)
    rows = df.iloc[rng.permutation(len(df))[:n]]
    px = np.concatenate([np.asarray(get(r), dtype=np.float32).reshape(-1, 3) / 255 for _, r in rows.iterrows()])
    return px.mean(0).tolist(), px.std(0).tolist()


def norm_stats(recipe: Recipe, items: Items, df: pd.DataFrame, stats=None):
    """The (mean, std) a loader normalises with: None for `normalize='none'`; for 'dataset' the train split's own
    (or `stats`, a stored run's, when given); otherwise `stats` when given (the pretrained model's own statistics,
    `fastcls.config.RunConfig.norm_stats`), else ImageNet's."""
    if recipe.normalize == "none":
        return None
    if recipe.normalize == "dataset" and stats is None:
        return dataset_stats(items, df[~df["is_valid"]])
    return tuple(map(list, stats)) if stats is not None else tuple(map(list, imagenet_stats))


def dls(recipe: Recipe, items: Items, seed: int = 42, sample: Optional[int] = None, num_workers: Optional[int] = None,
        stats=None, fold: Optional[tuple] = None):
    """fastai DataLoaders for the recipe's items, split by the recipe's `split_seed`; `seed` seeds the batches.

    `sample` takes a stratified subset (drawn with `split_seed` too, so runs differing only in `seed` share items).

    The vocab is the recipe's `classes` when it declares them (their order), else the sorted labels. With
    `normalize='dataset'` the train split's mean/std are used, or `stats` (e.g. a stored run's) when given.
    Images are cropped and resized once where `fastcls.data.cache.pre_resized` says so (`out.cached`: "memory",
    "disk+memory", "disk" or None); `num_workers` None means `default_workers()`. `fold=(k, K)` validates on fold
    k of `assign_folds(..., K, recipe.split_seed)` instead of the recipe's split.
    """
    recipe = resolve_recipe(recipe, items)
    split_seed = recipe.split_seed
    train = sample_items(items.train, sample, split_seed)
    if fold is None:
        df = assign_split(train, recipe, split_seed).reset_index(drop=True)
    else:
        df = train.reset_index(drop=True).assign(is_valid=assign_folds(train, recipe, fold[1], split_seed) == fold[0])
    stats = norm_stats(recipe, items, df, stats)
    vocab = [str(c) for c in recipe.classes] if recipe.classes else sorted(df["label"].unique().tolist())
    get_x, tfms, cached = pre_resized(recipe, items, [df, items.test], ImageGetter(items.arrays, items.blank),
                                      item_tfms(recipe))
    # pre-resized images come as uint8 tensors already: no PIL round trip per item
    img_block = TransformBlock(batch_tfms=IntToFloatTensor) if cached and "memory" in cached else ImageBlock
    block = DataBlock(blocks=(img_block, CategoryBlock(vocab=vocab, sort=False)), get_x=get_x,
                      get_y=ColReader("label"), splitter=ColSplitter("is_valid"), item_tfms=tfms,
                      batch_tfms=batch_tfms(recipe, stats))
    set_seed(seed)
    workers = default_workers() if num_workers is None else num_workers
    if not _cuda():
        reuse_freed_memory()  # CPU batches: reuse freed heap memory instead of page-faulting fresh pages in
    kw = dict(bs=recipe.bs, num_workers=workers, device="cpu" if not _cuda() else None)
    wgts = _sample_weights(recipe, df)
    if wgts is not None:  # fastai's WeightedDL draws the training batches by weight; valid stays plain and in order
        out = block.weighted_dataloaders(df, wgts, **kw)
    else:
        out = block.dataloaders(df, dl_type=PresizedDL if cached and "memory" in cached else None, **kw)
    out.items, out.stats, out.cached = items, stats, cached
    return out


def _sample_weights(recipe: Recipe, df: pd.DataFrame) -> Optional[np.ndarray]:
    """Per-row sampling weights for the imbalance plan's oversampler (valid rows 0: fastai drops them), or None."""
    if "oversample" not in parse_imbalance(recipe.imbalance):
        return None
    train = ~df["is_valid"].to_numpy(bool)
    wgts = np.zeros(len(df))
    wgts[train] = oversample_weights(df.loc[train, "label"].to_numpy())
    return wgts


def default_workers() -> int:
    """DataLoader worker processes: 0 on CPU (measured: with 2 cores the model's threads need them), else cores - 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, n - 1) if _cuda() and n > 2 else 0


def test_dl(dls_, items: Items):
    """A DataLoader over the test items with the validation pipeline (no labels)."""
    if items.test is None or not len(items.test):
        return None
    return dls_.test_dl(items.test, with_labels=False)


def _cuda() -> bool:
    return torch.cuda.is_available()
