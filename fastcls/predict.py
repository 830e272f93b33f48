"""Predictions as stacked views: view 0 is the plain prediction, then the named deterministic views (`named_views`:
flip, crop5, scale, in the recipe's `tta_views` order), then the random augmented (TTA) passes.

`pooled_features` gives a frozen body's pooled activations in the same views; the sweeps' fast path caches them
on disk and trains heads on them (`fastcls.features`).
"""

__all__ = ["predict_views", "tta_blend", "lerp_blend", "choose_tta_beta", "best_beta", "run_tta_beta", "BETA_GRID",
           "FASTAI_BETA", "pooled_features", "encode_labels", "named_views", "view_count", "CROP_FRAC", "SCALE_ZOOMS"]

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from .metrics import get_metric
from .recipe import TTA_VIEW_NAMES

_CHUNK = 16384  # rows per block: keeps the temporaries of a blend small and cache-friendly
CROP_FRAC = 0.875  # crop5: each crop's side, as a fraction of the image's (torchvision's 224 of 256)
SCALE_ZOOMS = (1.25, 0.8)  # scale: zoomed in (the centre 1/1.25 of the side) and out (shrunk, reflection-padded)
BETA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)  # TTA blends tried on valid (weight of the plain view)
FASTAI_BETA = 0.25  # fastai's `Learner.tta` default: the blend of runs stored before a run chose its own


def _resize(x: torch.Tensor, hw: tuple, antialias: bool = False) -> torch.Tensor:
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=antialias)


def named_views(name: str, x: torch.Tensor) -> list:
    """The deterministic TTA views `name` of a batch `x` (B, C, H, W), each of the same size as `x`.

    'flip': the mirror image (left-right). 'crop5': the 4 corner crops and the centre crop (top-left, top-right,
    bottom-left, bottom-right, centre) of side `CROP_FRAC` of the image's, each resized back (bilinear). 'scale': the
    centre 1/1.25 of the image resized back (zoomed in x1.25), and the whole image shrunk to 0.8 of its side
    (antialiased) and reflection-padded back (zoomed out). Flips, crops, bilinear resizing and padding commute with
    per-channel normalisation, so the views of a normalised batch are those of the images.
    """
    x = x.as_subclass(torch.Tensor)  # fastai's tensor subclasses are dropped
    h, w = x.shape[-2:]
    if name == "flip":
        return [x.flip(-1)]
    if name == "crop5":
        ch, cw = round(h * CROP_FRAC), round(w * CROP_FRAC)
        boxes = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), ((h - ch) // 2, (w - cw) // 2)]
        return [_resize(x[..., t:t + ch, l:l + cw], (h, w)) for t, l in boxes]
    if name == "scale":
        zin, zout = SCALE_ZOOMS
        ch, cw = round(h / zin), round(w / zin)
        t, l = (h - ch) // 2, (w - cw) // 2
        sh, sw = round(h * zout), round(w * zout)
        small = _resize(x, (sh, sw), antialias=True)
        pt, pl = (h - sh) // 2, (w - sw) // 2
        return [_resize(x[..., t:t + ch, l:l + cw], (h, w)),
                F.pad(small, (pl, w - sw - pl, pt, h - sh - pt), mode="reflect")]
    raise ValueError(f"unknown TTA view {name!r}; known: {', '.join(TTA_VIEW_NAMES)}")


def view_count(recipe) -> int:
    """How many views a run of `recipe` stores: the plain one, its named views and its `tta` random ones."""
    return 1 + sum(TTA_VIEW_NAMES[n] for n in recipe.tta_views) + recipe.tta


class _View(Callback):
    """Replaces each batch's input by its `k`-th view `name` (`named_views`) while `get_preds` runs."""

    order = 90

    def __init__(self, view: str, k: int):
        self.view, self.k = view, k  # (fastai's Callback.name is a read-only property)

    def before_batch(self):
        self.learn.xb = (named_views(self.view, self.xb[0])[self.k], *self.xb[1:])


def predict_views(learn, dl, n_tta: int = 4, names: tuple = (), plain: bool = True):
    """Probabilities of `dl` as an array (1 + named + n_tta, N, C) and the targets (or None for unlabeled items); with
    `plain=False` only the named and augmented views (named + n_tta, N, C) and None.

    `names`: the deterministic views (`named_views`), stored after the plain view in this order. The augmented views
    use the training transforms, as fastai's `Learner.tta` does, but every view is kept so any blend (fastai's
    `beta`, max, or a learned one) can be recomputed from the run store later.
    """
    dl = dl.new(shuffle=False, drop_last=False)
    with learn.no_bar():
        probs, targs = learn.get_preds(dl=dl) if plain else (None, None)
        views = [probs] if plain else []
        for name in names:
            for k in range(TTA_VIEW_NAMES[name]):
                views.append(learn.get_preds(dl=dl, cbs=[_View(name, k)])[0])
        with dl.dataset.set_split_idx(0):
            for _ in range(n_tta):
                views.append(learn.get_preds(dl=dl)[0])
    targets = targs.numpy().astype(np.int64) if isinstance(targs, torch.Tensor) else None
    return torch.stack(views).float().numpy(), targets


def pooled_features(body: torch.nn.Module, pool: torch.nn.Module, dl, n_aug: int = 0, names: tuple = (),
                    out=None, dtype=np.float32):
    """The body's pooled activations `pool(body(x))` of every item of `dl`: ((1 + named + n_aug, N, F) array of
    `dtype`, targets), in `predict_views`' order.

    View 0 uses the loader's own transforms (plain on valid/test, augmented on train), then the named views of view
    0 (`named_views`), then the training (augmenting) batch transforms. Each batch is decoded once and its views come
    from applying the batch transforms again, which holds because the item transforms (crop, squish resize) are
    deterministic. The body runs in eval mode (frozen batch-norm statistics), as fastai 0.7's `precompute=True` did.

    With `out` (a path), nothing is gathered in memory: each batch's features go straight into the `.npy` file `out`
    (created by `np.lib.format.open_memmap` at the first batch, then one memory-mapped window per batch and view), so
    memory does not grow with N; the array returned is then that file, memory-mapped read-only.
    """
    from fastcore.basics import noop
    device = next(body.parameters()).device
    dl = dl.new(shuffle=False, drop_last=False)
    tfms, dl.after_batch = dl.after_batch, noop  # the loader yields decoded, untransformed batches
    split, old = getattr(dl.dataset, "split_idx", None), getattr(tfms, "split_idx", None)
    n_named = sum(TTA_VIEW_NAMES[n] for n in names)
    sink = _FeatureSink(1 + n_named + n_aug, len(dl.dataset), dtype, out)
    targs, lo = [], 0
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            for b in dl:
                for v in range(sink.views):
                    if 0 < v <= n_named:
                        continue
                    tfms.split_idx = split if v == 0 else 0
                    x = tfms(b)[0].as_subclass(torch.Tensor).to(device)  # fastai's tensor subclasses are dropped
                    sink.put(v, lo, pool(body(x)))
                    if v == 0:
                        named = [y for n in names for y in named_views(n, x)]
                        for k, y in enumerate(named, 1):
                            sink.put(k, lo, pool(body(y)))
                lo += len(b[0])
                if len(b) > 1:
                    targs.append(b[1].as_subclass(torch.Tensor).cpu())
    finally:
        tfms.split_idx = old
        body.train(was_training)
    targets = torch.cat(targs).numpy().astype(np.int64) if targs else None
    return sink.result(), targets


class _FeatureSink:
    """Where `pooled_features` puts each batch: a list of blocks (in memory), or windows of an `.npy` file."""

    def __init__(self, views: int, n: int, dtype, path=None):
        self.views, self.n, self.dtype, self.path = views, n, np.dtype(dtype), path
        self.blocks = [[] for _ in range(views)]
        self.offset = self.nf = None

    def put(self, v: int, lo: int, feats: torch.Tensor):
        block = feats.float().cpu().numpy()
        if self.path is None:
            self.blocks[v].append(block.astype(self.dtype, copy=False))
            return
        if self.offset is None:  # the first batch gives the feature width: create the file (header, full size)
            self.nf = block.shape[1]
            mm = np.lib.format.open_memmap(self.path, mode="w+", dtype=self.dtype, shape=(self.views, self.n, self.nf))
            self.offset = mm.offset
            del mm
        at = self.offset + (v * self.n + lo) * self.nf * self.dtype.itemsize
        window = np.memmap(self.path, dtype=self.dtype, mode="r+", offset=at, shape=block.shape)
        window[:] = block
        del window  # unmapped: the written pages belong to the page cache, not to this process

    def result(self):
        if self.path is None:
            return np.stack([np.concatenate(b) for b in self.blocks])
        if self.offset is None:
            raise ValueError("pooled_features: the loader gave no batch, so there is no feature file to write")
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


def tta_blend(views, beta: float = FASTAI_BETA) -> np.ndarray:
    """Blend one run's stacked prediction views the way fastai's `Learner.tta(beta=...)` does.

    fastai returns `torch.lerp(aug_preds, preds, beta)`, i.e. `beta * plain + (1 - beta) * mean(TTA views)`: beta is
    the weight of the plain (un-augmented) prediction, so beta=1 is the plain view and beta=0 the TTA mean.

    Args:
        views: (V, N, C) probabilities; view 0 is the plain prediction, views 1.. the TTA views. May be memory-mapped:
            the TTA views are accumulated one at a time.
        beta: weight of the plain view, in [0, 1].

    Returns:
        (N, C) float32 probabilities; the plain view itself when there are no TTA views.
    """
    V = views.shape[0]
    if V == 1:
        return views[0]
    aug = np.zeros(views.shape[1:], dtype=np.float32)
    for v in range(1, V):
        aug += views[v]
    aug /= np.float32(V - 1)
    return lerp_blend(views[0], aug, beta)


def choose_tta_beta(views, targets, metric: str, grid=BETA_GRID) -> float:
    """The TTA blend of `grid` that scores best with `metric` on labelled `views` (V, N, C); among equal scores the
    one nearest fastai's default (`FASTAI_BETA`), so a tie on a small valid set changes nothing. 1 (the plain view)
    when there are no TTA views.

    Random augmented views can hurt (e.g. a model trained a few epochs, a small valid set): a blend chosen on valid
    keeps a run's TTA score from falling below its plain one there. The choice is in-sample on valid (one of 5
    values); test scores stay held out.
    """
    if views.shape[0] == 1:
        return 1.0
    m = get_metric(metric)
    sign = 1 if m.higher_is_better else -1
    aug = tta_blend(views, 0.0)  # the TTA mean, once
    return float(grid[best_beta([sign * m(targets, lerp_blend(views[0], aug, b)) for b in grid], grid)])


def best_beta(scores, grid=BETA_GRID) -> int:
    """Position in `grid` of the best of `scores` (higher is better; NaN ranks last); among equal scores the blend
    nearest fastai's default (`FASTAI_BETA`). The one tie rule of a run's choice and of an ensemble member's."""
    return max(range(len(grid)), key=lambda g: (-np.inf if np.isnan(scores[g]) else scores[g],
                                                -abs(grid[g] - FASTAI_BETA)))


def run_tta_beta(meta: Optional[dict]) -> float:
    """A stored run's TTA blend: the one it chose on valid (`tta_beta` in its meta.json, beside its post-hoc steps:
    what predicting needs, so a damaged metrics.json does not stop a submission), else fastai's default."""
    beta = (meta or {}).get("tta_beta")
    return FASTAI_BETA if beta is None else float(beta)


def lerp_blend(plain, aug, beta):
    """beta * plain + (1 - beta) * aug, float32; the operands themselves at beta 1 and 0 (no copy)."""
    if aug is None or beta == 1:
        return plain
    if beta == 0:
        return aug
    out = np.empty(aug.shape, dtype=np.float32)
    for lo in range(0, len(aug), _CHUNK):
        out[lo:lo + _CHUNK] = plain[lo:lo + _CHUNK] * np.float32(beta) + aug[lo:lo + _CHUNK] * np.float32(1 - beta)
    return out


def encode_labels(labels, vocab) -> Optional[np.ndarray]:
    """Class indices of `labels` in `vocab`, or None when a label is not in it (e.g. a test set without labels)."""
    idx = {str(v): i for i, v in enumerate(vocab)}
    if not all(str(l) in idx for l in labels):
        return None
    return np.array([idx[str(l)] for l in labels])
