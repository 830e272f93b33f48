"""Trials on Ray: a local Ray instance on loopback (started here, stopped at the end) runs a sweep whose runs equal
the local executor's, a failing trial is retried once and then reported, Ctrl-C cancels the trials still running and
leaves the finished ones stored; the run store imports a worker's run atomically and refuses foreign files."""

import _thread
import json
import signal
import sys
import threading
import time

import numpy as np
import pytest

from fastcls.errors import FastclsError
from fastcls.experiments.executors import LocalExecutor, RayExecutor, get_executor
from fastcls.runs import RunData, RunStore
from fastcls.experiments.sweep import LocalExecutor as SweepLocalExecutor

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

# 4 full-path trials (TINY: 16 px, 1 epoch on 200 digits)
SWEEP = ["sweep", "digits", "--arch", "simple_cnn", "--ps", "0,0.2,0.4,0.6", "--full", *TINY]
# the fast path: the driver extracts the features once, the workers train the heads (2 frozen epochs, 2 views)
FAST = ["sweep-dropout", "digits", "simple_cnn", "--ps", "0,0.5", "--epochs", "0", "--freeze-epochs", "2", "--size",
        "16", "--bs", "32", "--sample", "200", "--tta", "1", "--no-pretrained", "--quiet"]


@pytest.fixture(scope="module")
def local_ray():
    """A Ray instance of this machine on 127.0.0.1 with 2 CPUs, for this module only. SIGINT is handled by Python
    meanwhile, as in a terminal, also where the tests were started with it ignored (a background job, a
    pytest-xdist worker): else Ctrl-C (`_thread.interrupt_main`) does nothing here, and the Ray workers, which inherit
    the ignored signal, fail to cancel a task."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install fastcls[ray])")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGINT, before)


def _tiny_run(name: str) -> RunData:
    return RunData(config={"recipe": "t", "arch": "a"}, vocab=["a", "b"], valid_probs=np.full((1, 2, 2), 0.5),
                   valid_targets=np.array([0, 1]), valid_ids=["x", "y"],
                   metrics={"metric_name": "accuracy", "accuracy": 0.5}, name=name)


def test_a_sweep_on_ray_stores_the_runs_the_local_executor_stores(cli, local_ray, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    res = cli(*SWEEP, "--runs-dir", local)
    assert res.exit_code == 0, res.output
    res = cli(*SWEEP, "--runs-dir", remote, "--executor", "ray", "--cpus-per-trial", "1")
    assert res.exit_code == 0, res.output
    assert "4 trial(s) trained now" in res.stdout
    a, b = RunStore(local).leaderboard(sort="newest"), RunStore(remote).leaderboard(sort="newest")
    assert len(a) == len(b) == 4 and set(a["name"]) == set(b["name"]) and set(b["status"]) == {"done"}
    assert len(set(b["sweep"])) == 1 and b["sweep"].iloc[0] == a["sweep"].iloc[0]
    for name in a["name"]:
        ra, rb = RunStore(local).load(name), RunStore(remote).load(name)
        assert ra.config == rb.config
        assert rb.meta["imported_from"] and rb.meta["imported_from"] != rb.id and rb.path.name == rb.id
        assert rb.metrics["valid_loss"] == pytest.approx(ra.metrics["valid_loss"], abs=1e-4)
        assert rb.metrics["accuracy"] == pytest.approx(ra.metrics["accuracy"], abs=1e-6)
        np.testing.assert_allclose(rb.valid_probs, ra.valid_probs, atol=1e-4)
        np.testing.assert_allclose(rb.test_probs, ra.test_probs, atol=1e-4)
        assert rb.valid_ids == ra.valid_ids and list(rb.history.columns) == list(ra.history.columns)
        assert rb.weights_path.stat().st_size == ra.weights_path.stat().st_size
    rec = json.loads(next((remote / "sweeps").glob("*/sweep.json")).read_text())
    assert rec["status"] == "done" and {t["run_id"] for t in rec["trials"]} == set(b["id"])
    assert not list(remote.glob(".tmp-*")), "nothing half-written is left in the store"
    # running it again trains nothing: the imported runs are the sweep's
    res = cli(*SWEEP, "--runs-dir", remote, "--executor", "ray")
    assert res.exit_code == 0 and "0 trial(s) trained now, 4 already" in res.stdout


def test_a_fast_sweep_on_ray_trains_the_heads_on_the_drivers_features(cli, local_ray, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli(*FAST, "--runs-dir", local).exit_code == 0
    res = cli(*FAST, "--runs-dir", remote, "--executor", "ray")
    assert res.exit_code == 0, res.output
    assert len(list((remote / "cache" / "features").glob("*/meta.json"))) == 1, "features cached by the driver"
    a, b = RunStore(local), RunStore(remote)
    assert set(b.leaderboard()["kind"]) == {"fast"} and len(b.leaderboard()) == 2
    for name in a.leaderboard()["name"]:
        ra, rb = a.load(name), b.load(name)
        assert ra.config == rb.config
        np.testing.assert_allclose(rb.valid_probs, ra.valid_probs, atol=1e-4)


def test_folds_and_pseudo_label_on_ray_are_stored_by_the_driver(cli, local_ray, tmp_path):
    from fastcls.predict import run_tta_beta, tta_blend
    folds = ["train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "2"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    assert cli(*folds, "--runs-dir", local).exit_code == 0
    res = cli(*folds, "--runs-dir", remote, "--executor", "ray")
    assert res.exit_code == 0, res.output
    a, b = RunStore(local), RunStore(remote)
    cv_a, cv_b = (s.load(s.leaderboard(kind="cv")["id"].iloc[0]) for s in (a, b))
    assert cv_a.name == cv_b.name and cv_a.valid_ids == cv_b.valid_ids
    np.testing.assert_allclose(cv_b.valid_probs, cv_a.valid_probs, atol=1e-4)
    fold_runs = [b.load(r) for r in cv_b.config["fold_runs"]]
    assert all(r.meta["imported_from"] and r.row["parent"] == cv_b.id for r in fold_runs)
    # one noisy-student round of the cv run, trained on a Ray worker
    conf = tta_blend(cv_b.test_probs, run_tta_beta(cv_b.meta)).max(1)
    thr = float(np.quantile(conf, 0.5))
    res = cli("pseudo-label", cv_b.id, "--threshold", thr, "--runs-dir", remote, "--quiet", "--executor", "ray")
    assert res.exit_code == 0, res.output
    [student] = [b.load(i) for i in b.leaderboard(kind="pseudo")["id"]]
    assert student.meta["imported_from"] and student.meta["pseudo"]["pseudo"] == int((conf >= thr).sum())
    res = cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", remote, "--executor", "ray")
    assert res.exit_code == 2 and "add --folds K" in res.stderr


def test_a_failing_trial_is_retried_once_then_reported(local_ray, tmp_path):
    def fn(trial):
        with open(tmp_path / trial, "a") as f:  # one letter per attempt (the workers share this file system)
            f.write("x")
        if trial == "bad":
            raise FastclsError("trial 'bad' has unreadable data")
        return trial.upper()

    out = {t: (r, e) for t, r, e in RayExecutor(cpus_per_trial=1).map(fn, ["a", "bad", "c"])}
    assert out["a"] == ("A", None) and out["c"] == ("C", None)
    res, error = out["bad"]
    assert res is None and isinstance(error, FastclsError) and "unreadable data" in str(error)
    assert (tmp_path / "bad").read_text() == "xx", "tried twice"
    assert (tmp_path / "a").read_text() == "x" and (tmp_path / "c").read_text() == "x"


def test_ctrl_c_cancels_the_running_trials_and_keeps_the_finished_ones(local_ray, tmp_path):
    def fn(trial, store):
        from fastcls.train import RunResult
        end = time.time() + (300 if trial != "quick" else 0)
        while time.time() < end:  # Python steps between short waits, as in training: a cancel interrupts them
            time.sleep(0.01)
        return RunResult(store.save(_tiny_run(trial)), {}, None, None, 0.0)

    store = RunStore(tmp_path / "runs")
    ex = RayExecutor()
    results = ex.map(fn, ["quick", "slow1", "slow2"], store=store)
    trial, res, error = next(results)
    assert (trial, error) == ("quick", None) and store.load(res.run_id).name == "quick"
    threading.Timer(0.5, _thread.interrupt_main).start()  # Ctrl-C while the driver waits for the others
    with pytest.raises(KeyboardInterrupt):
        next(results)
    assert sorted(t for t, _ in ex.cancelled) == ["slow1", "slow2"]
    for _, ref in ex.cancelled:
        with pytest.raises(local_ray.exceptions.TaskCancelledError):
            local_ray.get(ref, timeout=60)
    assert list(store.leaderboard()["name"]) == ["quick"] and not list(store.root.glob(".tmp-*"))


def test_import_run_stores_a_copy_under_a_new_id_and_refuses_foreign_files(tmp_path):
    src, dst = RunStore(tmp_path / "worker"), RunStore(tmp_path / "driver")
    rid = src.save(_tiny_run("r1"))
    files = src.run_files(rid)
    assert "meta.json" in files and "valid_probs.npy" in files and not any(n.startswith(".") for n in files)
    new = dst.import_run(files)
    run = dst.load(new)
    assert new != rid and run.meta["imported_from"] == rid and run.name == "r1"
    np.testing.assert_array_equal(run.valid_probs, src.load(rid).valid_probs)
    for bad in ({**files, "../escape": b"x"}, {**files, ".lock": b""}, {**files, "": b"x"},
                {k: v for k, v in files.items() if k != "config.json"},
                {k: v for k, v in files.items() if k in ("meta.json", "config.json")}):  # no predictions
        with pytest.raises(FastclsError, match="nothing was stored"):
            dst.import_run(bad)
    assert len(dst.leaderboard()) == 1 and not (tmp_path / "escape").exists()


def test_executor_options_are_checked(cli, tmp_path, monkeypatch):
    assert SweepLocalExecutor is LocalExecutor
    res = cli(*SWEEP, "--runs-dir", tmp_path, "--address", "auto")
    assert res.exit_code == 2 and "only apply to --executor ray" in res.stderr
    res = cli(*SWEEP, "--runs-dir", tmp_path, "--executor", "dask")
    assert res.exit_code == 2 and "Unknown executor 'dask'" in res.stderr
    res = cli(*SWEEP, "--runs-dir", tmp_path, "--executor", "ray", "--cpus-per-trial", "0")
    assert res.exit_code == 2 and "--cpus-per-trial must be more than 0" in res.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(FastclsError, match=r"pip install fastcls\[ray\]"):
        list(get_executor("ray").map(str, [1]))
    assert not list(tmp_path.glob("*/sweep.json")) and not (tmp_path / "sweeps").exists()
