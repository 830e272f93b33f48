"""Pictures of data and runs: batch previews, the LR finder, confusion matrices, per-class scores, top losses,
training curves, and one self-contained HTML page per run.

Every `plot_*` function returns a matplotlib `Figure` built without pyplot (no global state, any backend: a notebook
shows it inline, the CLI saves it as PNG). Figures have a fixed size in pixels (`DPI`) that grows with the number of
images or classes, and are saved without tight cropping, so their size is predictable.
"""

__all__ = ["DPI", "PANEL_PX", "HEADER_PX", "ReportFigure", "save_figure", "short_label", "grid_shape", "run_config",
           "preview_batch", "plot_batch", "LrFind", "lr_find", "plot_lr_find", "confusion", "per_class",
           "confusion_figsize", "per_class_figsize", "plot_confusion", "plot_per_class", "top_losses",
           "plot_top_losses", "plot_history", "plot_members", "plot_sweep", "sweep_plot", "sweep_results", "Report", "write_report",
           "write_sweep_report"]

import base64
import html
import io
import math
import os
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ..errors import FastclsError
from ..recipe import Recipe, recipe_from_config
from ..files import write_atomic

DPI = 100
PANEL_PX = 200  # one image of a grid, in pixels (2 inches at DPI)
HEADER_PX = 70  # room for a grid's title (and the first row's captions)
_PANEL = PANEL_PX / DPI


class ReportFigure(Figure):
    """A matplotlib Figure that shows itself in a notebook as its PNG (at `DPI`), with or without pyplot loaded."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, dpi=DPI, format="png", facecolor="white")
        return buf.getvalue()


def save_figure(fig: Figure, path) -> Path:
    """Write `fig` as a PNG of exactly its size (figsize x DPI pixels); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png", facecolor="white")
    return path


def short_label(name, width: int = 16) -> str:
    """`name` cut to `width` characters in the middle, so long class names stay distinct ('abraham…simpson')."""
    name = str(name)
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return name[:head] + "…" + name[-(width - 1 - head):]


def grid_shape(n: int, pairs: bool = False) -> tuple[int, int]:
    """(rows, columns) of a grid of `n` images, or of `n` (original, crop) pairs side by side."""
    per_row = max(2, math.ceil(math.sqrt(n)))  # at least two panels wide, so the title fits
    rows = max(1, math.ceil(n / per_row))
    return rows, per_row * (2 if pairs else 1)


def _grid_figure(n: int, pairs: bool = False, title: str = "", hspace: float = 0.3) -> tuple[ReportFigure, list]:
    rows, cols = grid_shape(n, pairs)
    fig = ReportFigure(figsize=(cols * _PANEL, rows * _PANEL + HEADER_PX / DPI))
    height_px = fig.get_figheight() * DPI
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - HEADER_PX / height_px, wspace=0.08,
                        hspace=hspace)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    if title:
        _title(fig, title, y=1 - 6 / height_px, va="top")
    return fig, list(axes)


def _title(fig: Figure, title: str, **kw):
    """The figure's title, fitted to its width: the font shrinks from 11 down to 7 pt, then the text wraps."""
    width_px = fig.get_figwidth() * DPI
    char_px = 0.6 * DPI / 72  # average character width per point of font size
    size = float(np.clip(0.95 * width_px / (max(1, len(title)) * char_px), 7, 11))
    fig.suptitle("\n".join(textwrap.wrap(title, max(20, int(0.95 * width_px / (size * char_px))))), fontsize=size, **kw)


def _imshow(ax, img, title: str, color: str = "black"):
    arr = np.asarray(img)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest" if max(arr.shape[:2]) < 96 else
              "antialiased")
    ax.set_title(title, fontsize=8, color=color)
    ax.axis("off")


# -- recipes and configs of stored runs -------------------------------------------------------------------------------
def run_config(config: dict, recipe_dirs=()):
    """The `RunConfig` of a stored run (recipe as trained, arch, data, seed, sample), e.g. to rebuild its `dls`."""
    from ..config import RunConfig
    return RunConfig(recipe_from_config(config, recipe_dirs=recipe_dirs), str(config.get("arch")), config.get("data"),
                     int(config.get("seed", 42)), config.get("weights"), config.get("sample"), config.get("run_name"))


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
    fig, axes = _grid_figure(len(rows), originals, title)
    get = ImageGetter(items.arrays)
    crop_tfm = next((t for t in item_tfms(recipe) if hasattr(t, "box_for")), None)
    step = 2 if originals else 1
    for k, ((img, label), (_, row)) in enumerate(zip(decoded, rows.iterrows())):
        ax = axes[k * step]
        if originals:
            orig = get(row)
            _imshow(ax, orig, f"{short_label(label, 22)}\noriginal {orig.size[0]}x{orig.size[1]}")
            box = crop_tfm.box_for(*orig.size) if crop_tfm is not None else None
            if box is not None:  # the part of the original the crop keeps, before resizing and augmentation
                ax.add_patch(Rectangle((box[0] - 0.5, box[1] - 0.5), box[2] - box[0], box[3] - box[1], fill=False,
                                       ec="red", lw=1.5, ls="--"))
            ax = axes[k * step + 1]
        _imshow(ax, img.permute(1, 2, 0).numpy(), f"{'network input' if originals else short_label(label, 22)}"
                f"\n{img.shape[2]}x{img.shape[1]}")
    return fig


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
    _title(fig, title or "LR finder")
    ax.grid(alpha=0.3, which="both")
    if res.points:
        ax.legend(loc="best")
    return fig


# -- scores of stored predictions -------------------------------------------------------------------------------------
def _labels(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs).argmax(1)


def confusion(targets, probs, vocab) -> pd.DataFrame:
    """Raw confusion counts (rows: true class, columns: predicted class) of the argmax of `probs` (N x C)."""
    from sklearn.metrics import confusion_matrix
    cm = confusion_matrix(np.asarray(targets), _labels(probs), labels=np.arange(len(vocab)))
    return pd.DataFrame(cm, index=pd.Index(vocab, name="true"), columns=pd.Index(vocab, name="predicted"))


def per_class(targets, probs, vocab) -> pd.DataFrame:
    """Precision, recall, F1 and support per class (scikit-learn), one row per class."""
    from sklearn.metrics import precision_recall_fscore_support
    p, r, f, s = precision_recall_fscore_support(np.asarray(targets), _labels(probs), labels=np.arange(len(vocab)),
                                                 zero_division=0)
    return pd.DataFrame({"class": [str(v) for v in vocab], "precision": p, "recall": r, "f1": f, "support": s})


def _class_font(n: int) -> float:
    return float(np.clip(13 - n / 8, 7.5, 10))


def confusion_figsize(n_classes: int) -> tuple[float, float]:
    """Confusion-matrix figure size in inches: about 0.34 inch (34 px) per class, within 6..22 inches."""
    side = float(np.clip(0.34 * n_classes + 3.2, 6, 22))
    return side + 0.8, side


def per_class_figsize(n_classes: int) -> tuple[float, float]:
    """Per-class bar chart size in inches: 0.32 inch (32 px) of height per class, within 3.5..24 inches."""
    return 9.0, float(np.clip(0.32 * n_classes + 1.6, 3.5, 24))


def plot_confusion(cm: pd.DataFrame, normalize: bool = False, title: str = "") -> Figure:
    """The confusion matrix as a heat map; rows normalised to recall when `normalize`. Size and fonts follow the
    number of classes, long names are shortened in the middle, cell values are shown up to 25 classes."""
    from sklearn.metrics import ConfusionMatrixDisplay
    n = len(cm)
    fig = ReportFigure(figsize=confusion_figsize(n), layout="constrained")
    ax = fig.subplots()
    values = cm.to_numpy()
    if normalize:
        values = values / np.maximum(values.sum(1, keepdims=True), 1)
    labels = [short_label(c, 18) for c in cm.index]
    disp = ConfusionMatrixDisplay(values, display_labels=labels)
    # counts are short and fit a cell up to 50 classes; two-decimal fractions only up to 25
    disp.plot(ax=ax, cmap="Blues", include_values=n <= (25 if normalize else 50),
              values_format=".2f" if normalize else "d", xticks_rotation=90 if max(map(len, labels)) > 3 else 0,
              colorbar=False, im_kw={"vmin": 0})
    bar = fig.colorbar(disp.im_, ax=ax, shrink=0.5, aspect=30)
    if not normalize:
        bar.locator = MaxNLocator(integer=True)  # counts: no 2.5 ticks
        bar.update_ticks()
    if disp.text_ is not None:
        for t, v in zip(disp.text_.ravel(), values.ravel()):
            t.set_fontsize(_class_font(n))
            if v == 0:
                t.set_text("")  # zeros would bury the off-diagonal errors that matter
    font = _class_font(n)
    ax.tick_params(labelsize=font)
    ax.set_xlabel("predicted", fontsize=10)
    ax.set_ylabel("true", fontsize=10)
    _title(fig, title or ("confusion matrix, rows normalised (recall)" if normalize else "confusion matrix (counts)"))
    return fig


def plot_per_class(table: pd.DataFrame, title: str = "") -> Figure:
    """Horizontal bars of precision, recall and F1 per class (class names stay horizontal and readable)."""
    n = len(table)
    fig = ReportFigure(figsize=per_class_figsize(n), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    h = 0.27
    for k, (col, color) in enumerate((("precision", "tab:blue"), ("recall", "tab:orange"), ("f1", "tab:green"))):
        bars = ax.barh(y + (k - 1) * h, table[col], height=h, color=color, label=col)
    ax.bar_label(bars, fmt="%.2f", fontsize=_class_font(n) - 1, padding=2)  # F1 as a number: 0 is not 'missing'
    ax.set_yticks(y, [f"{short_label(c, 22)} ({s})" for c, s in zip(table["class"], table["support"])],
                  fontsize=_class_font(n))
    ax.set_ylim(n - 0.5, -0.5)  # first class on top, no empty margins
    ax.set_xlim(0, 1.08)
    ax.set_xlabel("score (class support in brackets; F1 written at the green bar)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, frameon=False)
    _title(fig, title or "per-class precision, recall, F1")
    return fig


def top_losses(targets, probs, k: int = 16) -> pd.DataFrame:
    """The `k` validation rows with the highest loss (-log p of the true class), worst first."""
    probs = np.asarray(probs)
    targets = np.asarray(targets)
    p_true = probs[np.arange(len(targets)), targets]
    loss = -np.log(np.clip(p_true, 1e-8, None))
    order = np.argsort(-loss, kind="stable")[:k]
    return pd.DataFrame({"row": order, "target": targets[order], "pred": probs[order].argmax(1),
                         "p_pred": probs[order].max(1), "p_true": p_true[order], "loss": loss[order]})


def plot_top_losses(images: list, table: pd.DataFrame, vocab, title: str = "") -> Figure:
    """A grid of the worst validation images, each titled predicted / actual / loss / probability of the actual."""
    fig, axes = _grid_figure(len(table), title=title or "top losses", hspace=0.42)
    for ax, img, (_, r) in zip(axes, images, table.iterrows()):
        if img is None:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            _imshow(ax, img, "")
        wrong = r["pred"] != r["target"]
        ax.set_title(f"pred {short_label(vocab[int(r['pred'])], 22)}\ntrue {short_label(vocab[int(r['target'])], 22)}\n"
                     f"loss {r['loss']:.2f}, p(true) {r['p_true']:.2f}", fontsize=8,
                     color="firebrick" if wrong else "black")
    return fig


def plot_history(history: pd.DataFrame, title: str = "") -> Figure:
    """Training curves: losses (left) and the metrics (right) per epoch, stage changes marked."""
    fig = ReportFigure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_m = fig.subplots(1, 2)
    x = history["epoch"] if "epoch" in history else np.arange(len(history))
    loss_cols = [c for c in history.columns if c.endswith("loss")]
    metric_cols = [c for c in history.columns if c not in loss_cols and c not in ("epoch", "stage", "time")
                   and pd.api.types.is_numeric_dtype(history[c])]
    for ax, cols, ylabel in ((ax_loss, loss_cols, "loss"), (ax_m, metric_cols, "metric (valid)")):
        for c in cols:
            ax.plot(x, history[c], marker="o", ms=4, label=c)
        if ax is ax_m and cols and history[cols[-1]].notna().any():  # the monitored metric is the last column
            best = history[cols[-1]].idxmax()
            ax.plot(x[best], history[cols[-1]][best], "*", ms=14, c="gold", mec="black", label="best epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if cols:
            ax.legend(fontsize=8)
        if "stage" in history:
            changes = np.flatnonzero(history["stage"].to_numpy()[1:] != history["stage"].to_numpy()[:-1])
            for c in changes:
                ax.axvline(x.iloc[c] + 0.5 if hasattr(x, "iloc") else c + 0.5, color="gray", ls=":", lw=1)
        if len(x) < 15:
            ax.set_xticks(list(x))
    _title(fig, title or "training curves")
    return fig


def plot_members(table: pd.DataFrame, metric: str, title: str = "") -> Figure:
    """Horizontal bars of the ensemble's and its members' validation metric (plain and TTA), side by side."""
    n = len(table)
    fig = ReportFigure(figsize=(9, float(np.clip(0.45 * n + 1.8, 3, 20))), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    cols = [c for c in (metric, f"{metric}_tta") if c in table and table[c].notna().any()]
    h = 0.8 / max(1, len(cols))
    for k, c in enumerate(cols):
        vals = table[c].astype(float)
        bars = ax.barh(y + (k - (len(cols) - 1) / 2) * h, vals, height=h, label=c)
        ax.bar_label(bars, fmt="%.4f", fontsize=8, padding=2)
    ax.set_yticks(y, [short_label(v, 28) for v in table["label"]], fontsize=9)
    ax.invert_yaxis()
    lo = np.nanmin(table[cols].to_numpy(dtype=float)) if cols else 0
    ax.set_xlim(max(0.0, lo - 0.1), 1.04)
    ax.set_xlabel(metric)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _title(fig, title or "ensemble and members")
    return fig


def plot_sweep(table: pd.DataFrame, x: str, metric: str, groups: Sequence[str] = (), title: str = "",
               best_col: str = "best") -> Optional[ReportFigure]:
    """`metric` against the swept value `x`, one line per combination of `groups`, the best trial circled.

    Args:
        table: one row per trial (as `fastcls.sweep.sweep_table` gives it, or leaderboard rows); rows without a
            metric are skipped, rows sharing a point are averaged.
        x: the column on the x axis (numbers are placed by value, anything else by position).
        metric: the column on the y axis.
        groups: columns whose combinations get a line each (e.g. arch, size).
        title: the figure title.
        best_col: a column that is 'best' on the best trial's row (default: none marked when absent).

    Returns:
        The figure, or None when no trial has a metric yet.
    """
    df = table.dropna(subset=[metric])
    if not len(df):
        return None
    numeric = pd.api.types.is_numeric_dtype(df[x])
    cats = list(dict.fromkeys(df[x].astype(str))) if not numeric else None
    pos = (lambda s: s.astype(float)) if numeric else (lambda s: s.astype(str).map(cats.index))
    fig = ReportFigure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    groups = [g for g in groups if g in df and g != x]
    for key, g in (df.groupby(groups, sort=False) if groups else [((), df)]):
        g = g.assign(_x=pos(g[x])).groupby("_x", as_index=False)[metric].mean()
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={v}" for k, v in zip(groups, key)) or None
        ax.plot(g["_x"], g[metric], marker="o", label=label)
    best = df[df[best_col] == "best"] if best_col in df else df.iloc[:0]
    if len(best):
        where = ", ".join(f"{k}={best[k].iloc[0]}" for k in [*groups, x])
        ax.scatter(pos(best[x]), best[metric], s=220, facecolors="none", edgecolors="red", linewidths=2,
                   label=f"best: {where}, {metric} {best[metric].iloc[0]:.4f}", zorder=3)
    if not numeric:
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if groups or len(best):
        ax.legend(fontsize=8)
    _title(fig, title or f"{metric} against {x}")
    return fig


def sweep_plot(table: pd.DataFrame, x: str, metric: str, path, groups: Sequence[str] = (), title: str = "",
               best_col: str = "best") -> Optional[Path]:
    """`plot_sweep` written to the PNG `path` (atomically); None when no trial has a metric yet."""
    fig = plot_sweep(table, x, metric, groups, title, best_col)
    if fig is None:
        return None
    path = Path(path)
    write_atomic(path, lambda p: save_figure(fig, p))
    return path


# -- the run report ---------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What `write_report` wrote: the folder, the HTML page, every file by name, and notes on what was skipped."""

    folder: Path
    html: Path
    files: dict
    notes: list


def _member_refs(run) -> list:
    """The member run ids of an ensemble run, from its config or meta ('members': ids or dicts with an 'id')."""
    for src in (run.config, run.meta):
        members = src.get("members") if isinstance(src, dict) else None
        if members:
            return [m.get("id") if isinstance(m, dict) else m for m in members]
    return []


def _source_config(store, run) -> dict:
    """The config that says how to read a run's images: its own, or for an ensemble its first member's."""
    if run.config.get("layout") or run.config.get("data"):
        return run.config
    for ref in _member_refs(run):
        try:
            return store.load(ref).config
        except FastclsError:
            continue
    return run.config


def _valid_images(store, run, rows: np.ndarray, recipe_dirs=()) -> list:
    """The validation images at stored rows `rows`, through the recipe's crop and resize (what the network saw).

    Items are re-read from the data folder the run's config names and aligned by the stored item ids, so the images
    are those of the stored predictions even if the split, the sample or the file order changed since.
    """
    from ..data import ImageGetter, item_tfms, read_items
    cfg = _source_config(store, run)
    recipe = recipe_from_config(cfg, recipe_dirs=recipe_dirs)
    items = read_items(recipe)
    by_id = items.train.set_index("id", drop=False)
    get, tfms = ImageGetter(items.arrays), item_tfms(recipe)
    out = []
    for i in rows:
        item_id = run.valid_ids[int(i)]
        if item_id not in by_id.index:
            out.append(None)
            continue
        img = get(by_id.loc[item_id])
        for t in tfms:
            img = t(img, split_idx=1)
        out.append(np.asarray(img))
    return out


def _members_table(store, run) -> Optional[pd.DataFrame]:
    refs = _member_refs(run)
    if not refs:
        return None
    name = run.metrics.get("metric_name", "accuracy")
    rows = [{"label": f"ensemble {run.name}", "id": run.id, "arch": "(ensemble)",
             name: run.metrics.get(name), f"{name}_tta": run.metrics.get(f"{name}_tta")}]
    for ref in refs:
        try:
            m = store.load(ref)
        except FastclsError:
            rows.append({"label": f"{ref} (not in the store)", "id": ref})
            continue
        rows.append({"label": f"{m.name}", "id": m.id, "arch": m.config.get("arch"), name: m.metrics.get(name),
                     f"{name}_tta": m.metrics.get(f"{name}_tta")})
    return pd.DataFrame(rows)


def sweep_results(store, sweep_id: str) -> Optional[tuple]:
    """How to draw a sweep: (table, x, groups, metric), or None with fewer than two scored runs.

    A sweep of `fastcls sweep` is read from its record (`fastcls.sweep.sweep_table`, the best trial marked); runs
    only tagged with a sweep id (`fit_run(..., sweep=...)`) from the leaderboard, x being ps or size (what varies).
    """
    from ..metrics import get_metric
    from ..experiments.sweep import load_sweep, sweep_axes, sweep_table
    try:
        record = load_sweep(store.root, sweep_id)
    except FastclsError:
        record = None
    if record is not None and record["id"] == sweep_id:
        table, x, groups = sweep_axes(record, sweep_table(record, store))
        return (table, x, groups, record["metric"]) if table[record["metric"]].notna().sum() > 1 else None
    df = store.leaderboard(sweep=sweep_id)
    df = df[df["metric"].notna()].reset_index(drop=True)
    if len(df) < 2:
        return None
    name = str(df["metric_name"].iloc[0])
    x = next((c for c in ("ps", "size") if df[c].nunique() > 1), "ps")
    best = df["metric"].idxmax() if get_metric(name).higher_is_better else df["metric"].idxmin()
    df = df.rename(columns={"metric": name}).assign(best="")
    df.loc[best, "best"] = "best"
    return df, x, ["arch"] if df["arch"].nunique() > 1 else [], name


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}img{max-width:100%;border:1px solid #eee}.note{color:#a05a00}"""


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<p><a href="{html.escape(path.name)}">{html.escape(path.name)}</a></p>'
            f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')


def _html_table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="", border=0, escape=True)


def write_report(store, ref: str, out=None, top: int = 16, recipe_dirs=()) -> Report:
    """Write a run's report: confusion matrix (raw and normalised), per-class scores (CSV and chart), top losses,
    training curves, ensemble members or the sweep curve where they apply, and one self-contained `index.html`.

    Scores use the plain stored validation prediction (view 0): the confusion counts add up to exactly the stored
    predictions, and its accuracy is the run's stored metric.

    Args:
        store: the `RunStore`.
        ref: run id, unique id prefix or name; or a sweep id (then `write_sweep_report`).
        out: folder to write into (default: `<run folder>/report`).
        top: number of images in the top-losses grid (0: none).
        recipe_dirs: extra recipe folders, to find the run's recipe by name.

    Returns:
        A `Report` with every written file; `notes` says what was skipped and why (e.g. images no longer readable).
    """
    try:
        run = store.load(ref)
    except FastclsError as e:
        from ..experiments.sweep import load_sweep
        try:
            load_sweep(store.root, ref)
        except FastclsError:
            raise e from None
        return write_sweep_report(store, ref, out, top, recipe_dirs)
    folder = Path(out) if out is not None else run.path / "report"
    folder.mkdir(parents=True, exist_ok=True)
    vocab = [str(v) for v in run.vocab]
    probs = np.asarray(run.valid_probs[0])
    targets = np.asarray(run.valid_targets)
    files, notes, sections = {}, [], []
    label = f"{run.name} ({run.id})"

    def figure(key, fig, caption):
        files[key] = save_figure(fig, folder / f"{key}.png")
        sections.append(f"<h2>{html.escape(caption)}</h2>{_img_tag(files[key], caption)}")

    cm = confusion(targets, probs, vocab)
    cm.to_csv(folder / "confusion.csv")
    files["confusion_csv"] = folder / "confusion.csv"
    table = per_class(targets, probs, vocab)
    table.to_csv(folder / "per_class.csv", index=False)
    files["per_class_csv"] = folder / "per_class.csv"

    members = _members_table(store, run) if run.kind == "ensemble" or _member_refs(run) else None
    if members is not None:
        name = run.metrics.get("metric_name", "accuracy")
        members.to_csv(folder / "members.csv", index=False)
        files["members_csv"] = folder / "members.csv"
        figure("members", plot_members(members, name, f"{label}: ensemble and members, valid {name}"),
               "Ensemble members side by side")
        sections.append(_html_table(members) + '<p><a href="members.csv">members.csv</a></p>')

    figure("confusion", plot_confusion(cm, False, f"{label}: confusion matrix (counts, {len(targets)} valid items)"),
           "Confusion matrix (counts)")
    sections.append('<p><a href="confusion.csv">confusion.csv</a> (rows: true class, columns: predicted)</p>')
    figure("confusion_normalized", plot_confusion(cm, True, f"{label}: confusion matrix, rows normalised (recall)"),
           "Confusion matrix (rows normalised: recall)")
    figure("per_class", plot_per_class(table, f"{label}: per-class precision, recall, F1"),
           "Per-class precision, recall, F1")
    sections.append(_html_table(table) + '<p><a href="per_class.csv">per_class.csv</a></p>')

    if top > 0:
        worst = top_losses(targets, probs, top)
        try:
            images = _valid_images(store, run, worst["row"].to_numpy(), recipe_dirs)
        except FastclsError as e:
            notes.append(f"Top losses: the images could not be read back ({e}).")
        else:
            if all(i is None for i in images):
                notes.append("Top losses: none of the stored validation ids is in the data folder any more.")
            else:
                figure("top_losses", plot_top_losses(images, worst, vocab, f"{label}: top {len(worst)} losses "
                                                     "(red: misclassified)"),
                       "Top losses (validation)")
    if run.history is not None and len(run.history):
        figure("history", plot_history(run.history, f"{label}: training curves"), "Training curves")
    sweep = sweep_results(store, run.row["sweep"]) if run.row.get("sweep") else None
    if sweep is not None:
        table_, x, groups, name = sweep
        figure("sweep", plot_sweep(table_, x, name, groups, f"sweep {run.row['sweep']}: valid {name} against {x}"),
               f"The sweep this run belongs to ({run.row['sweep']})")

    metrics = pd.DataFrame([{k: v for k, v in run.metrics.items()}])
    cfg = run.config
    head = (f"<h1>fastcls report: {html.escape(label)}</h1><p>kind <b>{html.escape(str(run.kind))}</b>, recipe "
            f"<b>{html.escape(str(cfg.get('recipe')))}</b>, arch <b>{html.escape(str(cfg.get('arch')))}</b>, "
            f"size {html.escape(str(cfg.get('size')))}, ps {html.escape(str(cfg.get('ps')))}; scores of the plain "
            f"stored validation prediction ({len(targets)} items, {len(vocab)} classes).</p>"
            + _html_table(metrics)
            + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes))
    return Report(folder, _write_page(folder, label, head, sections), files, notes)


def _write_page(folder: Path, title: str, head: str, sections: list) -> Path:
    """`folder/index.html`, written under a temporary name and renamed."""
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{head}{''.join(sections)}</body></html>")
    write_atomic(folder / "index.html", lambda p: p.write_text(page, encoding="utf-8"))
    return folder / "index.html"


def write_sweep_report(store, ref: str, out=None, top: int = 16, recipe_dirs=()) -> Report:
    """Write a sweep's report: the metric curve, the results table, and the best trial's own report (linked).

    Args:
        store: the `RunStore`.
        ref: the sweep id (or a unique prefix), as `fastcls sweeps` lists it.
        out: folder to write into (default: `<runs>/sweeps/<id>/report`).
        top: images in the best trial's top-losses grid.
        recipe_dirs: extra recipe folders, to find the runs' recipe by name.

    Returns:
        A `Report`; `files['best']` is the best trial's `Report.html`.
    """
    from ..experiments.sweep import load_sweep, sweep_dir, sweep_table
    record = load_sweep(store.root, ref)
    folder = Path(out) if out is not None else sweep_dir(store.root, record["id"]) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    files, notes, sections = {}, [], []
    table = sweep_table(record, store)
    table.to_csv(folder / "results.csv", index=False)
    files["results_csv"] = folder / "results.csv"
    drawn = sweep_results(store, record["id"])
    if drawn is None:
        notes.append("Fewer than two trials have a metric yet: no curve.")
    else:
        t, x, groups, name = drawn
        files["sweep"] = save_figure(plot_sweep(t, x, name, groups, f"{record['recipe']} sweep {record['id']} "
                                                f"({record['mode']}): valid {name} against {x}"), folder / "sweep.png")
        sections.append(f"<h2>Valid {html.escape(name)} against {html.escape(x)}</h2>"
                        + _img_tag(files["sweep"], "sweep curve"))
    sections.append("<h2>Trials</h2>" + _html_table(table) + '<p><a href="results.csv">results.csv</a></p>')
    best = (record.get("best") or {}).get("run_id")
    if best:
        rep = write_report(store, best, top=top, recipe_dirs=recipe_dirs)
        files["best"] = rep.html
        link = Path(os.path.relpath(rep.html, folder)).as_posix()
        sections.append(f'<h2>Best trial</h2><p>{html.escape(record["best"]["key"])}: <a href="{html.escape(link)}">'
                        f"its report</a> (confusion matrix, per-class scores, top losses, curves).</p>")
    grid = ", ".join(f"{k} = {', '.join(map(str, v))}" for k, v in record["grid"].items())
    head = (f"<h1>fastcls sweep report: {html.escape(record['id'])}</h1><p>recipe <b>{html.escape(record['recipe'])}"
            f"</b>, archs <b>{html.escape(', '.join(record['archs']))}</b>, grid {html.escape(grid)}, mode "
            f"{html.escape(record['mode'])}, status {html.escape(record['status'])}.</p>"
            + "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes))
    return Report(folder, _write_page(folder, f"sweep {record['id']}", head, sections), files, notes)
