"""Real child processes for the reliability tests: `python -m fastcls ...` or a small script, from this checkout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra) -> dict:
    """The environment of a child: this checkout first on the path, one torch thread, no model hub, no fault."""
    env = {k: v for k, v in os.environ.items() if k != "FASTCLS_FAULT"}
    # one thread: on a shared 2-core machine torch's default threads spin against each other (much slower)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(args, **env) -> subprocess.Popen:
    """Start `python -m fastcls ARGS` (or `python -c CODE` when args[0] == '-c')."""
    cmd = [sys.executable] + (list(args) if args[0] == "-c" else ["-m", "fastcls", *map(str, args)])
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_default_sigint if os.name == "posix" else None)


def _default_sigint():
    """Children take Ctrl-C as a terminal would deliver it, even when this test run was started in the background:
    a shell starts background jobs with SIGINT ignored, children inherit that, and Python then never raises
    KeyboardInterrupt (the SIGINT test would wait forever)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(args, timeout=300, **env) -> subprocess.CompletedProcess:
    p = start(args, **env)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wait_for_pause(p: subprocess.Popen, timeout=300) -> str:
    """Read the child's stderr until it reports a FASTCLS_FAULT pause; returns what it printed."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = p.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "FASTCLS_FAULT paused" in line:
            return "".join(seen)
    p.kill()
    raise AssertionError(f"the child never paused (exit {p.poll()}):\n{''.join(seen)}")


def signal_and_wait(p: subprocess.Popen, sig=signal.SIGTERM, timeout=120):
    p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in this process too: bitwise comparisons with the children need the same thread count, and
    on a shared 2-core machine two spinning threads are many times slower than one."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# a child that writes one synthetic run through the store: `save` (one step) or `begin` + `finish` (training path)
CHILD = """
import sys
import numpy as np, pandas as pd
from fastcls.runs import RunData, RunStore
store, mode = RunStore(sys.argv[1]), sys.argv[2]
weights = None
if "weights" in sys.argv:
    import torch
    weights = {"w": torch.arange(6.0)}
run = RunData(config={"recipe": "synthetic", "arch": "none"}, vocab=["a", "b"],
              valid_probs=np.full((1, 4, 2), 0.5, np.float32), valid_targets=np.array([0, 1, 0, 1]),
              valid_ids=list("abcd"), metrics={"metric_name": "accuracy", "accuracy": 0.5},
              history=pd.DataFrame({"epoch": [0]}), weights=weights)
if mode == "save":
    print(store.save(run))
else:
    rid = store.begin(run.config)
    print(store.finish(rid, run))
"""

# the same, saving N runs in a row (bulk writer)
SAVER = CHILD.replace('if mode == "save":\n    print(store.save(run))',
                      'if mode == "save":\n    for _ in range(int(sys.argv[3])):\n        print(store.save(run))')


def check_store(root, cli) -> dict:
    """Open the store as a user would next; assert it is whole. Returns {run id: status}."""
    import numpy as np
    from safetensors.torch import load_file

    from fastcls.train.checkpoint import read_checkpoint
    from fastcls.runs import CHECKPOINT, RunStore
    store = RunStore(root)
    board = store.leaderboard(status=None)  # the first use repairs
    assert not list(root.glob(".tmp-*")), "a temporary run folder was left behind"
    statuses = dict(zip(board["id"], board["status"]))
    for rid, status in statuses.items():
        path = root / rid
        assert path.is_dir(), f"run {rid} is indexed but has no folder"
        assert not list(path.glob(".*.tmp-*")), f"half-written file left in {rid}"
        assert status in ("done", "interrupted", "failed"), f"{rid} is stuck {status!r}"
        r = store.load(rid, any_status=True)
        assert r.config and r.meta["id"] == rid
        if status == "done":
            assert np.isfinite(np.asarray(r.valid_probs)).all() and len(r.valid_ids) == r.valid_probs.shape[1]
            assert r.metrics["metric_name"] and r.vocab and len(r.valid_targets) == len(r.valid_ids)
            if r.weights_path.exists():
                assert load_file(r.weights_path)
            assert not (path / CHECKPOINT).exists()
        elif (path / CHECKPOINT).exists():
            assert read_checkpoint(path / CHECKPOINT)["meta"]["epochs_done"] >= 1
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders == set(statuses), "every run folder must be indexed (or be debris that the repair removed)"
    res = cli("runs", "--runs-dir", root)
    assert res.exit_code == 0, res.output
    return statuses


# the run the signal and kill tests stop: 3 epochs on 200 digits at 16 px (test_interrupt's "plain" reference)
CLI3 = ["--seed", "3", "--sample", "200", "--size", "16", "--epochs", "3", "--freeze-epochs", "0", "--bs", "16",
        "--tta", "1", "--no-pretrained", "--quiet"]
N_SAVES = 40


@pytest.fixture(scope="session")
def wave(tmp_path_factory):
    """One wave of real child processes, all started at once on one fresh run store (so they also race to create
    its index): two bulk writers saving N_SAVES runs each, a training that finishes, and four trainings stopped
    mid-way: SIGTERM and SIGINT (Ctrl-C) mid-epoch 2, SIGKILL mid-epoch 2, and a self-SIGKILL while writing the
    first checkpoint. Five trainings write the store at once. One wave instead of one per test: each child pays
    the torch/fastai import.

    Returns (store root, {name: (exit status, stdout, stderr)}); trainings are named by their key.
    """
    from .conftest import TINY
    root = tmp_path_factory.mktemp("wave") / "runs"
    stopped = {"sigterm": ("batch-1-4:pause", signal.SIGTERM), "sigint": ("batch-1-4:pause", signal.SIGINT),
               "sigkill": ("batch-1-2:pause", signal.SIGKILL), "ckpt-kill": ("write-checkpoint.safetensors", None)}
    kids = {f"saver{i}": start(["-c", SAVER, root, "save", str(N_SAVES)]) for i in (1, 2)}
    kids["done"] = start(["train", "digits", "simple_cnn", *TINY, "--name", "done", "--runs-dir", root])
    kids.update({k: start(["train", "digits", "simple_cnn", *CLI3, "--name", k, "--runs-dir", root],
                          FASTCLS_FAULT=fault) for k, (fault, _) in stopped.items()})
    results = {}
    for k, (fault, sig) in stopped.items():
        if sig is not None:
            wait_for_pause(kids[k])
    for k, (fault, sig) in stopped.items():
        if sig is not None:
            kids[k].send_signal(sig)
    for k, p in kids.items():
        out, err = p.communicate(timeout=600)
        results[k] = (p.returncode, out, err)
    return root, results
