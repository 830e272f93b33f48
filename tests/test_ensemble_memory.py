"""Ensembles over the memory budget: with `$FASTCLS_MEMORY_BUDGET` below what the members' in-memory copies (TTA
means, blends, re-ordered rows) would take, members are streamed from their memory-mapped files: the results are
identical and the traced peak memory no longer grows with every member's copy."""

import tracemalloc

import numpy as np
import pytest

from fastcls.ensemble import ensemble
from fastcls.runs import RunStore

from .test_ensemble import VOCAB, dirichlet, save

N, M = 3000, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """M runs with 3 views each (plain + 2 TTA) and test probabilities; one lists its rows in another order."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(VOCAB), N)
    store = RunStore(tmp_path_factory.mktemp("runs"))
    ids = [f"img{i:05d}.png" for i in range(N)]
    refs = []
    for m in range(M):
        probs, test = dirichlet(rng, y, len(VOCAB), views=3, lean=1.0 + 0.3 * m), dirichlet(rng, y[:500], 4, views=3)
        if m == 2:  # rows in reverse order: aligned by id
            refs.append(save(store, y[::-1], probs[:, ::-1], ids=ids[::-1], test=test, arch=f"a{m}"))
        else:
            refs.append(save(store, y, probs, ids=ids, test=test, arch=f"a{m}"))
    return store, refs


def _run(store, refs, method, budget, monkeypatch):
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", budget)
    tracemalloc.start()
    try:
        res = ensemble(store, refs, method=method, n_boot=0, hill_steps=5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return res, peak


@pytest.mark.parametrize("method", ["mean", "hill"])
def test_streamed_members_give_identical_results_in_less_memory(runs, method, monkeypatch):
    store, refs = runs
    kept, kept_peak = _run(store, refs, method, "1G", monkeypatch)
    streamed, streamed_peak = _run(store, refs, method, "0", monkeypatch)
    assert streamed.score == kept.score and streamed.betas == kept.betas and streamed.weights == kept.weights
    for a, b in ((kept.valid_probs, streamed.valid_probs), (kept.oof_probs, streamed.oof_probs),
                 (kept.test_probs, streamed.test_probs)):
        assert (a is None and b is None) or np.array_equal(a, b)
    one = N * len(VOCAB) * 4  # one member's (N, C) float32 copy
    assert kept_peak > streamed_peak + (M - 1) * one, (kept_peak, streamed_peak)


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    import re
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):  # a mapping's header line; the path is its 6th field
            current = len(head) >= 6 and head[5] == str(path)
        elif current and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
def test_members_read_once_leave_no_pages_resident(runs):
    """After the load-time check reads every member's file, their pages are released: resident memory does not
    grow by the size of every member (the files stay in the page cache)."""
    from fastcls.ensemble.members import _load_members
    store, refs = runs
    members = _load_members(store, refs)[0]
    files = [m.run.path / "valid_probs.npy" for m in members]
    assert all(f.is_file() for f in files)
    np.asarray(members[0].run.valid_probs)[0, :10].sum()  # a mapping is live
    assert sum(_mapped_kib(f.resolve()) for f in files[1:]) == 0
