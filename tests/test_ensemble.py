"""Ensembles of stored runs: every method on tiny known arrays and through the store, honest (held-out) scoring,
the greedy search against brute force, and every bad input refused before anything is written.

Runs are made synthetically (Dirichlet probabilities leaning towards the targets), so nothing here trains a model.
"""

import json

import numpy as np
import pytest
from scipy.stats import rankdata

from fastcls.ensemble import members as EM, scoring as SC, search as ES
from fastcls.ensemble import (BETA_GRID, METHODS, choose_beta, combine, cross_val_combine, ensemble, fit_combiner,
                              kfold_indices, paired_bootstrap)
from fastcls.predict import tta_blend
from fastcls.errors import FastclsError
from fastcls.metrics import get_metric
from fastcls.runs import RunData, RunStore

VOCAB = ["ant", "bee", "cat", "dog"]
N = 240


def dirichlet(rng, y, n_classes, views=1, lean=3.0, base=0.5):
    """(views, N, C) float32 rows leaning towards the targets by a random amount per row."""
    alpha = np.full((views, len(y), n_classes), base)
    alpha[:, np.arange(len(y)), y] += lean * rng.random((views, len(y)))
    g = rng.gamma(alpha)
    return (g / g.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def y(rng):
    return rng.integers(0, len(VOCAB), N)


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def save(store, y, probs, *, ids=None, recipe="toy", vocab=VOCAB, metric="accuracy", test=None, arch="cnn",
         name=None):
    ids = [f"img{i:04d}.png" for i in range(len(y))] if ids is None else ids
    test_ids = None if test is None else [f"t{i:03d}" for i in range(test.shape[1])]
    return store.save(RunData(config={"recipe": recipe, "arch": arch, "metric": metric}, vocab=list(vocab),
                              valid_probs=probs, valid_targets=y, valid_ids=ids, metrics={"metric_name": metric},
                              test_probs=test, test_ids=test_ids, name=name))


def state(store):
    """What a refused call must leave untouched: index rows and the folders under the store."""
    return len(store.leaderboard()), sorted(p.name for p in store.root.iterdir()) if store.root.exists() else []


@pytest.fixture
def runs(store, y, rng):
    """Three runs of one recipe: a single-view run and two with 2 TTA views; all have test probabilities."""
    return [save(store, y, dirichlet(rng, y, 4, views=v, lean=lean), test=dirichlet(rng, np.zeros(30, int), 4, v),
                 arch=f"arch{i}") for i, (v, lean) in enumerate([(1, 1.5), (3, 2.5), (3, 3.0)])]


# -- count metrics, TTA, bootstrap -------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_count_metrics_match_the_registry(metric, rng):
    for C, n in [(3, 50), (12, 40), (7, 1)]:  # 12 classes in 40 rows: some classes absent from both
        yy, pred = rng.integers(0, C, n), rng.integers(0, C, n)
        assert SC._score(metric, yy, pred) == pytest.approx(get_metric(metric)(yy, pred))


def test_tta_blend_follows_fastai_lerp(rng):
    torch = pytest.importorskip("torch")
    views = dirichlet(rng, rng.integers(0, 4, 20), 4, views=4)
    plain, aug = torch.from_numpy(views[0]), torch.from_numpy(views[1:].mean(0))
    for beta in BETA_GRID:  # fastai's Learner.tta returns torch.lerp(aug_preds, preds, beta)
        np.testing.assert_allclose(tta_blend(views, beta), torch.lerp(aug, plain, beta).numpy(), atol=1e-6)
    assert tta_blend(views[:1], 0.3) is not None and np.array_equal(tta_blend(views[:1], 0.3), views[0])


def test_choose_beta_picks_the_better_view(rng, y):
    good, bad = dirichlet(rng, y, 4, lean=6)[0], dirichlet(rng, (y + 1) % 4, 4, lean=6)[0]
    assert choose_beta(good, bad, y, "accuracy") == 1.0  # beta weighs the plain view
    assert choose_beta(bad, good, y, "accuracy") == 0.0
    assert choose_beta(good, good, y, "accuracy") == 0.25  # every blend ties: fastai's default, as a single run picks


def test_paired_bootstrap(rng, y):
    pred = y.copy()
    pred[:60] = (y[:60] + 1) % 4  # a is right on 60 more rows than b (accuracy gain 0.25)
    gain, lo, hi = paired_bootstrap(y, y, pred, "accuracy", n_boot=500, seed=1)
    assert gain == pytest.approx(0.25) and lo < 0.25 < hi and lo > 0.15
    assert paired_bootstrap(y, pred, pred, "macro_f1", n_boot=200) == (0.0, 0.0, 0.0)
    assert paired_bootstrap(y, y, pred, "accuracy", n_boot=500, seed=1) == (gain, lo, hi)  # seeded


@pytest.mark.parametrize("n_classes", [4, 40])  # few row types: drawn per type; many: rows resampled by index
def test_paired_bootstrap_matches_plain_row_resampling(n_classes, rng):
    y = rng.integers(0, n_classes, N)
    a, b = rng.integers(0, n_classes, N), np.where(rng.random(N) < 0.5, y, rng.integers(0, n_classes, N))
    _, lo, hi = paired_bootstrap(y, b, a, "macro_f1", n_boot=2000, seed=2)
    boot = []
    for _ in range(2000):  # the count metric itself is checked against sklearn above
        i = rng.integers(0, N, N)
        boot.append(SC._score("macro_f1", y[i], b[i]) - SC._score("macro_f1", y[i], a[i]))
    assert lo == pytest.approx(np.percentile(boot, 2.5), abs=0.02)
    assert hi == pytest.approx(np.percentile(boot, 97.5), abs=0.02)


# -- the numpy core on known arrays ------------------------------------------------------------------------------

def test_combine_on_known_arrays():
    p = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=np.float32)
    q = np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]], dtype=np.float32)
    r = np.array([[0.5, 0.1, 0.4], [0.4, 0.3, 0.3]], dtype=np.float32)
    np.testing.assert_allclose(combine([p, q]), (p + q) / 2, atol=1e-7)
    np.testing.assert_allclose(combine([p, q], "weighted", weights=[3, 1]), 0.75 * p + 0.25 * q, atol=1e-7)
    vote = combine([p, q, r], "vote")  # row 0: votes 0, 1, 0; row 1: 1, 2, 0 (a tie: the mean prob decides)
    np.testing.assert_allclose(vote[0], [2 / 3, 1 / 3, 0], atol=1e-5)
    assert vote[1].argmax() == ((p + q + r)[1]).argmax() == 2 and np.allclose(vote.sum(1), 1)
    assert combine([p, q, r], "vote", weights=[1, 5, 1])[0].argmax() == 1  # weighted vote
    ranks = sum(rankdata(a, axis=0) for a in (p, q))
    np.testing.assert_allclose(combine([p, q], "rank"), ranks / ranks.sum(1, keepdims=True), atol=1e-6)


def test_fitting_methods_need_targets(rng, y):
    probs = [dirichlet(rng, y, 4)[0]]
    for method in ("hill", "stack", "weighted"):
        with pytest.raises(FastclsError, match="pass targets"):
            combine(probs, method)


def test_stack_learns_a_relabelled_member(rng, y):
    shifted = dirichlet(rng, (y + 1) % 4, 4, lean=8)[0]  # confident, but always one class off
    out = combine([shifted], "stack", targets=y)
    own = (shifted.argmax(1) == (y + 1) % 4).mean()
    assert (shifted.argmax(1) == y).mean() < 0.1 and (out.argmax(1) == y).mean() >= own - 0.02 > 0.8
    assert np.allclose(out.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_hill_never_scores_below_its_best_member_on_its_rows(metric):
    for seed in range(6):
        rng = np.random.default_rng(seed)
        yy = rng.integers(0, 30, 400)
        probs = [dirichlet(rng, yy, 30, lean=lean, base=0.2)[0] for lean in rng.uniform(0.5, 4, 5)]
        rows = np.sort(rng.choice(400, 300, replace=False))
        comb = fit_combiner("hill", probs, yy, metric, rows=rows, hill_steps=20)
        best = max(SC._score(metric, yy[rows], p[rows]) for p in probs)
        assert comb.fit_score >= best
        assert SC._score(metric, yy[rows], comb.apply(probs, rows)) >= best - 1e-9
        assert np.isclose(comb.weights.sum(), 1) and (comb.weights >= 0).all()


@pytest.mark.parametrize("method", ["hill", "weighted"])
def test_folds_searched_together_match_folds_searched_alone(method, rng, y):
    probs = [dirichlet(rng, y, 4, lean=lean)[0] for lean in (0.5, 1, 1.5, 2)]
    fold = kfold_indices(y, 5, seed=0)
    rows = [np.flatnonzero(fold != k) for k in range(5)] + [None]
    together = ES._search_many(method, probs, y, "macro_f1", rows, hill_steps=15)
    for r, (w, score) in zip(rows, together):
        (w_alone, score_alone), = ES._search_many(method, probs, y, "macro_f1", [r], hill_steps=15)
        np.testing.assert_array_equal(w, w_alone)
        assert score == score_alone


def test_weighted_fit_improves_on_the_mean(rng, y):
    probs = [dirichlet(rng, y, 4, lean=lean)[0] for lean in (4, 0.2, 0.2, 0.2)]  # one good, three near-noise
    comb = fit_combiner("weighted", probs, y, "accuracy")
    assert comb.fit_score >= SC._score("accuracy", y, combine(probs))
    assert comb.weights[0] == comb.weights.max()


@pytest.mark.parametrize("n_classes", [5, 40])  # 40 > the candidate classes the search keeps per row
def test_greedy_search_matches_brute_force(n_classes, monkeypatch):
    """Every proposed move scores what a full argmax scores, and labels stay exact after each accepted move, with
    ties (members with equal probabilities) resolved to the lower class as np.argmax does.

    Probabilities are multiples of 1/1024 and weights dyadic, so every order of summation gives the same float
    and the comparison with brute force can be exact, ties included."""
    rng = np.random.default_rng(n_classes)
    n, C = 300, n_classes
    yy = rng.integers(0, C, n)
    probs = [np.round(dirichlet(rng, yy, C, lean=2, base=0.1)[0] * 1024) / 1024 for _ in range(3)]
    tied = np.zeros((n, C), np.float32)  # exact ties: two or four classes at 0.5 / 0.25
    for i in range(n):
        k = rng.choice([2, 4])
        tied[i, rng.choice(C, k, replace=False)] = 1 / k
    probs += [probs[0].copy(), tied]
    full_rows = []
    full = ES._ArgmaxSearch._full
    monkeypatch.setattr(ES._ArgmaxSearch, "_full", lambda self, idx, *a: full_rows.append(len(idx)) or
                        full(self, idx, *a))
    for metric, w0 in [("macro_f1", np.eye(5)[4]), ("accuracy", np.array([1.0, 0, 0.5, 1, 0.25]))]:
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, 250, replace=False)] = True
        # the candidate classes only change speed, never results: with many classes, take random ones per row so
        # that the full-row path is exercised too
        U = np.sort(np.argsort(rng.random((n, C)), 1)[:, :ES._N_CAND], 1).astype(np.int32) if C > ES._N_CAND else None
        data = ES._search_data(probs, U)
        scorers = [SC._LabelScorer(metric, yy, C, mask), SC._LabelScorer(metric, yy, C)]  # a fold and all rows
        search = ES._ArgmaxSearch(probs, data, scorers, w0)
        w = w0.copy()
        for _ in range(12):
            S = sum(np.float64(w[m]) * probs[m] for m in range(5))
            assert (search.labels[mask] == S[mask].argmax(1)).all()
            moves = [(m, c) for m in range(5) for c in (1.0, 0.5, -0.25) if w[m] + c >= 0]
            scores = search.propose(moves)
            for (m, c), sc in zip(moves, scores):
                labels = (S + c * probs[m]).argmax(1)
                assert list(sc) == [SC._score(metric, yy[mask], labels[mask]), SC._score(metric, yy, labels)]
            k = int(rng.integers(len(moves)))
            search.accept(k)
            w[moves[k][0]] += moves[k][1]
    if C > ES._N_CAND:
        assert sum(full_rows) > 0  # rows the candidate classes could not decide were read in full


# -- honest evaluation -------------------------------------------------------------------------------------------

def test_kfold_indices_partition_the_rows(y):
    fold = kfold_indices(y, 5, seed=3)
    assert sorted(np.unique(fold)) == list(range(5)) and len(fold) == len(y)
    assert np.bincount(fold).min() >= len(y) // 5 - 1  # balanced
    assert (kfold_indices(y, 5, seed=3) == fold).all() and not (kfold_indices(y, 5, seed=4) == fold).all()
    with pytest.raises(FastclsError, match="folds"):
        kfold_indices(y[:3], 5)


@pytest.mark.parametrize("method", ["hill", "weighted", "stack"])
def test_out_of_fold_predictions_never_see_their_rows(method, rng, y):
    """Relabelling the rows of one fold cannot change that fold's held-out predictions."""
    probs = [dirichlet(rng, y, 4, lean=lean)[0] for lean in (0.5, 1, 2)]
    fold = kfold_indices(y, 5, seed=0)
    oof, _ = cross_val_combine(probs, y, method, "accuracy", folds=fold)
    y2 = y.copy()
    y2[fold == 2] = rng.integers(0, 4, (fold == 2).sum())
    oof2, _ = cross_val_combine(probs, y2, method, "accuracy", folds=fold)
    np.testing.assert_array_equal(oof[fold == 2], oof2[fold == 2])
    assert not np.array_equal(combine(probs, method, y, "accuracy"), combine(probs, method, y2, "accuracy")) \
        or method == "hill"  # the in-sample fit does see them (hill may pick the same members either way)


def test_fitting_on_noise_is_not_scored_optimistically(store, rng):
    """Selecting among pure-noise runs looks good on the rows it selected on; the cross-validated score stays at
    chance (0.25) and is what the stored run reports."""
    yy = rng.integers(0, 4, 200)
    refs = [save(store, yy, dirichlet(rng, rng.integers(0, 4, 200), 4, lean=0, base=1.0)) for _ in range(8)]
    for method in ("hill", "weighted", "stack"):
        res = ensemble(store, refs, method, n_boot=100)
        row = res.table.iloc[-1]
        assert row.evaluated == "cv-5" and row.score < 0.32
        if method != "stack":  # stack picks its regularisation on held-out rows and overfits less
            assert row.fit_score > 0.34  # in-sample: the selection fits the noise
        assert row.score == pytest.approx(store.leaderboard().set_index("id").loc[res.run_id, "metric"])
        assert row.gain_lo < 0  # no credible gain over the best (noise) member


# -- through the store -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_every_method_stores_a_run_that_loads_back(method, store, runs, y):
    weights = [1, 2, 3] if method == "vote" else None
    res = ensemble(store, runs, method, weights=weights, n_boot=200)
    run = store.load(res.run_id)
    assert run.kind == "ensemble" and run.config["method"] == method and run.config["members"] == runs
    assert run.config["arch"] == "ensemble" and run.config["recipe"] == "toy" and run.config["metric"] == "accuracy"
    assert run.valid_probs.shape == (1, N, 4) and np.allclose(run.valid_probs[0].sum(1), 1, atol=1e-4)
    assert run.test_probs.shape == (1, 30, 4) and np.allclose(run.test_probs[0].sum(1), 1, atol=1e-4)
    assert list(run.valid_targets) == list(y) and run.vocab == VOCAB
    np.testing.assert_allclose(run.valid_probs[0], res.oof_probs if res.oof_probs is not None else res.valid_probs)
    t = res.table
    assert list(t.kind) == ["member"] * 3 + ["ensemble"] and t.id.iloc[-1] == res.run_id
    assert t.evaluated.iloc[-1] == "cv-5"  # two runs have TTA views, so their betas are fitted
    assert t.evaluated.iloc[0] == "direct" and np.isnan(t.beta.iloc[0]) and t.beta.iloc[1] in BETA_GRID
    ens = t.iloc[-1]
    best = t.score[:3].max()
    assert ens.gain == pytest.approx(ens.score - best) and ens.gain_lo <= ens.gain <= ens.gain_hi
    board = store.leaderboard(kind="ensemble")
    assert board.id.tolist() == [res.run_id] and board.metric.iloc[0] == pytest.approx(ens.score)


@pytest.mark.parametrize("method", ["mean", "rank", "vote", "weighted"])
def test_methods_that_fit_nothing_are_scored_directly(method, store, y, rng):
    refs = [save(store, y, dirichlet(rng, y, 4, lean=lean)) for lean in (1, 2)]
    res = ensemble(store, refs, method, weights=[1, 1] if method == "weighted" else None, n_boot=0)
    assert res.evaluated == "direct" and res.oof_probs is None and np.isnan(res.table.gain_lo.iloc[-1])
    assert res.table.score.iloc[-1] == res.table.fit_score.iloc[-1]


def test_mean_of_identical_runs_is_the_run(store, y, rng):
    probs, test = dirichlet(rng, y, 4, views=3), dirichlet(rng, np.zeros(30, int), 4, views=3)
    a, b = save(store, y, probs, test=test), save(store, y, probs, test=test)
    res = ensemble(store, [a, b, a], "mean", tta_beta=0.25)
    np.testing.assert_allclose(res.valid_probs, tta_blend(probs, 0.25), atol=1e-6)
    np.testing.assert_allclose(store.load(res.run_id).test_probs[0], tta_blend(test, 0.25), atol=1e-6)
    assert res.evaluated == "direct" and res.betas == [0.25] * 3
    single = save(store, y, probs[:1])
    np.testing.assert_allclose(ensemble(store, [single, single], "mean").valid_probs, probs[0], atol=1e-7)


def test_rows_are_aligned_by_item_id(store, y, rng):
    probs = dirichlet(rng, y, 4)
    ids = [f"img{i:04d}.png" for i in range(N)]
    perm = rng.permutation(N)
    a = save(store, y, probs)
    b = save(store, y[perm], probs[:, perm], ids=[ids[i] for i in perm])
    res = ensemble(store, [a, b], "mean")
    assert res.valid_ids == ids
    np.testing.assert_allclose(res.valid_probs, probs[0], atol=1e-7)
    res = ensemble(store, [b, a], "mean")  # the first run's order is kept
    assert res.valid_ids == [ids[i] for i in perm]


def test_ensembles_of_ensembles(store, runs, y, rng):
    inner = ensemble(store, runs[:2], "hill", n_boot=0)
    outer = ensemble(store, [inner.run_id, runs[2]], "weighted", n_boot=0)
    run = store.load(outer.run_id)
    assert run.config["members"] == [inner.run_id, runs[2]] and run.test_probs.shape == (1, 30, 4)
    # the inner ensemble stored its held-out predictions, so the outer one is fitted on honest rows
    np.testing.assert_allclose(store.load(inner.run_id).valid_probs[0], inner.oof_probs)
    assert outer.table.arch.iloc[0] == "ensemble"
    again = ensemble(store, [outer.run_id], "mean", n_boot=0)
    np.testing.assert_allclose(again.valid_probs, run.valid_probs[0], atol=1e-7)


def test_a_member_without_test_probs_stores_no_test_probs(store, runs, y, rng):
    bare = save(store, y, dirichlet(rng, y, 4))
    res = ensemble(store, runs + [bare], "mean", n_boot=0)
    assert res.test_probs is None and store.load(res.run_id).test_probs is None


def test_probabilities_are_read_memory_mapped(store, runs, monkeypatch):
    seen = []
    orig = EM._checked_views
    monkeypatch.setattr(EM, "_checked_views", lambda run, split, arr, *a: seen.append(type(arr)) or
                        orig(run, split, arr, *a))
    ensemble(store, runs, "mean", n_boot=0)
    assert seen and all(t is np.memmap for t in seen)


# -- bad input: an error naming what differs, and nothing written ------------------------------------------------

def refused(store, match, *args, **kw):
    before = state(store)
    with pytest.raises(FastclsError, match=match):
        ensemble(store, *args, **kw)
    assert state(store) == before


def test_runs_of_different_recipes(store, runs, y, rng):
    other = save(store, y, dirichlet(rng, y, 4), recipe="other")
    refused(store, r"different recipes.*'toy'.*'other'", [runs[0], other])


def test_runs_with_different_vocab_or_class_order(store, runs, y, rng):
    swapped = save(store, y, dirichlet(rng, y, 4), vocab=["bee", "ant", "cat", "dog"])
    refused(store, "same classes in a different order", [runs[0], swapped])
    renamed = save(store, y, dirichlet(rng, y, 4), vocab=["ant", "bee", "cat", "eel"])
    refused(store, r"different vocabularies.*'dog'.*'eel'", [runs[0], renamed])


def test_runs_with_different_validation_items(store, runs, y, rng):
    ids = [f"img{i:04d}.png" for i in range(N)]
    ids[7], ids[9] = "new1.png", "new2.png"
    other = save(store, y, dirichlet(rng, y, 4), ids=ids)
    refused(store, r"different validation items.*2 only in.*'img0007.png', 'img0009.png'.*'new1.png'",
            [runs[0], other])
    fewer = save(store, y[:-5], dirichlet(rng, y[:-5], 4), ids=[f"img{i:04d}.png" for i in range(N - 5)])
    refused(store, r"\(240 vs 235\)", [runs[0], fewer])


def test_runs_that_disagree_on_labels(store, runs, y, rng):
    y2 = y.copy()
    y2[3] = (y[3] + 1) % 4
    refused(store, r"disagree on the labels of 1 validation items \(e\.g\. 'img0003.png'",
            [runs[0], save(store, y2, dirichlet(rng, y2, 4))])


def test_runs_scored_with_different_metrics(store, runs, y, rng):
    refused(store, "different metrics", [runs[0], save(store, y, dirichlet(rng, y, 4), metric="macro_f1")])


def test_no_runs_or_unknown_runs(store, runs):
    refused(store, "at least one run", [])
    refused(store, "No run 'nope'", [runs[0], "nope"])


@pytest.mark.parametrize("damage", ["nan", "sum"])
def test_damaged_stored_probabilities(damage, store, runs, y, rng):
    ref = save(store, y, dirichlet(rng, y, 4, views=2))
    path = store.root / ref / "valid_probs.npy"
    arr = np.load(path)
    if damage == "nan":
        arr[1, 17, 2] = np.nan
    else:
        arr[1, 17] *= 1.5
    np.save(path, arr)  # written behind the store's back, as a crash or an edit might
    what = "contain NaN or infinite values" if damage == "nan" else r"have rows that do not sum to 1 \(sum 1.5\)"
    refused(store, rf"Run {ref} .*\(view 1\) {what}, first at item 'img0017.png'", [runs[0], ref])


def test_bad_weights(store, runs):
    refused(store, "2 weights given for 3 runs", runs, "weighted", weights=[1, 2])
    refused(store, "non-negative", runs, "weighted", weights=[1, -1, 1])
    refused(store, "Weights apply to the methods weighted and vote", runs, "mean", weights=[1, 1, 1])


def test_unknown_method_suggests_close_names(store, runs):
    refused(store, r"Unknown ensemble method 'hil'\. Did you mean: hill\?", runs, "hil")
    refused(store, "tta_beta", runs, "mean", tta_beta=1.5)


def test_saved_run_records_the_fit(store, runs):
    res = ensemble(store, runs, "hill", hill_steps=10, n_boot=0)
    run = store.load(res.run_id)
    assert run.config["hill_steps"] == 10 and run.config["folds"] == 5
    assert np.isclose(sum(run.config["weights"]), 1) and len(run.config["tta_beta"]) == 3
    assert run.metrics["metric_name"] == "accuracy" and run.metrics["evaluated"] == "cv-5"
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["ensemble"]["valid_probs"] == "out-of-fold"
