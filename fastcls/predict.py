"""Predictions as stacked views: view 0 is the plain prediction, views 1..n are augmented (TTA) passes.

`pooled_features` gives a frozen body's pooled activations in the same views; the sweeps' fast path caches them
on disk and trains heads on them (`fastcls.features`).
"""

__all__ = ["predict_views", "tta_blend", "lerp_blend", "pooled_features", "encode_labels"]

from typing import Optional

import numpy as np
import torch

_CHUNK = 16384  # rows per block: keeps the temporaries of a blend small and cache-friendly


def predict_views(learn, dl, n_tta: int = 4, plain: bool = True):
    """Probabilities of `dl` as an array (1 + n_tta, N, C) and the targets (or None for unlabeled items); with
    `plain=False` only the n_tta augmented views (n_tta, N, C) and None.

    The augmented views use the training transforms, as fastai's `Learner.tta` does, but every view is kept so any
    blend (fastai's `beta`, max, or a learned one) can be recomputed from the run store later.
    """
    dl = dl.new(shuffle=False, drop_last=False)
    with learn.no_bar():
        probs, targs = learn.get_preds(dl=dl) if plain else (None, None)
        views = [probs] if plain else []
        with dl.dataset.set_split_idx(0):
            for _ in range(n_tta):
                views.append(learn.get_preds(dl=dl)[0])
    targets = targs.numpy().astype(np.int64) if isinstance(targs, torch.Tensor) else None
    return torch.stack(views).float().numpy(), targets


def pooled_features(body: torch.nn.Module, pool: torch.nn.Module, dl, n_aug: int = 0):
    """The body's pooled activations `pool(body(x))` of every item of `dl`: ((1 + n_aug, N, F) float32, targets).

    View 0 uses the loader's own transforms (plain on valid/test, augmented on train), views 1.. the training
    (augmenting) batch transforms. Each batch is decoded once and its views come from applying the batch transforms
    again, which holds because the item transforms (crop, squish resize) are deterministic. The body runs in eval
    mode (frozen batch-norm statistics), as fastai 0.7's `precompute=True` did.
    """
    from fastcore.basics import noop
    device = next(body.parameters()).device
    dl = dl.new(shuffle=False, drop_last=False)
    tfms, dl.after_batch = dl.after_batch, noop  # the loader yields decoded, untransformed batches
    split, old = getattr(dl.dataset, "split_idx", None), getattr(tfms, "split_idx", None)
    views, targs = [[] for _ in range(1 + n_aug)], []
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            for b in dl:
                for v, out in enumerate(views):
                    tfms.split_idx = split if v == 0 else 0
                    x = tfms(b)[0].as_subclass(torch.Tensor)  # fastai's tensor subclasses are dropped
                    out.append(pool(body(x.to(device))).float().cpu())
                if len(b) > 1:
                    targs.append(b[1].as_subclass(torch.Tensor).cpu())
    finally:
        tfms.split_idx = old
        body.train(was_training)
    targets = torch.cat(targs).numpy().astype(np.int64) if targs else None
    return torch.stack([torch.cat(v) for v in views]).numpy(), targets


def tta_blend(views, beta: float = 0.25) -> np.ndarray:
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
