"""matplotlib figures, written to PNG files without a display (matplotlib's `Figure`, no pyplot state)."""

__all__ = ["sweep_plot"]

from pathlib import Path
from typing import Optional, Sequence

import pandas as pd


def sweep_plot(table: pd.DataFrame, x: str, metric: str, path, groups: Sequence[str] = (), title: str = "",
               best_col: str = "best") -> Optional[Path]:
    """Plot `metric` against the swept value `x`, one line per combination of `groups`, the best trial circled.

    Args:
        table: one row per trial (as `fastcls.sweep.sweep_table` gives it); rows without a metric are skipped.
        x: the column on the x axis (numbers are placed by value, anything else by position).
        metric: the column on the y axis.
        path: the PNG file to write.
        groups: columns whose combinations get a line each (e.g. arch, size).
        title: the figure title.
        best_col: a column that is 'best' on the best trial's row.

    Returns:
        The PNG's path, or None when no trial has a metric yet.
    """
    from matplotlib.figure import Figure
    df = table.dropna(subset=[metric])
    if not len(df):
        return None
    numeric = pd.api.types.is_numeric_dtype(df[x])
    cats = list(dict.fromkeys(df[x].astype(str))) if not numeric else None
    pos = (lambda s: s.astype(float)) if numeric else (lambda s: s.astype(str).map(cats.index))
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    groups = [g for g in groups if g in df and g != x]
    for key, g in (df.groupby(groups, sort=False) if groups else [((), df)]):
        g = g.assign(_x=pos(g[x])).sort_values("_x")
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
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    return path
