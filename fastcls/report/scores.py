"""Are the scores to be trusted: the reliability diagram and ECE of a run's valid probabilities (before and after its
temperature scaling), and local CV against the public leaderboard over every recorded submission (`cv_vs_lb`)."""

__all__ = ["reliability_table", "plot_reliability", "calibration_section", "CvLb", "cv_lb_table", "plot_cv_lb",
           "cv_vs_lb"]

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import FastclsError
from ..metrics import calibration_bins, score
from ..plots import ReportFigure, fit_title, save_figure
from ..submission import submissions_table


# -- calibration ------------------------------------------------------------------------------------------------------
def reliability_table(targets, probs, bins: int = 15) -> pd.DataFrame:
    """One row per confidence bin: its range, items, mean confidence and accuracy of the top class (empty bins: NaN),
    and `gap` = accuracy - confidence; the item-weighted mean |gap| is the ECE (`fastcls.metrics`)."""
    n, right, conf = calibration_bins(targets, probs, bins)
    edges = np.linspace(0, 1, bins + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc, mean_conf = right / n, conf / n
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "items": n, "confidence": mean_conf,
                         "accuracy": acc, "gap": acc - mean_conf})


def plot_reliability(tables: dict, title: str = "") -> ReportFigure:
    """Reliability diagram: accuracy against mean confidence per bin, one line per table (label -> (table, ECE)),
    the diagonal being perfect calibration; below, the items per bin."""
    fig = ReportFigure(figsize=(6.5, 6), layout="constrained")
    ax, ax_n = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], ls="--", c="gray", lw=1, label="perfect calibration")
    width = 1 / max(len(next(iter(tables.values()))[0]), 1)
    for k, (label, (table, ece)) in enumerate(tables.items()):
        seen = table["items"] > 0
        ax.plot(table["confidence"][seen], table["accuracy"][seen], marker="o", ms=4, label=f"{label} (ECE {ece:.4f})")
        ax_n.bar(table["low"] + width * (0.25 + 0.5 * k / max(len(tables), 1)), table["items"], width / 2 / len(tables),
                 label=label, align="edge")
    ax.set_ylabel("accuracy (top class)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax_n.set_xlabel("confidence (top-class probability)")
    ax_n.set_ylabel("items")
    ax_n.grid(alpha=0.3)
    fit_title(fig, title or "reliability diagram")
    return fig


# -- local CV against the public leaderboard ------------------------------------------------------------------------
@dataclass
class CvLb:
    """What `cv_vs_lb` found: one row per scored submission, the correlations, the figure, notes on what was left
    out."""

    table: pd.DataFrame
    metric: str
    pearson: float
    spearman: float
    figure: Path
    notes: list


def cv_lb_table(store_root) -> tuple:
    """The recorded submissions that have a local score and a public one, of the newest one's metric; returns
    (table with columns run, file, local, public, private, created; metric name; notes)."""
    df = submissions_table(store_root)
    df = df[df["local"].notna() & df["public"].notna()]
    if len(df) < 2:
        raise FastclsError(f"{len(df)} recorded submission(s) in {store_root} have both a local score and a public "
                           "leaderboard score; comparing local CV with the leaderboard needs at least 2. Record each "
                           "submission's score with `fastcls lb FILE --public SCORE`.")
    metric = df["metric_name"].iloc[-1]
    notes = []
    other = df[df["metric_name"] != metric]
    if len(other):
        notes.append(f"{len(other)} submission(s) scored locally by another metric "
                     f"({', '.join(sorted(map(str, other['metric_name'].unique())))}) are left out.")
        df = df[df["metric_name"] == metric]
        if len(df) < 2:
            raise FastclsError(f"Only {len(df)} recorded submission(s) scored by {metric} have a public score; "
                               "comparing needs at least 2.")
    df = df.assign(file=df["file"].map(lambda f: Path(f).name))
    return df[["run", "file", "local", "public", "private", "created"]].reset_index(drop=True), str(metric), notes


def plot_cv_lb(table: pd.DataFrame, metric: str, pearson: float, spearman: float, title: str = "") -> ReportFigure:
    """Local CV (x) against public LB (y), one point per submission labelled by its run, with a least-squares line."""
    fig = ReportFigure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    x, y = table["local"].astype(float), table["public"].astype(float)
    ax.scatter(x, y, s=30, zorder=3)
    for xi, yi, run in zip(x, y, table["run"]):
        ax.annotate(str(run)[-6:], (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if x.nunique() > 1:
        slope, icept = np.polyfit(x, y, 1)
        xs = np.linspace(x.min(), x.max(), 2)
        ax.plot(xs, slope * xs + icept, ls="--", c="gray", lw=1, label=f"fit: LB = {slope:.2f} CV + {icept:.3f}")
        ax.legend(fontsize=8)
    ax.set_xlabel(f"local CV ({metric})")
    ax.set_ylabel("public leaderboard")
    ax.grid(alpha=0.3)
    fit_title(fig, title or f"local CV vs public LB: Pearson {pearson:.3f}, Spearman {spearman:.3f} "
                            f"({len(table)} submissions)")
    return fig


def cv_vs_lb(store, out: Optional[Path] = None) -> CvLb:
    """Local CV against public LB over every recorded submission of `store` (`fastcls lb`): the table, Pearson and
    Spearman correlations and the figure (default `<store>/pictures/cv_vs_lb.png`).

    Raises FastclsError with fewer than 2 submissions that have both scores."""
    table, metric, notes = cv_lb_table(store.root)
    x, y = table["local"].astype(float), table["public"].astype(float)
    pearson, spearman = float(x.corr(y)), float(x.corr(y, method="spearman"))
    if x.nunique() < 2 or y.nunique() < 2:
        notes.append("The local or the public scores are all equal: the correlation is undefined (nan).")
    path = save_figure(plot_cv_lb(table, metric, pearson, spearman),
                       Path(out) if out is not None else store.root / "pictures" / "cv_vs_lb.png")
    return CvLb(table, metric, pearson, spearman, path, notes)


def calibration_section(run, folder: Path, label: str) -> tuple:
    """The report's calibration part for `run`: (figure, per-bin CSV path, ECE by view) of its stored valid
    prediction, and of the same before temperature scaling when the run was calibrated (`--calibrate`)."""
    from ..posthoc import PostHoc, apply_temperature
    probs, targets = np.asarray(run.valid_probs[0]), np.asarray(run.valid_targets)
    temperature = PostHoc.from_dict(run.meta.get("posthoc")).temperature
    views = {"stored" if temperature is None else f"calibrated (T={temperature:.3g})": probs}
    if temperature is not None:
        views = {"before temperature scaling": apply_temperature(probs, 1.0 / temperature), **views}
    tables = {k: (reliability_table(targets, p), score("ece", targets, p)) for k, p in views.items()}
    csv = folder / "reliability.csv"
    pd.concat({k: t for k, (t, _) in tables.items()}, names=["view", "bin"]).to_csv(csv)
    fig = plot_reliability(tables, f"{label}: reliability diagram (valid, top class)")
    return fig, csv, {k: e for k, (_, e) in tables.items()}
