"""Concurrent writers: real processes writing one run store at the same time lose no index row and share no id."""

import numpy as np

from fastcls.runs import RunData, RunStore

from ._proc import N_SAVES, check_store  # `wave` comes from conftest (one per session)

def test_trainings_and_bulk_writers_on_one_fresh_store(wave, cli):
    """Two bulk writers (N_SAVES runs each) and five real trainings (one finishes, four are stopped), all started
    together on a store that did not exist: no index row lost, no id shared, every run whole."""
    root, res = wave
    for k in ("saver1", "saver2", "done"):
        assert res[k][0] == 0, res[k][2]
    ids = res["saver1"][1].split() + res["saver2"][1].split()
    assert len(ids) == 2 * N_SAVES and len(set(ids)) == 2 * N_SAVES, "every save returns its own id"
    statuses = check_store(root, cli)
    assert set(ids) <= set(statuses) and {statuses[i] for i in ids} == {"done"}
    store = RunStore(root)
    assert statuses[store.resolve("done")["id"]] == "done" and store.load("done").metrics["n_valid"] == 40
    trainings = ("done", "sigterm", "sigint", "sigkill", "ckpt-kill")
    assert len({store.resolve(k)["id"] for k in trainings}) == 5
    assert len(statuses) == 2 * N_SAVES + 5, "every process's run is indexed, stopped ones included"


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
