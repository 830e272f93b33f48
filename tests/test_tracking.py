"""Tracking in MLflow (`--track mlflow`, `fastcls runs --export mlflow`), read back with MLflow's own client from a
local sqlite store in tmp_path: params, per-epoch and final metrics, tags, nesting (cv folds, sweep trials),
leaderboard scores and report figures; a second export adds nothing; bad input is one clear error."""

import sys

import numpy as np
import pandas as pd
import pytest

from fastcls.config import RunConfig
from fastcls.recipe import Recipe
from fastcls.runs import RunData, RunStore

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(store, sweep=None, name=None):
    """A finished 3-class run stored without training (two epochs of history)."""
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    hist = pd.DataFrame({"epoch": [0, 1], "train_loss": [1.0, 0.5], "valid_loss": [0.9, 0.6], "accuracy": [0.5, 0.7]})
    return store.save(RunData(config=RunConfig(Recipe(name="toy"), "simple_cnn").to_dict(), vocab=["a", "b", "c"],
                              valid_probs=p[None], valid_targets=np.array([0, 1, 2]), valid_ids=["x", "y", "z"],
                              metrics={"metric_name": "accuracy", "accuracy": 1.0, "map@3": 1.0}, history=hist,
                              test_probs=p[None], test_ids=["x", "y", "z"], sweep=sweep, name=name))


def _by_fastcls_id(client):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.data.tags.get("fastcls.run_id") or r.data.tags.get("fastcls.sweep_id"): r for r in runs}


def test_track_train_folds_lb_report_and_export(cli, tmp_path, monkeypatch):
    MlflowClient = pytest.importorskip("mlflow.tracking", reason="mlflow (the dev extra) is not installed").MlflowClient
    monkeypatch.delenv("FASTCLS_MLFLOW_URI", raising=False)
    runs = tmp_path / "runs"
    res = cli("train", "digits", "simple_cnn", *TINY, "--folds", "2", "--track", "mlflow", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mlruns.db").is_file()  # the default: beside the runs folder
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    store = RunStore(runs)
    cv = store.load(store.leaderboard(kind="cv")["id"].iloc[0])
    logged = _by_fastcls_id(client)
    assert set(logged) == {cv.id, *cv.config["fold_runs"]}
    top = logged[cv.id]
    assert top.data.tags["fastcls.kind"] == "cv" and top.data.params["arch"] == "simple_cnn"
    assert top.data.params["size"] == "16" and top.data.params["folds"] == "2"
    name = cv.metrics["metric_name"]
    assert top.data.metrics[name] == pytest.approx(cv.metrics[name])
    for fold in cv.config["fold_runs"]:  # folds nested under their cv run, with their per-epoch history
        f = logged[fold]
        assert f.data.tags["mlflow.parentRunId"] == top.info.run_id
        hist = client.get_metric_history(f.info.run_id, "epoch/valid_loss")
        assert [m.step for m in hist] == [0] and hist[0].value == pytest.approx(store.load(fold).history["valid_loss"][0])
    assert store.load(cv.id).meta["mlflow"]["run_id"] == top.info.run_id

    # a leaderboard score recorded later reaches the tracked run; so do the report's figures
    assert cli("submit", cv.id, "--out", tmp_path / "s.csv", "--runs-dir", runs).exit_code == 0
    res = cli("lb", tmp_path / "s.csv", "--public", "0.912", "--runs-dir", runs)
    assert res.exit_code == 0 and top.info.run_id in res.stdout, res.output
    assert client.get_run(top.info.run_id).data.metrics["lb/public"] == 0.912
    assert cli("report", cv.id, "--top", "0", "--runs-dir", runs).exit_code == 0
    assert "report/reliability.png" in [a.path for a in client.list_artifacts(top.info.run_id, "report")]

    # back-fill: the untracked runs are logged once, the tracked ones not again
    plain = _toy(store)
    res = cli("runs", "--export", "mlflow", "--runs-dir", runs)
    assert res.exit_code == 0 and "1 run(s) logged now, 3 already there" in res.stdout, res.output
    res = cli("runs", "--export", "mlflow", "--runs-dir", runs)
    assert "0 run(s) logged now, 4 already there" in res.stdout, res.output
    logged = _by_fastcls_id(client)
    assert len(logged) == 4 and logged[plain].data.metrics["map_3"] == 1.0
    assert len(client.get_metric_history(top.info.run_id, "lb/public")) == 1  # not logged twice


def test_sweep_trials_nest_under_one_parent(tmp_path, monkeypatch):
    MlflowClient = pytest.importorskip("mlflow.tracking", reason="mlflow (the dev extra) is not installed").MlflowClient
    from fastcls.tracking import tracked
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("FASTCLS_MLFLOW_URI", uri)
    store = RunStore(tmp_path / "runs")
    with tracked("mlflow"):
        a, b = _toy(store, sweep="sw1", name="t1"), _toy(store, sweep="sw1", name="t2")
    untracked = _toy(store)  # after the block: not logged
    logged = _by_fastcls_id(MlflowClient(uri))
    assert set(logged) == {"sw1", a, b} and untracked not in logged
    assert logged[a].data.tags["mlflow.parentRunId"] == logged["sw1"].info.run_id == \
        logged[b].data.tags["mlflow.parentRunId"]
    assert [m.value for m in MlflowClient(uri).get_metric_history(logged[a].info.run_id, "epoch/accuracy")] == [0.5, 0.7]


def test_track_bad_input_is_one_clear_error(cli, tmp_path, monkeypatch):
    res = cli("train", "digits", "simple_cnn", *TINY, "--track", "wandb", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "Unknown tracker 'wandb'" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("2*"))  # nothing trained
    for cmd in (["sweep", "digits", "--arch", "simple_cnn"], ["sweep-dropout", "digits", "simple_cnn"]):
        res = cli(*cmd, "--ps", "0.1,0.2", "--track", "wandb", "--runs-dir", tmp_path / "runs")
        assert res.exit_code == 2 and "Unknown tracker 'wandb'" in res.stderr, res.output
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    res = cli("train", "digits", "simple_cnn", *TINY, "--track", "mlflow", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "pip install 'fastcls[mlflow]'" in res.stderr
    res = cli("runs", "--export", "mlflow", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "pip install 'fastcls[mlflow]'" in res.stderr


def test_tracking_failures_warn_and_leave_the_store_as_is(cli, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow (the dev extra) is not installed")
    from fastcls.submission import submission_for_run, submissions_table
    from fastcls.tracking import tracked
    monkeypatch.setenv("FASTCLS_MLFLOW_URI", "sqlite:////proc/no-such-dir/mlruns.db")  # cannot be created
    store = RunStore(tmp_path / "runs")
    with tracked("mlflow"), pytest.warns(UserWarning, match="is stored, but logging it to MLflow"):
        rid = _toy(store)
    assert store.load(rid).metrics["accuracy"] == 1.0 and "mlflow" not in store.load(rid).meta
    store.set_status(rid, "done", mlflow={"uri": "sqlite:////proc/no-such-dir/mlruns.db", "run_id": "0" * 32})
    submission_for_run(store.load(rid), tmp_path / "s.csv", beta=None)
    with pytest.warns(UserWarning, match="Could not log leaderboard scores"):
        res = cli("lb", tmp_path / "s.csv", "--public", "0.5", "--runs-dir", store.root)
    assert res.exit_code == 0 and "public 0.5" in res.stdout and "MLflow" not in res.stdout, res.output
    assert submissions_table(store.root)["public"].tolist() == [0.5]
