"""CLI commands about scores: the runs table (`fastcls runs`, `--export mlflow`), reports (`fastcls report`,
`--cv-lb`) and leaderboard bookkeeping (`fastcls lb`); `fastcls.cli` registers them on its app."""

__all__ = ["lb_cmd", "lb_columns", "runs_cmd", "report_cmd"]

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from .cli_options import RecipeDirs, RunsDir
from .cli_table import err, out, table as _table
from .errors import FastclsError


def lb_columns(df) -> list:
    """The leaderboard score columns a runs table has (`fastcls.submission.with_lb_scores`)."""
    return [c for c in ("public", "private") if c in df]


def lb_cmd(target: Annotated[str, typer.Argument(help="A submission CSV written from this store, or a run (id, prefix "
                                                 "or name: its newest submission).")],
           public: Annotated[Optional[float], typer.Option("--public", help="Public leaderboard score.")] = None,
           private: Annotated[Optional[float], typer.Option("--private", help="Private leaderboard score.")] = None,
           runs_dir: RunsDir = Path("runs")):
    """Record a submission's leaderboard scores against the run that wrote it (`fastcls runs` shows them)."""
    from .runs import RunStore
    from .tracking import lb_scores
    rec = lb_scores(RunStore(runs_dir), target, public, private)  # and to the run's MLflow run when it is tracked
    out.print(f"Run {rec['run']}: local {rec['metric_name']} {rec['local']}, public {rec['public']}, "
              f"private {rec['private']} ({Path(rec['file']).name}, sha256 {rec['sha256'][:12]})"
              + (f"; logged to MLflow run {rec['mlflow_run']}" if rec.get("mlflow_run") else ""), highlight=False)


def runs_cmd(recipe: Annotated[Optional[str], typer.Option("--recipe", help="Only runs of this recipe.")] = None,
             sort: Annotated[str, typer.Option("--sort", help="'metric' (best first) or 'newest'.")] = "metric",
             export: Annotated[Optional[str], typer.Option("--export", help="'mlflow': log every finished run to "
                                                           "MLflow instead of listing ($FASTCLS_MLFLOW_URI, default "
                                                           "sqlite:///mlruns.db beside the runs folder); runs already "
                                                           "there are not logged twice.")] = None,
             runs_dir: RunsDir = Path("runs")):
    """The leaderboard: one line per stored run, best (or newest) first."""
    from .runs import RunStore
    from .submission import with_lb_scores
    from .tracking import export_runs
    if export is not None:
        res = export_runs(RunStore(runs_dir), export)
        return out.print(f"MLflow ({res['uri']}): {res['logged']} run(s) logged now, {res['already']} already there.",
                         highlight=False)
    if sort not in ("metric", "newest"):
        raise FastclsError(f"--sort must be 'metric' or 'newest', got {sort!r}.")
    df = with_lb_scores(runs_dir, RunStore(runs_dir).leaderboard(recipe=recipe, sort=sort, status=None))
    if not len(df):
        return out.print(f"No runs in {runs_dir}" + (f" for recipe {recipe!r}" if recipe else "") + ".")
    df = df.assign(time=df["seconds"].round(1))[["id", "name", "kind", "status", "recipe", "arch", "size", "ps",
                                                  "metric_name", "metric", "valid_loss", "time", *lb_columns(df)]]
    out.print(_table(df, title=f"Runs in {runs_dir}"))


def report_cmd(run: Annotated[Optional[str], typer.Argument(help="Run id, unique id prefix, or run name; or a sweep "
                                                            "id (not with --cv-lb).")] = None,
               top: Annotated[int, typer.Option("--top", help="Images in the top-losses grid (0: none).")] = 16,
               out_dir: Annotated[Optional[Path], typer.Option("--out", help="Folder to write into (default: "
                                                           "<run folder>/report); with --cv-lb the PNG file (default: "
                                                           "<runs-dir>/pictures/cv_vs_lb.png).")] = None,
               cv_lb: Annotated[bool, typer.Option("--cv-lb", help="Instead of a run's report: local CV against public "
                                                   "LB over every recorded submission (`fastcls lb`), with their "
                                                   "Pearson and Spearman correlations.")] = False,
               runs_dir: RunsDir = Path("runs"), recipes: RecipeDirs = None):
    """Write a run's report: confusion matrices, per-class scores, reliability diagram and ECE, top losses, curves,
    and one HTML page.

    RUN may also be a sweep id: the sweep's curve and table, plus the best trial's report.
    """
    from .runs import RunStore
    from .report import cv_vs_lb, write_report
    if cv_lb == (run is not None):
        raise FastclsError("Give a RUN to report on, or --cv-lb (without a run) for local CV against the leaderboard.")
    rep = cv_vs_lb(RunStore(runs_dir), out_dir) if cv_lb else \
        write_report(RunStore(runs_dir), run, out=out_dir, top=top, recipe_dirs=recipes or ())
    for note in rep.notes:
        err.print(f"[yellow]Note:[/] {escape(note)}", highlight=False, markup=True)
    if cv_lb:
        out.print(_table(rep.table, title=f"Local CV ({rep.metric}) vs public LB: Pearson {rep.pearson:.4f}, "
                         f"Spearman {rep.spearman:.4f} over {len(rep.table)} submissions"))
        return out.print(f"Figure: {rep.figure}", highlight=False)
    for key, path in rep.files.items():
        out.print(f"{key:22s} {path}", highlight=False)
    out.print(f"[bold]Report:[/] {escape(str(rep.html))}", highlight=False, markup=True)
