"""One run on several processes: `accelerate launch` starts 2 CPU processes (gloo) of `fastcls train --distributed`;
they train together through fastai's distributed trainer and exactly one run is stored, by rank 0."""

import os
import socket
import subprocess
import sys

import pytest

from fastcls.runs import RunStore

from .conftest import ROOT, TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_run_and_rank_0_stores_it(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install fastcls[distributed])")
    runs = tmp_path / "runs"
    # --multi_gpu is accelerate's torch.distributed launcher; without a GPU the processes use the CPU and gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           "-m", "fastcls", "train", "digits", "simple_cnn", *TINY, "--name", "ddp", "--runs-dir", str(runs),
           "--distributed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    store = RunStore(runs)
    board = store.leaderboard(status=None)
    assert len(board) == 1 and board["status"].iloc[0] == "done", board
    run = store.load("ddp")
    assert run.meta["processes"] == 2, "trained by both processes"
    assert run.metrics["n_train"] == 160 and run.valid_probs.shape == (2, 40, 10), "rank 0 predicts every item"
    assert run.history is not None and len(run.history) == 1
    assert sorted(p.name for p in runs.iterdir()) == sorted([run.id, "index.sqlite"]), "one run folder, no debris"
    assert proc.stdout.count(f"Run {run.id} stored") == 1, "only rank 0 prints"


def test_distributed_outside_a_launcher_is_refused(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    res = cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", tmp_path, "--distributed")
    assert res.exit_code == 2 and "accelerate launch --num_processes" in res.stderr
    assert not (tmp_path / "index.sqlite").exists()


@pytest.mark.parametrize("args", [["train", "digits", "simple_cnn", "--folds", "2"], ["resume", "x"],
                                  ["pseudo-label", "x"], ["distill", "x", "--arch", "simple_cnn"],
                                  ["ensemble", "x", "y"], ["sweep-dropout", "digits", "simple_cnn"]])
def test_only_one_plain_train_runs_under_a_launcher(cli, tmp_path, monkeypatch, args):
    """Anything else would run once per process: several copies in the store, or ranks out of step."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = cli(*args, "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "runs in one process" in res.stderr and "WORLD_SIZE=2" in res.stderr
    assert not (tmp_path / "runs").exists()
