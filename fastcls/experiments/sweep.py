"""Dropout and grid sweeps: every trial is a normal run in the store, tagged with the sweep's id.

A sweep's id is a hash of what defines it (the resolved recipe, archs, grid, seed, data, sample, weights, mode), so
the same command gives the same id and running it again resumes: trials already in the store are not retrained,
an interrupted full-path trial continues from its last finished epoch (`fastcls.train.resume_run`), an interrupted
fast-path trial starts again (the store never holds half a run). The sweep's own record lives in
`<runs>/sweeps/<id>/`: `sweep.json` (grid, options, trials and their status; rewritten atomically), `results.csv`
and a plot of the metric against the swept value.

Two ways to train a trial: the full path (`fastcls.train.fit_run`, a normal run) and the fast path
(`fastcls.features`: the head alone, for the frozen stage's epochs, on cached body features). Every value of the
grid is validated before anything trains, and head dropout is checked to really fire for every ps.
"""

__all__ = ["SweepPlan", "SweepResult", "parse_values", "plan_sweep",
           "check_dropout", "run_sweep", "sweep_dir", "load_sweep", "list_sweeps", "sweep_table", "sweep_axes"]

import hashlib
import itertools
import json
import time
import typing
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd

from ..archs import build_body, check_size, make_head
from ..errors import FastclsError, RunInterrupted, suggest
from .executors import LocalExecutor, Trial
from ..metrics import get_metric
from ..recipe import Recipe
from ..files import write_json
from ..config import RunConfig
from ..train import schedule

SWEEPS = "sweeps"
FEATURES = "features"  # the store's cache of body features (`RunStore.cache_dir`)


# -- the plan ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepPlan:
    """A validated sweep: its id, the grid, the mode ('fast' or 'full') and one trial per grid point."""

    id: str
    base: RunConfig
    archs: tuple
    grid: dict
    mode: str
    views: int
    trials: tuple
    spec: dict = field(repr=False)

    @property
    def varied(self) -> list:
        """The parameters that take more than one value (arch first), for tables and plots."""
        out = ["arch"] if len(self.archs) > 1 else []
        return out + [k for k, v in self.grid.items() if len(v) > 1]


def _field_type(key: str):
    hints = typing.get_type_hints(Recipe)
    if key not in hints:
        raise FastclsError(f"Recipes have no setting {key!r} to sweep.{suggest(key, hints)}")
    tp = hints[key]
    if typing.get_origin(tp) is typing.Union:  # Optional[float] -> float
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def parse_values(key: str, text: str) -> tuple:
    """Comma-separated grid values of recipe setting `key` (e.g. '0.1,0.2'), typed like the setting.

    Raises:
        FastclsError: a value that is not a number where one is needed, an empty value, or a repeated one.
    """
    tp = _field_type(key)
    opt = "--" + key.replace("_", "-")
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            raise FastclsError(f"{opt} {text!r} has an empty value; give comma-separated values, e.g. {opt} 1,2.")
        try:
            out.append(int(part) if tp is int else float(part) if tp is float else part)
        except ValueError:
            want = "a whole number" if tp is int else "a number"
            raise FastclsError(f"{opt}: {part!r} is not {want} (in {opt} {text}). Give comma-separated values, "
                               f"e.g. {opt} {'32,64' if tp is int else '0.1,0.2'}.") from None
    return tuple(out)


def _canon(v):
    return float(v) if isinstance(v, float) else v


def plan_sweep(base: RunConfig, archs: Optional[Iterable[str]] = None, grid: Optional[dict] = None,
               fast: Optional[bool] = None, views: Optional[int] = None) -> SweepPlan:
    """Validate a sweep and expand it into trials, before anything trains.

    Args:
        base: the run config every trial starts from (recipe with the user's overrides, seed, data, sample, weights).
        archs: architectures to sweep (default: `base.arch`).
        grid: recipe setting -> values (e.g. {'ps': (0.1, 0.2), 'size': (64, 128)}); every combination is a trial.
        fast: train only the head on cached body features for the frozen stage (default: when the recipe has no
            unfrozen epochs, or for a ps-only sweep of a pretrained body). With unfrozen epochs the fast path still
            trains the frozen stage only (then fine-tune the best ps with `fastcls train ... --ps BEST`).
        views: augmented views of the training set cached for the fast path (default: one per frozen epoch).

    Returns:
        The plan: deterministic sweep id, trials with validated configs.

    Raises:
        FastclsError: naming the first bad value (unknown setting or arch, a value of the wrong type or out of
            range, an image size too small for an arch, a trial that would train nothing).
    """
    archs = tuple(dict.fromkeys(archs or (base.arch,)))
    grid = {k: tuple(_canon(v) for v in vals) for k, vals in (grid or {}).items()}
    for k, vals in grid.items():
        _field_type(k)
        if not vals:
            raise FastclsError(f"The sweep gives no values for {k!r}.")
        dup = [v for v in vals if vals.count(v) > 1]
        if dup:
            raise FastclsError(f"The sweep lists {k}={dup[0]!r} twice; give each value once.")
    recipe = base.recipe
    if fast is None:  # a pretrained body's ps sweep: the frozen stage on cached features, then fine-tune the best ps
        fast = recipe.epochs == 0 or (base.pretrained_body and recipe.freeze_epochs > 0 and set(grid or {}) <= {"ps"})
    fast = bool(fast)
    mode = "fast" if fast else "full"
    views = views if views is not None else max(1, recipe.freeze_epochs)
    if views < 1:
        raise FastclsError(f"--views must be at least 1, got {views}.")
    points = []
    for arch in archs:
        for combo in itertools.product(*grid.values()):
            params = dict(zip(grid, combo))
            r = recipe.override(**params)  # type and range checks, with the recipe's own messages
            check_size(arch, r.size)
            cfg = replace(base, arch=arch, recipe=r)
            if fast and r.freeze_epochs < 1:
                raise FastclsError(f"The fast path trains the head for the frozen stage, but {_point(arch, params)} "
                                   "has --freeze-epochs 0. Set --freeze-epochs N (N > 0), or sweep with --full.")
            if fast and r.epochs:
                cfg = replace(cfg, recipe=r.override(epochs=0))  # the fast path trains the frozen stage only
            if not fast and not schedule(cfg):
                raise FastclsError(f"Trial {_point(arch, params)} would train nothing: --epochs is 0 and there is no "
                                   "frozen stage (it needs --pretrained or --weights and --freeze-epochs > 0). Use "
                                   "--fast to train the head on a frozen body, or set --epochs.")
            points.append((arch, params, cfg))
    if len(points) < 2 and not grid:
        raise FastclsError("Nothing to sweep: give several values of --ps, --size, --lr or --crop, or several --arch.")
    spec = {"recipe": recipe.id_dict(), "archs": list(archs), "grid": {k: list(v) for k, v in grid.items()},
            "data": base.data, "seed": base.seed, "sample": base.sample, "weights": base.weights, "mode": mode,
            "views": views if fast else None}
    sid = "sw-" + hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]
    trials = tuple(Trial(i, _point(arch, params), {"arch": arch, **params}, replace(cfg, name=f"{sid}-t{i:02d}"))
                   for i, (arch, params, cfg) in enumerate(points))
    return SweepPlan(sid, base, archs, grid, mode, views, trials, spec)


def _point(arch: str, params: dict) -> str:
    return " ".join([f"arch={arch}"] + [f"{k}={v}" for k, v in params.items()])


# -- checks before training ----------------------------------------------------------------------------------------
def check_dropout(arch: str, nf: int, n_out: int, ps_values: Iterable[float]):
    """Check that the head of `arch` really applies dropout `ps`: in train mode two passes over the same batch
    must differ when ps > 0 and agree when ps = 0.

    Raises:
        FastclsError: naming the arch and the ps value that would have no effect (or whose randomness is not ps's).
    """
    import torch
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = torch.randn(64, nf, 2, 2)
        for ps in dict.fromkeys(float(p) for p in ps_values):
            head = make_head(arch, nf, n_out, ps).train()
            with torch.no_grad():
                a, b = head(x), head(x)
            differs = not torch.allclose(a, b)
            if ps > 0 and not differs:
                raise FastclsError(f"Head dropout ps={ps} would have no effect for {arch}: in train mode its head "
                                   "gives identical outputs on two passes, so its dropout never fires. A ps sweep of "
                                   "this arch would compare identical models; fix the arch's head (ArchSpec.head) or "
                                   "sweep another arch.")
            if ps == 0 and differs:
                raise FastclsError(f"The head of {arch} is random in train mode with ps=0: its dropout does not follow "
                                   "ps, so a ps sweep would not measure what it says. Fix the arch's head "
                                   "(ArchSpec.head) or sweep another arch.")


def _preflight(plan: SweepPlan, n_out: int):
    """Build each arch's body once (this loads its weights, so a missing file fails now) and check its dropout."""
    for arch in plan.archs:
        trials = [t for t in plan.trials if t.params["arch"] == arch]
        body = build_body(arch, plan.base.recipe.pretrained, plan.base.weights)
        check_dropout(arch, body.num_features, n_out, [t.cfg.recipe.ps for t in trials])


# -- the sweep record ----------------------------------------------------------------------------------------------
def sweep_dir(root, sweep_id: str) -> Path:
    """The folder of sweep `sweep_id` in the run store at `root`."""
    return Path(root) / SWEEPS / sweep_id


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_record(plan: SweepPlan) -> dict:
    r = plan.base.recipe
    return {"id": plan.id, "recipe": r.name, "mode": plan.mode, "views": plan.views if plan.mode == "fast" else None,
            "archs": list(plan.archs), "grid": {k: list(v) for k, v in plan.grid.items()}, "varied": plan.varied,
            "metric": r.metric, "seed": plan.base.seed, "data": plan.base.data, "sample": plan.base.sample,
            "weights": plan.base.weights, "base": plan.base.to_dict(), "created": _now(), "updated": _now(),
            "status": "running", "features": {},
            "trials": [{"index": t.index, "key": t.key, "params": t.params, "name": t.cfg.name, "status": "pending",
                        "run_id": None, "error": None} for t in plan.trials]}


@dataclass
class SweepResult:
    """What `run_sweep` returns: the record (as in sweep.json), the results table and the files written."""

    record: dict
    table: pd.DataFrame
    folder: Path
    plot: Optional[Path]
    trained: int  # trials trained by this call (the others were already in the store)


def run_sweep(plan: SweepPlan, store, progress: str = "auto", executor=None, items=None) -> SweepResult:
    """Run (or resume) a sweep: check every arch's head dropout, train the trials not yet in the store, then write
    the results table, the plot and the record.

    Args:
        plan: from `plan_sweep`.
        store: the `RunStore`; trials are stored as runs tagged with `plan.id`.
        progress: see `fastcls.train.train`.
        executor: runs the trials (default `LocalExecutor()`; see `fastcls.executors`).
        items: already-read items (default: read from the recipe's data).

    Returns:
        A `SweepResult`. Trials that failed are marked 'failed' in it (with the error); Ctrl-C marks the running
        trial 'interrupted', saves the record and re-raises.
    """
    from .. import data as fdata
    from .features import cached_features, data_fingerprint, feature_key, fit_head_run
    from ..train import fit_run, prepare, resume_run
    base = plan.base
    items = prepare(base, items, store).items  # read and checked once, for both paths
    # what the recipe leaves to the data (an image size None), filled in and checked before anything trains
    trials = [replace(t, cfg=replace(t.cfg, recipe=fdata.resolve_recipe(t.cfg.recipe, items))) for t in plan.trials]
    for t in trials:
        check_size(t.params["arch"], t.cfg.recipe.size)
    _preflight(plan, len(items.vocab))
    folder = sweep_dir(store.root, plan.id)  # sweeps live beside the runs, at the store's root
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.json"
    record = _new_record(plan)
    if path.is_file():
        old = json.loads(path.read_text())
        record["created"], record["features"] = old.get("created", record["created"]), old.get("features", {})
    stored = {row["name"]: row["id"] for _, row in store.leaderboard(sweep=plan.id, sort="newest").iterrows()}
    stopped = {row["name"]: row["id"] for _, row in store.leaderboard(sweep=plan.id, sort="newest",
                                                                      status="interrupted").iterrows()}
    for t in record["trials"]:
        if t["name"] in stored:
            t.update(status="done", run_id=stored[t["name"]])
    write_json(path, record)
    features, keys = {}, {}
    executor = executor or LocalExecutor()
    remote = getattr(executor, "remote", False)

    def load_features(trial: Trial):
        """The trial's feature set: computed once (or read from the store's cache), one set in memory at a time
        here; every set the trials need when they run elsewhere (they are shipped to the workers with `work`)."""
        key = keys[trial.index]
        if key not in features:
            t0 = time.time()
            fs, body = cached_features(trial.cfg, items, plan.views, store.cache_dir(FEATURES), progress, key)
            if not remote:
                features.clear()  # trials are grouped by feature set
            features[key] = (fs, body)
            record["features"][key] = {"cached": fs.from_cache, "seconds": round(time.time() - t0, 2),
                                       "extract_seconds": round(fs.seconds, 2)}
        return features[key]

    resumable = {} if remote else stopped  # a worker's private store holds no checkpoint: those trials start again

    def start(trial: Trial):
        rec = record["trials"][trial.index]
        rec.update(status="running", error=None, started=_now())
        record["updated"] = _now()
        write_json(path, record)
        if progress != "none":
            print(f"[{plan.id}] trial {trial.index + 1}/{len(plan.trials)}: {trial.key}", flush=True)

    def work(trial: Trial, into):
        """Train one trial into the store `into` (the real one, or a remote worker's private one)."""
        if plan.mode == "full":
            if trial.cfg.name in resumable:  # Ctrl-C'd earlier: continue from its checkpoint
                return resume_run(into, resumable[trial.cfg.name], progress, items=items)
            return fit_run(trial.cfg, into, progress, items=items, sweep=plan.id)
        fs, body = load_features(trial)
        return fit_head_run(trial.cfg, into, fs, body, progress, sweep=plan.id)

    todo = [t for t in trials if record["trials"][t.index]["status"] != "done"]
    trained = 0
    if plan.mode == "fast":  # trials sharing features run together, so each feature set is read once
        fingerprint = data_fingerprint(items)
        keys = {t.index: feature_key(t.cfg, items, plan.views, fingerprint) for t in todo}
        first = {k: i for i, k in reversed(list(enumerate(keys.values())))}
        todo.sort(key=lambda t: first[keys[t.index]])
        if remote:
            for t in todo:
                load_features(t)
    results = executor.map(work, todo, store=store, on_start=start)
    try:
        for trial, res, error in results:
            rec = record["trials"][trial.index]
            if error is None:
                rec.update(status="done", run_id=res.run_id, error=None)
                trained += 1
            else:
                msg = str(error) if isinstance(error, FastclsError) else f"{type(error).__name__}: {error}"
                rec.update(status="failed", error=msg)
            record["updated"] = _now()
            write_json(path, record)
    except BaseException as e:  # Ctrl-C (a kill -9 skips this; the next run then ignores the stale 'running' mark)
        getattr(results, "close", lambda: None)()  # a cluster executor cancels the trials still running
        for rec in record["trials"]:
            if rec["status"] == "running":
                rec["status"] = "interrupted"
        record.update(status="interrupted", updated=_now())
        write_json(path, record)
        if isinstance(e, KeyboardInterrupt):
            where = ("unfinished trials start again (their checkpoints were on the workers)" if remote else
                     "the interrupted one continues from its last finished epoch (full path) or starts again "
                     "(fast path)")
            raise RunInterrupted(f"Sweep {plan.id} interrupted. Run the same command again to resume: finished "
                                 f"trials are kept, {where}.", None) from e
        raise
    failed = [r for r in record["trials"] if r["status"] == "failed"]
    record["status"] = "failed" if failed else "done"
    table = sweep_table(record, store)
    table.to_csv(folder / "results.csv", index=False)
    plot = _plot(record, table, folder)
    record.update(best=_best(record, table), results="results.csv", plot=plot.name if plot else None, updated=_now())
    write_json(path, record)
    return SweepResult(record, table, folder, plot, trained)


# -- reading sweeps back -----------------------------------------------------------------------------------------------
def load_run_or_sweep(store, ref: str, any_status: bool = False) -> tuple:
    """What `ref` names in the store: ``(StoredRun, None)`` for a run (id, id prefix or name), else
    ``(None, sweep record)`` for a sweep id; a FastclsError saying neither was found otherwise."""
    try:
        return store.load(ref, any_status=any_status), None
    except FastclsError as e:
        try:
            return None, load_sweep(store.root, ref)
        except FastclsError:
            raise FastclsError(f"{e} No sweep {ref!r} either (list them with `fastcls sweeps`).") from None


def load_sweep(root, ref: str) -> dict:
    """The record of the sweep `ref` names (its id or a unique id prefix) in the run store at `root`."""
    base = Path(root) / SWEEPS
    ids = sorted(p.name for p in base.iterdir() if (p / "sweep.json").is_file()) if base.is_dir() else []
    hits = [i for i in ids if i == ref] or [i for i in ids if i.startswith(str(ref))]
    if not hits:
        raise FastclsError(f"No sweep {ref!r} in {root}. List the sweeps with `fastcls sweeps`.")
    if len(hits) > 1:
        raise FastclsError(f"{ref!r} matches {len(hits)} sweeps in {root}: {', '.join(hits[:8])}. Use the full id.")
    return json.loads((base / hits[0] / "sweep.json").read_text())


def list_sweeps(root) -> pd.DataFrame:
    """One row per sweep in the run store at `root`, newest first: id, recipe, mode, grid, progress, best trial."""
    base = Path(root) / SWEEPS
    rows = []
    for p in sorted(base.glob("*/sweep.json")) if base.is_dir() else []:
        rec = json.loads(p.read_text())
        done = [t for t in rec["trials"] if t["status"] == "done"]
        best = rec.get("best")
        rows.append({"id": rec["id"], "recipe": rec["recipe"], "mode": rec["mode"], "archs": ",".join(rec["archs"]),
                     "grid": " ".join(f"{k}={','.join(map(str, v))}" for k, v in rec["grid"].items()),
                     "trials": f"{len(done)}/{len(rec['trials'])}", "status": rec["status"],
                     "best": best["key"] if best else "", "metric": best["metric"] if best else None,
                     "metric_name": rec["metric"], "updated": rec["updated"]})
    df = pd.DataFrame(rows, columns=["id", "recipe", "mode", "archs", "grid", "trials", "status", "best",
                                     "metric_name", "metric", "updated"])
    return df.sort_values("updated", ascending=False, kind="stable").reset_index(drop=True)


def sweep_table(record: dict, store) -> pd.DataFrame:
    """The sweep's results, one row per trial: swept values, the metric, valid loss, time, run id, status, best.

    Metrics come from the run store, so the table is the same whether the trial ran now or in an earlier call.
    """
    metric = get_metric(record["metric"])
    runs = store.leaderboard(sweep=record["id"], sort="newest")
    by_id = {row["id"]: row for _, row in runs.iterrows()}
    cols = list(dict.fromkeys(["arch", *record["grid"]]))
    rows = []
    for t in record["trials"]:
        run = by_id.get(t["run_id"]) if t["run_id"] else None
        rows.append({"trial": t["index"], **{c: t["params"].get(c) for c in cols},
                     record["metric"]: None if run is None else run["metric"],
                     "valid_loss": None if run is None else run["valid_loss"],
                     "time": None if run is None else run["seconds"], "run": t["run_id"] or "", "status": t["status"],
                     "best": ""})
    df = pd.DataFrame(rows)
    done = df[df["status"] == "done"].dropna(subset=[record["metric"]])
    if len(done):
        order = done.sort_values([record["metric"], "valid_loss"], ascending=[not metric.higher_is_better, True],
                                 kind="stable")
        df.loc[order.index[0], "best"] = "best"
    return df


def _best(record: dict, table: pd.DataFrame) -> Optional[dict]:
    rows = table[table["best"] == "best"]
    if not len(rows):
        return None
    i = int(rows["trial"].iloc[0])
    return {"trial": i, "key": record["trials"][i]["key"], "run_id": record["trials"][i]["run_id"],
            "metric": float(rows[record["metric"]].iloc[0])}


def sweep_axes(record: dict, table: pd.DataFrame) -> tuple[pd.DataFrame, str, list]:
    """How to draw a sweep: the table (with the x column), x (ps when swept, else the first swept setting), and
    the columns whose combinations get a line each (the other swept values)."""
    varied = record.get("varied") or []
    grid_varied = [k for k in varied if k != "arch"]
    x = "ps" if "ps" in grid_varied else (grid_varied[0] if grid_varied else ("arch" if "arch" in varied else "ps"))
    if x not in table:
        table = table.assign(**{x: [t["params"].get(x) for t in record["trials"]]})
    return table, x, [k for k in varied if k != x]


def _plot(record: dict, table: pd.DataFrame, folder: Path) -> Optional[Path]:
    """metric vs the swept value (ps when swept), one line per combination of the other swept values."""
    from ..plots import sweep_plot
    table, x, groups = sweep_axes(record, table)
    title = f"{record['recipe']} sweep {record['id']} ({record['mode']})"
    return sweep_plot(table, x, record["metric"], folder / f"{record['metric']}_vs_{x}.png", groups=groups,
                      title=title)
