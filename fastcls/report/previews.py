"""What the network sees and how fast it should learn: batch previews (`preview_batch`, `plot_batch`), the LR finder
(`lr_find`, `plot_lr_find`)."""

__all__ = ["preview_batch", "plot_batch", "save_batches", "LrFind", "lr_find", "find_lr", "plot_lr_find"]

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..errors import FastclsError
from ..plots import ReportFigure, fit_title
from ..recipe import Recipe, each_size
from .plots import grid_figure, short_label, show_image


# -- what the network sees --------------------------------------------------------------------------------------------
def preview_batch(d, n: int = 16, seed: int = 42):
    """A training batch of `n` random items through fastai's training pipeline (crop, resize, augmentation),
    decoded back to pictures.

    Args:
        d: fastai DataLoaders from `fastcls.dls`.
        n: number of items.
        seed: picks the items and the random augmentation.

    Returns:
        (rows, decoded): the items' rows of the training table and fastai's decoded `(image, label)` pairs.
    """
    from fastai.torch_core import set_seed
    train = d.train_ds.items
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(train), size=min(n, len(train)), replace=False))
    rows = train.iloc[idx]
    tdl = d.test_dl(rows, with_labels=True, bs=len(rows))
    set_seed(seed)
    with tdl.dataset.set_split_idx(0):  # the training transforms (random crop/zoom/rotate/lighting), as in Learner.tta
        batch = tdl.one_batch()
    return rows, tdl.decode_batch(batch, max_n=len(rows))


def plot_batch(recipe: Recipe, items=None, data=None, n: int = 16, seed: int = 42, sample: Optional[int] = None,
               originals: bool = False, d=None) -> Figure:
    """A grid of what the network sees: `n` training images after crop, resize and augmentation, with labels.

    Args:
        recipe: the recipe (with any overrides, e.g. `recipe.override(size=64, crop='center')`).
        items: already-read items (default: `read_items(recipe, data)`).
        data: the data folder (default: the recipe's).
        n: number of images.
        seed: the split, the items shown and the augmentation.
        sample: build the dls on a stratified subset (faster on big data sets).
        originals: put each original image (as read from disk) to the left of its crop, the crop's box drawn on it.
        d: already-built DataLoaders (default: `fastcls.dls(recipe, items, seed, sample)`).

    Returns:
        The figure: `grid_shape(n, originals)` panels of `PANEL_PX` pixels plus a `HEADER_PX` title.
    """
    from ..data import ImageGetter, dls, item_tfms, read_items, resolve_recipe
    if n < 1:
        raise FastclsError(f"--n must be at least 1, got {n}.")
    items = items if items is not None else read_items(recipe, data)
    recipe = resolve_recipe(recipe, items)  # e.g. a size left to the data
    d = d if d is not None else dls(recipe, items, seed=seed, sample=sample)
    rows, decoded = preview_batch(d, n, seed)
    crop = {"trim": f"trim {tuple(recipe.trim)}", "center": "centre square", "none": "no crop"}[recipe.crop]
    title = (f"{recipe.name}: training batch as the network sees it - {crop}, resized to {recipe.size} px, "
             f"augmentation {'on' if recipe.aug else 'off'}")
    fig, axes = grid_figure(len(rows), originals, title)
    get = ImageGetter(items.arrays)
    crop_tfm = next((t for t in item_tfms(recipe) if hasattr(t, "box_for")), None)
    step = 2 if originals else 1
    for k, ((img, label), (_, row)) in enumerate(zip(decoded, rows.iterrows())):
        ax = axes[k * step]
        if originals:
            orig = get(row)
            show_image(ax, orig, f"{short_label(label, 22)}\noriginal {orig.size[0]}x{orig.size[1]}")
            box = crop_tfm.box_for(*orig.size) if crop_tfm is not None else None
            if box is not None:  # the part of the original the crop keeps, before resizing and augmentation
                ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                       ec="red", lw=1.5, ls="--"))
            ax = axes[k * step + 1]
        show_image(ax, img.permute(1, 2, 0).numpy(), f"{'network input' if originals else short_label(label, 22)}"
                f"\n{img.shape[2]}x{img.shape[1]}")
    return fig



def save_batches(recipe: Recipe, path, data=None, **kw) -> list:
    """`plot_batch` saved as a PNG at `path`. A progressive recipe (`--size 128,224`) trains at each size in turn, so
    it gets one picture per size, `<stem>-<size>px<suffix>` beside `path` (in training order).

    Args:
        recipe: the recipe with its overrides. path: the picture's path. data: the data folder (default: the
            recipe's). kw: `plot_batch`'s `n`, `seed`, `sample`, `originals`.

    Returns:
        The paths written.
    """
    from ..data import read_items
    from ..plots import save_figure
    sized, path = each_size(recipe), Path(path)
    items = read_items(recipe, data)
    return [save_figure(plot_batch(r, items=items, **kw),
                        path if len(sized) == 1 else path.with_name(f"{path.stem}-{r.size}px{path.suffix}"))
            for r in sized]

# -- learning-rate finder ---------------------------------------------------------------------------------------------
@dataclass
class LrFind:
    """fastai's LR finder result: the suggested learning rates by method, and the recorded (lr, loss) curve."""

    suggestions: dict
    lrs: list
    losses: list
    points: dict = field(default_factory=dict)  # method -> (lr, loss) marked on the plot


def lr_find(learn, num_it: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0) -> LrFind:
    """Run fastai's `Learner.lr_find` with the minimum, steep and valley suggestions; the model is left untouched.

    fastai saves and reloads the weights around the mock training in `learn.path/models`; here that is a temporary
    folder, so nothing is written next to the user's files.
    """
    from fastai.callback.schedule import minimum, steep, valley
    if num_it < 10:
        raise FastclsError(f"--num-it must be at least 10, got {num_it}.")
    if not 0 < start_lr < end_lr:
        raise FastclsError(f"Need 0 < --start-lr < --end-lr, got {start_lr} and {end_lr}.")
    old_path, old_dir = learn.path, learn.model_dir
    funcs = (minimum, steep, valley)
    with tempfile.TemporaryDirectory() as tmp:
        learn.path, learn.model_dir = Path(tmp), "models"
        try:
            with learn.no_logging(), learn.no_bar():
                sug = learn.lr_find(start_lr=start_lr, end_lr=end_lr, num_it=num_it, show_plot=False,
                                    suggest_funcs=funcs)
        except (IndexError, RuntimeError, ValueError) as e:
            n = len(learn.recorder.lrs) if hasattr(learn.recorder, "lrs") else 0
            raise FastclsError(f"The LR finder recorded {n} of {num_it} steps, too few to suggest a learning rate "
                               f"({type(e).__name__}: {e}). The loss probably diverged early: lower --end-lr or "
                               f"raise --num-it.") from None
        finally:
            learn.path, learn.model_dir = old_path, old_dir
    lrs = [float(v) for v in learn.recorder.lrs]
    losses = [float(v) for v in learn.recorder.losses]
    suggestions = {k: float(v) for k, v in sug._asdict().items()}
    points = {k: (v, float(np.interp(np.log(v), np.log(lrs), losses))) for k, v in suggestions.items()}
    return LrFind(suggestions, lrs, losses, points)


def find_lr(cfg, num_it: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0) -> LrFind:
    """`lr_find` on the learner a run of `cfg` (a `fastcls.config.RunConfig`) would train, on its data."""
    from ..train import learner, prepare
    p = prepare(cfg)
    return lr_find(learner(p.dls(), p.cfg), num_it, start_lr, end_lr)


def plot_lr_find(res: LrFind, title: str = "", skip_end: int = 5) -> Figure:
    """The loss against the learning rate (log scale) with the suggestions marked, as fastai plots it."""
    fig = ReportFigure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    end = -skip_end if skip_end and len(res.lrs) > skip_end + 2 else None
    ax.plot(res.lrs[:end], res.losses[:end], lw=1.5)
    for (name, (lr, loss)), color in zip(res.points.items(), ("tab:orange", "tab:green", "tab:red")):
        ax.plot(lr, loss, "o", ms=8, c=color, label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    fit_title(fig, title or "LR finder")
    ax.grid(alpha=0.3, which="both")
    if res.points:
        ax.legend(loc="best")
    return fig
