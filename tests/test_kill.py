"""kill -9 at any moment leaves the run store readable: real child processes are killed at named points.

Points: in a real `fastcls train` (mid-epoch, killed from outside; while its first checkpoint file is written),
and in a child that drives the store directly (fast) at every step of `save`, `begin` and `finish`. After each
kill the store must repair itself on first use: no temporary folder or file left, no run stuck 'running', every
indexed run loads fully, `fastcls runs` works, and an interrupted training run resumes to 'done'.
"""

import json
import signal

import numpy as np
import pytest
from safetensors.torch import load_file

from fastcls.checkpoint import read_checkpoint
from fastcls.runs import CHECKPOINT, RunStore

from . import _proc
from ._proc import one_thread  # noqa: F401  (fixture)
from .conftest import TINY

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


def check_store(root, cli) -> dict:
    """Open the store as a user would next; assert it is whole. Returns {run id: status}."""
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


@pytest.mark.parametrize("mode, point, expect", [
    ("save", "create-tmp", set()),                  # folder complete under its temporary name: removed
    ("save", "create-renamed", {"done"}),        # folder in place, no index row yet: indexed
    ("begin", "write-meta.json", set()),            # half-written meta.json inside the temporary folder
    ("begin", "create-renamed", {"interrupted"}),
    ("begin", "write-metrics.json", {"interrupted"}),  # finish: half-written result file
    ("begin", "finish-files", {"interrupted"}),  # finish: every result file written, status not yet 'done'
    ("begin", "finish-meta", {"done"}),          # finish: meta.json says done, the index row not yet updated
    ("begin", "write-model.safetensors", {"interrupted"}),
])
def test_kill_9_inside_the_store(tmp_path, cli, mode, point, expect):
    root = tmp_path / "runs"
    res = _proc.run(["-c", CHILD, root, mode] + (["weights"] if "model" in point else []), timeout=120,
                    FASTCLS_FAULT=point)
    assert res.returncode == -signal.SIGKILL, (res.returncode, res.stderr)
    assert set(check_store(root, cli).values()) == expect
    ok = _proc.run(["-c", CHILD, root, mode], timeout=120)  # the store keeps working for the next writer
    assert ok.returncode == 0, ok.stderr
    assert list(check_store(root, cli).values()).count("done") == (1 + ("done" in expect))


@pytest.mark.usefixtures("one_thread")
def test_kill_9_during_real_training_then_resume(tmp_path, cli):
    """A real `fastcls train` killed from outside mid-epoch 2, and another killed while writing its checkpoint."""
    root = tmp_path / "runs"
    args = ["train", "digits", "simple_cnn", *TINY, "--epochs", "2", "--runs-dir", root]
    p = _proc.start(args, FASTCLS_FAULT="batch-1-2:pause")
    q = _proc.start(args, FASTCLS_FAULT="write-checkpoint.safetensors")  # at the same time: both write one store
    _proc.wait_for_pause(p)
    code, _, _ = _proc.signal_and_wait(p, signal.SIGKILL)
    assert code == -signal.SIGKILL
    _, err = q.communicate(timeout=300)
    assert q.returncode == -signal.SIGKILL, err
    statuses = check_store(root, cli)
    assert sorted(statuses.values()) == ["interrupted", "interrupted"]
    for rid in statuses:
        meta = json.loads((root / rid / "meta.json").read_text())
        assert "killed or crashed" in meta["note"]
        res = cli("resume", rid, "--runs-dir", root, "--quiet")
        assert res.exit_code == 0, res.output
    statuses = check_store(root, cli)
    assert sorted(statuses.values()) == ["done", "done"]
    assert all(len(RunStore(root).load(r).history) == 2 for r in statuses)
