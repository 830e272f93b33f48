"""Predictions as stacked views: view 0 is the plain prediction, views 1..n are augmented (TTA) passes.

The same view logic extracts a frozen body's pooled activations (`pooled_features`), which the sweeps' fast path
caches on disk and trains heads on.
"""

__all__ = ["predict_views", "tta_blend", "stacked_views", "pooled_features"]

import numpy as np
import torch


def stacked_views(dl, n_aug: int, predict):
    """`predict(dl)` once as is and `n_aug` times with the training transforms, stacked: ((1 + n_aug, N, ...), targets).

    `predict` returns (outputs, targets) for an unshuffled `dl`. On a validation or test loader view 0 is the plain
    pass; a training loader augments every pass.
    """
    dl = dl.new(shuffle=False, drop_last=False)
    first, targs = predict(dl)
    views = [first]
    with dl.dataset.set_split_idx(0):
        for _ in range(n_aug):
            views.append(predict(dl)[0])
    targets = targs.numpy().astype(np.int64) if isinstance(targs, torch.Tensor) else None
    return torch.stack(views).float().numpy(), targets


def predict_views(learn, dl, n_tta: int = 4):
    """Probabilities of `dl` as an array (1 + n_tta, N, C) and the targets (or None for unlabeled items).

    The augmented views use the training transforms, as fastai's `Learner.tta` does, but every view is kept so any
    blend (fastai's `beta`, max, or a learned one) can be recomputed from the run store later.
    """
    with learn.no_bar():
        return stacked_views(dl, n_tta, lambda d: learn.get_preds(dl=d))


def pooled_features(body: torch.nn.Module, pool: torch.nn.Module, dl, n_aug: int = 0):
    """The body's pooled activations `pool(body(x))` of every item of `dl`: ((1 + n_aug, N, F) float32, targets).

    The body runs in eval mode (frozen batch-norm statistics), as fastai 0.7's `precompute=True` did.
    """
    device = next(body.parameters()).device
    was_training = body.training
    body.eval()

    @torch.no_grad()
    def run(d):
        feats, targs = [], []
        for b in d:  # fastai's tensor subclasses are dropped: plain tensors stack and save as arrays
            feats.append(pool(body(b[0].as_subclass(torch.Tensor).to(device))).float().cpu())
            if len(b) > 1:
                targs.append(b[1].as_subclass(torch.Tensor).cpu())
        return torch.cat(feats), (torch.cat(targs) if targs else None)

    try:
        return stacked_views(dl, n_aug, run)
    finally:
        body.train(was_training)


def tta_blend(views: np.ndarray, beta: float = 0.25) -> np.ndarray:
    """fastai's TTA blend: `beta * plain + (1 - beta) * mean(augmented views)`; the plain view when there are none."""
    views = np.asarray(views)
    if len(views) == 1:
        return views[0]
    return beta * views[0] + (1 - beta) * views[1:].mean(0)
