"""One self-contained HTML page per run (`write_report`) or sweep (`write_sweep_report`), with its figures as PNGs
and its tables as CSVs next to it."""

__all__ = ["Report", "sweep_results", "write_report", "write_sweep_report"]

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from ..errors import FastclsError
from ..metrics import get_metric
from ..plots import plot_sweep, save_figure
from ..config import RunConfig
from ..files import write_atomic
from ..tracking import log_report
from .plots import (confusion, per_class, plot_confusion, plot_history, plot_members, plot_per_class, plot_top_losses,
                    top_losses)
from .scores import calibration_section

# fastcls.data and fastcls.experiments.sweep are imported inside the functions that need them: they load torch and
# fastai, and `import fastcls.report` (figures in a notebook, the CLI's --help) stays without them.


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
    rc = RunConfig.from_dict(cfg, recipe_dirs, lenient=True)
    recipe = rc.recipe
    items = read_items(recipe, rc.data)
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

    A sweep of `fastcls sweep` is read from its record (`fastcls.experiments.sweep.sweep_table`, the best trial marked); runs
    only tagged with a sweep id (`fit_run(..., sweep=...)`) from the leaderboard, x being ps or size (what varies).
    """
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
    from ..experiments.sweep import load_run_or_sweep
    run, sweep = load_run_or_sweep(store, ref)
    if sweep is not None:
        return write_sweep_report(store, ref, out, top, recipe_dirs)
    for part in ("config", "meta", "metrics", "vocab", "valid_ids", "valid_probs", "valid_targets", "history"):
        getattr(run, part)  # every file read (and checked) before anything is written: no half report
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
    fig, files["reliability_csv"], ece = calibration_section(run, folder, label)
    figure("reliability", fig, "Reliability diagram (valid): " + ", ".join(f"ECE {k} {v:.4f}" for k, v in ece.items()))
    sections.append('<p><a href="reliability.csv">reliability.csv</a> (per confidence bin: items, mean confidence, '
                    'accuracy)</p>')

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
    report = Report(folder, _write_page(folder, label, head, sections), files, notes)
    log_report(run, files)  # to its MLflow run when the run is tracked (fastcls.tracking)
    return report


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
