"""Predictions as stacked views: view 0 is the plain prediction, views 1..n are augmented (TTA) passes.

`pooled_features` gives a frozen body's pooled activations in the same views; the sweeps' fast path caches them
on disk and trains heads on them (`fastcls.features`).
"""

__all__ = ["predict_views", "tta_blend", "pooled_features"]

import numpy as np
import torch


def predict_views(learn, dl, n_tta: int = 4):
    """Probabilities of `dl` as an array (1 + n_tta, N, C) and the targets (or None for unlabeled items).

    The augmented views use the training transforms, as fastai's `Learner.tta` does, but every view is kept so any
    blend (fastai's `beta`, max, or a learned one) can be recomputed from the run store later.
    """
    dl = dl.new(shuffle=False, drop_last=False)
    with learn.no_bar():
        probs, targs = learn.get_preds(dl=dl)
        views = [probs]
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


def tta_blend(views: np.ndarray, beta: float = 0.25) -> np.ndarray:
    """fastai's TTA blend: `beta * plain + (1 - beta) * mean(augmented views)`; the plain view when there are none.

    One implementation serves training, submissions and ensembles: `fastcls.ensemble.tta_blend` (chunked, so
    memory-mapped views are never copied whole).
    """
    from .ensemble import tta_blend as blend
    return blend(views if hasattr(views, "shape") else np.asarray(views), beta)
