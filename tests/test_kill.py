"""kill -9 at any moment leaves the run store readable: real child processes are killed at named points.

Points: in a real `fastcls train` (mid-epoch, killed from outside; while its first checkpoint file is written),
and in a child that drives the store directly (fast) at every step of `save`, `begin` and `finish`. After each
kill the store must repair itself on first use: no temporary folder or file left, no run stuck 'running', every
indexed run loads fully, `fastcls runs` works, and an interrupted training run resumes to 'done'.
"""

import json
import signal

import pytest

from fastcls.train.checkpoint import read_checkpoint
from fastcls.runs import CHECKPOINT, RunStore

from . import _proc
from ._proc import CHILD, check_store, one_thread  # noqa: F401  (fixture; `wave`: conftest)

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
def test_kill_9_during_real_training_then_resume(wave, cli):
    """Real `fastcls train` processes: one killed from outside mid-epoch 2, one killed while writing its first
    checkpoint file (while other processes write the same store)."""
    root, res = wave
    for k in ("sigkill", "ckpt-kill"):
        assert res[k][0] == -signal.SIGKILL, res[k][2]
    statuses = check_store(root, cli)
    store = RunStore(root)
    killed = {k: store.resolve(k)["id"] for k in ("sigkill", "ckpt-kill")}
    assert {statuses[r] for r in killed.values()} == {"interrupted"}
    for k, rid in killed.items():
        meta = json.loads((root / rid / "meta.json").read_text())
        assert "killed or crashed" in meta["note"]
        ck = read_checkpoint(root / rid / CHECKPOINT)  # mid-epoch 2: epoch 1 saved; in the first write: none
        assert (ck["meta"]["epochs_done"] == 1) if k == "sigkill" else ck is None
        res_ = cli("resume", rid, "--runs-dir", root, "--quiet")
        assert res_.exit_code == 0, res_.output
        assert len(RunStore(root).load(rid).history) == 3
    check_store(root, cli)
