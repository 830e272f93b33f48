"""Concurrent writers: real processes writing one run store at the same time lose no index row and share no id."""

import numpy as np

from fastcls.runs import RunData, RunStore

from . import _proc
from .conftest import TINY
from .test_kill import CHILD, check_store

SAVER = CHILD.replace('if mode == "save":\n    print(store.save(run))',
                      'if mode == "save":\n    for _ in range(int(sys.argv[3])):\n        print(store.save(run))')


def test_two_trainings_and_two_bulk_writers_on_one_fresh_store(tmp_path, cli):
    """Two real `fastcls train` processes and two processes saving 40 runs each, all started together on a store
    that does not exist yet (so they also race to create the index)."""
    root = tmp_path / "runs"
    n = 40
    savers = [_proc.start(["-c", SAVER, root, mode, str(n)]) for mode in ("save", "save")]
    trainers = [_proc.start(["train", "digits", "simple_cnn", *TINY, "--seed", str(s), "--name", f"t{s}", "--runs-dir",
                             root]) for s in (1, 2)]
    ids = []
    for p in savers + trainers:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        if p in savers:
            ids += out.split()
    assert len(ids) == 2 * n and len(set(ids)) == 2 * n, "every save returns its own id"
    statuses = check_store(root, cli)
    assert len(statuses) == 2 * n + 2 and set(statuses.values()) == {"done"}
    assert set(ids) <= set(statuses)
    assert {RunStore(root).load(f"t{s}").name for s in (1, 2)} == {"t1", "t2"}


def test_an_id_drawn_twice_is_redrawn(tmp_path, monkeypatch):
    """Ids carry 6 random hex digits; should two writers still draw the same one, the second folder rename fails
    and that writer draws again instead of overwriting the first run."""
    import fastcls.runs as runs
    draws = iter(["20990101-000000-aaaaaa", "20990101-000000-aaaaaa", "20990101-000000-bbbbbb"])
    monkeypatch.setattr(runs, "new_run_id", lambda: next(draws))
    store = RunStore(tmp_path)
    run = RunData(config={"recipe": "r"}, vocab=["a", "b"], valid_probs=np.full((1, 2, 2), 0.5, np.float32),
                  valid_targets=np.array([0, 1]), valid_ids=["x", "y"], metrics={"metric_name": "m", "m": 1.0})
    assert store.save(run) == "20990101-000000-aaaaaa"
    assert store.save(run) == "20990101-000000-bbbbbb"
    assert len(store.leaderboard()) == 2 and not list(tmp_path.glob(".tmp-*"))
