"""Predictions as stacked views: view 0 is the plain prediction, views 1..n are augmented (TTA) passes."""

__all__ = ["predict_views", "tta_blend"]

import numpy as np
import torch


def predict_views(learn, dl, n_tta: int = 4):
    """Probabilities of `dl` as an array (1 + n_tta, N, C) and the targets (or None for unlabeled items).

    The augmented views use the training transforms, as fastai's `Learner.tta` does, but every view is kept so any
    blend (fastai's `beta`, max, or a learned one) can be recomputed from the run store later.
    """
    dl = dl.new(shuffled=False, drop_last=False)
    with learn.no_bar():
        probs, targs = learn.get_preds(dl=dl)
        views = [probs]
        with dl.dataset.set_split_idx(0):
            for _ in range(n_tta):
                views.append(learn.get_preds(dl=dl)[0])
    targets = targs.numpy().astype(np.int64) if isinstance(targs, torch.Tensor) else None
    return torch.stack(views).float().numpy(), targets


def tta_blend(views: np.ndarray, beta: float = 0.25) -> np.ndarray:
    """fastai's TTA blend: `beta * plain + (1 - beta) * mean(augmented views)`; the plain view when there are none."""
    views = np.asarray(views)
    if len(views) == 1:
        return views[0]
    return beta * views[0] + (1 - beta) * views[1:].mean(0)
