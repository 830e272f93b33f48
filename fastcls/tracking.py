"""Tracking in MLflow: each stored run's config, per-epoch and final metrics, figures and leaderboard scores.

fastcls' own run store stays the source of truth; MLflow gets a copy. Two ways in:

- `tracked("mlflow")` (the CLI's `--track mlflow` on train, sweep and `train --folds`): while it is open, every run
  this process stores is logged right after it is stored (`fastcls.runs.AFTER_STORE`), sweep trials nested under
  one parent MLflow run per sweep, a cv run's folds nested under it.
- `export_store(store)` (`fastcls runs --export mlflow`): back-fills every finished run of a store; idempotent,
  because each MLflow run carries the tag `fastcls.run_id` and a run already there is not logged again.

Where: `$FASTCLS_MLFLOW_URI`, else `sqlite:///<the run store's parent folder>/mlruns.db` (artifacts beside it in
`mlartifacts/`). A logged run's meta.json records its MLflow run (`mlflow`), so `fastcls lb` and `fastcls report`
add its leaderboard scores and report figures later. mlflow is imported only when tracking is used.
"""

__all__ = ["TRACKERS", "tracked", "mlflow_uri", "log_stored_run", "export_runs", "export_store", "lb_scores", "log_report"]

import json
import logging
import math
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import FastclsError
from .runs import AFTER_STORE
from .submission import record_lb, submissions_table

TRACKERS = ("mlflow",)
RUN_TAG = "fastcls.run_id"
SWEEP_TAG = "fastcls.sweep_id"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for nested runs
_MAX_PARAM = 500  # characters of a parameter value MLflow accepts on every backend


def _mlflow():
    """The mlflow module, or a FastclsError saying how to install it."""
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise FastclsError("Tracking in MLflow needs the mlflow package, which is not installed: "
                           "pip install 'fastcls[mlflow]' (or pip install mlflow).") from None
    for name in ("mlflow", "alembic"):  # the first use of a sqlite store prints its schema migrations
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


def mlflow_uri(store_root) -> str:
    """The tracking URI: `$FASTCLS_MLFLOW_URI`, else a sqlite file `mlruns.db` beside the run store folder."""
    env = os.environ.get("FASTCLS_MLFLOW_URI")
    if env:
        return env
    return "sqlite:///" + (Path(store_root).resolve().parent / "mlruns.db").as_posix()


@contextmanager
def tracked(kind: Optional[str]):
    """Log every run this process stores while the block runs to `kind` (None or 'none': no tracking).

    Raises FastclsError before anything trains for an unknown tracker or a missing mlflow package."""
    if kind is None or kind == "none":
        yield
        return
    if kind not in TRACKERS:
        raise FastclsError(f"Unknown tracker {kind!r} for --track; known: {', '.join(TRACKERS)} (or none).")
    _mlflow()
    AFTER_STORE.append(_after_store)
    try:
        yield
    finally:
        AFTER_STORE.remove(_after_store)


def _after_store(store, rid: str):
    """The store's hook: log run `rid` now; a tracking failure warns (the run itself is stored and safe)."""
    if int(os.environ.get("RANK", "0") or 0) != 0:  # a distributed run's other ranks store into a scratch store
        return
    try:
        log_stored_run(store, rid)
    except Exception as e:  # noqa: BLE001  (MLflow's errors are many; none may undo a stored run)
        warnings.warn(f"Run {rid} is stored, but logging it to MLflow ({mlflow_uri(store.root)}) failed: {e}. "
                      f"`fastcls runs --export mlflow --runs-dir {store.root}` logs it later.", stacklevel=2)


# -- one run --------------------------------------------------------------------------------------------------------

def _client(store, client=None):
    return client or _mlflow()(tracking_uri=mlflow_uri(store.root))


def _find(client, tag: str, value: str) -> Optional[str]:
    """The MLflow run id carrying tag `tag` = `value` in any experiment, or None."""
    exps = [e.experiment_id for e in client.search_experiments()]
    hits = client.search_runs(exps, filter_string=f"tags.`{tag}` = '{value}'", max_results=1) if exps else []
    return hits[0].info.run_id if hits else None


def _experiment(client, name: str, uri: str) -> str:
    """The id of the MLflow experiment `name`, created (artifacts beside a local sqlite file) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if str(uri).startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def _key(name) -> str:
    """A metric name as MLflow accepts it (`map@3` -> `map_3`)."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", str(name))


def _number(v) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _params(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        out[_key(k)] = text if len(text) <= _MAX_PARAM else text[:_MAX_PARAM - 3] + "..."
    return out


def _metrics(run) -> list:
    """(key, value, step) of every per-epoch history value (`epoch/<column>`, step = row) and final metric."""
    rows = []
    hist = run.history
    if hist is not None:
        for step, rec in enumerate(hist.to_dict(orient="records")):
            rows += [(f"epoch/{_key(k)}", _number(v), step) for k, v in rec.items() if k != "epoch"]
    rows += [(_key(k), _number(v), 0) for k, v in run.metrics.items()]
    return [r for r in rows if r[1] is not None]


def _figures(run) -> list:
    """The figures of a run folder and of its report folder (`fastcls report`), as (file, artifact folder)."""
    return [(p, None) for p in sorted(run.path.glob("*.png"))] + \
           [(p, "report") for p in sorted((run.path / "report").glob("*.png"))]


def _lb_values(store, rid: str) -> dict:
    """{'lb/public': x, 'lb/private': y} from the run's newest recorded submission that has them."""
    out = {}
    table = submissions_table(store.root)
    for _, rec in table[table["run"] == rid].iterrows():
        for k in ("public", "private"):
            if rec[k] is not None and not (isinstance(rec[k], float) and math.isnan(rec[k])):
                out[f"lb/{k}"] = float(rec[k])
    return out


def _sync_lb(client, mid: str, values: dict):
    """Log leaderboard scores that differ from the MLflow run's latest (a repeated export adds nothing)."""
    have = client.get_run(mid).data.metrics
    for k, v in values.items():
        if have.get(k) != v:
            client.log_metric(mid, k, v, step=len(client.get_metric_history(mid, k)))


def _sweep_parent(client, exp: str, sweep: str) -> str:
    mid = _find(client, SWEEP_TAG, sweep)
    if mid is None:
        mid = client.create_run(exp, run_name=f"sweep {sweep}",
                                tags={SWEEP_TAG: sweep, "fastcls.kind": "sweep"}).info.run_id
        client.set_terminated(mid)
    return mid


def log_stored_run(store, rid: str, client=None) -> tuple:
    """Log the finished run `rid` of `store` to MLflow, unless a run tagged with its id is there already.

    Logged: the config as params, the history per epoch (`epoch/<column>`, step = epoch row), the final metrics
    (names made MLflow-safe: `map@3` -> `map_3`), the run folder's figures and its report's as artifacts, its
    leaderboard scores (`lb/public`, `lb/private`); tags `fastcls.run_id`, `fastcls.kind`, `fastcls.store`. A sweep
    trial is nested under its sweep's parent run, a fold under its cv run. A writable store's meta.json records the
    MLflow run (`mlflow`: uri, run_id).

    Returns:
        (MLflow run id, whether it was logged now).
    """
    from mlflow.entities import Metric, Param
    client = _client(store, client)
    run = store.load(rid)
    mid = _find(client, RUN_TAG, run.id)
    created = mid is None
    if created:
        exp = _experiment(client, str(run.config.get("recipe") or "fastcls"), mlflow_uri(store.root))
        tags = {RUN_TAG: run.id, "fastcls.kind": str(run.kind), "fastcls.store": str(store.root.resolve())}
        if run.row.get("sweep"):
            tags[PARENT_TAG] = _sweep_parent(client, exp, run.row["sweep"])
            tags[SWEEP_TAG + ".member"] = run.row["sweep"]
        elif run.meta.get("parent"):
            tags[PARENT_TAG] = log_stored_run(store, run.meta["parent"], client)[0]
        mid = client.create_run(exp, run_name=run.name, tags=tags).info.run_id
        params = [Param(k, v) for k, v in _params(run.config).items()]
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, s) for k, v, s in _metrics(run)]
        for i in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
            client.log_batch(mid, metrics=metrics[i:i + 100], params=params[i:i + 100])
        for path, folder in _figures(run):
            client.log_artifact(mid, str(path), folder)
        client.set_terminated(mid)
        for fold in run.config.get("fold_runs") or []:  # folds logged before their cv run existed: nest them now
            fid = _find(client, RUN_TAG, fold) if fold else None
            if fid is not None:
                client.set_tag(fid, PARENT_TAG, mid)
    _sync_lb(client, mid, _lb_values(store, run.id))
    if store.writable() and run.meta.get("mlflow", {}).get("run_id") != mid:
        store.set_status(run.id, run.status, mlflow={"uri": mlflow_uri(store.root), "run_id": mid})
    return mid, created


def export_runs(store, kind: str) -> dict:
    """`fastcls runs --export KIND`: `export_store` after checking the tracker's name and that mlflow is installed."""
    if kind not in TRACKERS:
        raise FastclsError(f"Unknown tracker {kind!r} for --export; known: {', '.join(TRACKERS)}.")
    return export_store(store)


def export_store(store, client=None) -> dict:
    """Back-fill MLflow with every finished run of `store` (oldest first); returns counts: logged, already there."""
    client = _client(store, client)
    runs = store.leaderboard(sort="newest")["id"].tolist()[::-1]
    logged = sum(log_stored_run(store, rid, client)[1] for rid in runs)
    return {"logged": logged, "already": len(runs) - logged, "uri": mlflow_uri(store.root)}


# -- later additions to a tracked run --------------------------------------------------------------------------------

def _to_tracked_run(run, what: str, log) -> Optional[str]:
    """`log(client, mlflow_run_id)` when `run` was logged before (its meta.json's `mlflow`); returns that id, or None
    when the run is not tracked or logging failed (a warning: what fastcls stored stands)."""
    info = run.meta.get("mlflow") or {}
    if not info.get("run_id"):
        return None
    try:
        log(_mlflow()(tracking_uri=info["uri"]), info["run_id"])
    except Exception as e:  # noqa: BLE001  (a server that is down must not fail a recorded score or a report)
        warnings.warn(f"Could not log {what} of run {run.id} to MLflow ({info['uri']}): {e}", stacklevel=3)
        return None
    return info["run_id"]


def lb_scores(store, target: str, public: Optional[float] = None, private: Optional[float] = None) -> dict:
    """`fastcls.submission.record_lb`, then the scores logged to the run's MLflow run when it is tracked
    (`mlflow_run` in the returned record)."""
    rec = record_lb(store, target, public, private)
    try:
        run = store.load(rec["run"])
    except FastclsError:  # the score is recorded; a run that cannot be read is not tracked now
        return rec
    mid = _to_tracked_run(run, "leaderboard scores", lambda c, m: _sync_lb(c, m, _lb_values(store, run.id)))
    return {**rec, **({"mlflow_run": mid} if mid else {})}


def log_report(run, files: dict):
    """Log a written report's figures to the run's MLflow run when it is tracked (artifact folder `report`)."""
    def log(client, mid):
        for path in files.values():
            if Path(path).suffix == ".png":
                client.log_artifact(mid, str(path), "report")
    _to_tracked_run(run, "the report's figures", log)
