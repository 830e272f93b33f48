"""Figures of a run: confusion matrix, per-class scores, top losses, training curves, ensemble members; and the
image-grid helpers that the batch preview shares.

Every `plot_*` function returns a matplotlib `Figure` built without pyplot (no global state, any backend: a notebook
shows it inline, the CLI saves it as PNG). Figures have a fixed size in pixels (`DPI`) that grows with the number of
images or classes, and are saved without tight cropping, so their size is predictable.
"""

__all__ = ["PANEL_PX", "HEADER_PX", "short_label", "grid_shape", "grid_figure", "show_image", "confusion", "per_class",
           "confusion_figsize", "per_class_figsize", "plot_confusion", "plot_per_class", "top_losses",
           "plot_top_losses", "plot_history", "plot_members"]

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..plots import DPI, ReportFigure, fit_title

PANEL_PX = 200  # one image of a grid, in pixels (2 inches at DPI)
HEADER_PX = 70  # room for a grid's title (and the first row's captions)
_PANEL = PANEL_PX / DPI


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


def grid_figure(n: int, pairs: bool = False, title: str = "", hspace: float = 0.3) -> tuple[ReportFigure, list]:
    """A figure of `grid_shape(n, pairs)` blank panels under a `HEADER_PX` title; returns (figure, flat axes)."""
    rows, cols = grid_shape(n, pairs)
    fig = ReportFigure(figsize=(cols * _PANEL, rows * _PANEL + HEADER_PX / DPI))
    height_px = fig.get_figheight() * DPI
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - HEADER_PX / height_px, wspace=0.08,
                        hspace=hspace)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    if title:
        fit_title(fig, title, y=1 - 6 / height_px, va="top")
    return fig, list(axes)


def show_image(ax, img, title: str, color: str = "black"):
    """Draw `img` on `ax` without axes (grey when 2-D, pixels kept sharp when small) under a small `title`."""
    arr = np.asarray(img)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None, interpolation="nearest" if max(arr.shape[:2]) < 96 else
              "antialiased")
    ax.set_title(title, fontsize=8, color=color)
    ax.axis("off")


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
    fit_title(fig, title or ("confusion matrix, rows normalised (recall)" if normalize
                             else "confusion matrix (counts)"))
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
    fit_title(fig, title or "per-class precision, recall, F1")
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
    fig, axes = grid_figure(len(table), title=title or "top losses", hspace=0.42)
    for ax, img, (_, r) in zip(axes, images, table.iterrows()):
        if img is None:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center", fontsize=8, transform=ax.transAxes)
        else:
            show_image(ax, img, "")
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
    fit_title(fig, title or "training curves")
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
    fit_title(fig, title or "ensemble and members")
    return fig
