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
