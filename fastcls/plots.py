"""Figures without pyplot, shared by reports and sweeps: the PNG size (`DPI`), `ReportFigure`, `save_figure`, fitted
titles, and the sweep curve (`plot_sweep`, `sweep_plot`).

This module sits on the ground floor (matplotlib, pandas, numpy, `fastcls.runs`), so `fastcls.experiments.sweep` can
save its plot without importing `fastcls.report`, which reads sweeps.
"""

__all__ = ["DPI", "ReportFigure", "save_figure", "fit_title", "plot_sweep", "sweep_plot"]

import io
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .files import write_atomic

DPI = 100


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


def fit_title(fig: Figure, title: str, **kw):
    """The figure's title, fitted to its width: the font shrinks from 11 down to 7 pt, then the text wraps."""
    width_px = fig.get_figwidth() * DPI
    char_px = 0.6 * DPI / 72  # average character width per point of font size
    size = float(np.clip(0.95 * width_px / (max(1, len(title)) * char_px), 7, 11))
    fig.suptitle("\n".join(textwrap.wrap(title, max(20, int(0.95 * width_px / (size * char_px))))), fontsize=size, **kw)


def plot_sweep(table: pd.DataFrame, x: str, metric: str, groups: Sequence[str] = (), title: str = "",
               best_col: str = "best") -> Optional[ReportFigure]:
    """`metric` against the swept value `x`, one line per combination of `groups`, the best trial circled.

    Args:
        table: one row per trial (as `fastcls.experiments.sweep.sweep_table` gives it, or leaderboard rows); rows without a
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
    fit_title(fig, title or f"{metric} against {x}")
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
