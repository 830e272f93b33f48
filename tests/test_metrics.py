"""The metrics registry against scikit-learn (or hand-computed cases) on tiny inputs; each metric's direction as every
consumer reads it (hill climbing, weight search, TTA beta, best epoch, run listing); what ensembles optimise (the
recipe's monitor); temperature scaling. Nothing here trains a model."""

import numpy as np
import pytest
from scipy.special import softmax
from sklearn import metrics as skm

from fastcls.ensemble import choose_beta, ensemble, fit_combiner
from fastcls.errors import FastclsError
from fastcls.metrics import METRICS, get_metric, score
from fastcls.posthoc import PostHoc, apply_temperature, fit_posthoc, fit_temperature
from fastcls.recipe import Recipe
from fastcls.runs import RunData, RunStore
from fastcls.train.learner import metric_names


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = np.r_[np.arange(4), rng.integers(0, 4, 56)]  # every class present
    logits = rng.normal(size=(60, 4))
    logits[np.arange(60), y] += 1.0
    return y, softmax(logits, 1)


def test_log_loss_matches_sklearn_and_clips_like_kaggle(data):
    y, p = data
    assert score("log_loss", y, p) == pytest.approx(skm.log_loss(y, p, labels=range(4)))
    hard = np.eye(4)[(y + 1) % 4]  # every row certain and wrong: Kaggle charges -log(1e-15) per row, not infinity
    assert score("log_loss", y, hard) == pytest.approx(-np.log(1e-15 / (1 + 3e-15)), rel=1e-6)
    # rows that do not sum to 1 are renormalised first
    assert score("log_loss", y, p * 0.5) == pytest.approx(score("log_loss", y, p))


def test_probability_metrics_match_sklearn(data):
    y, p = data
    assert score("roc_auc", y, p) == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    yb = (y > 1).astype(int)
    pb = np.c_[1 - p[:, 0], p[:, 0]]
    assert score("roc_auc", yb, pb) == pytest.approx(skm.roc_auc_score(yb, pb[:, 1]))
    for k in (1, 2, 3):
        assert score(f"top{k}", y, p) == pytest.approx(skm.top_k_accuracy_score(y, p, k=k, labels=range(4)))


def test_map_at_k_by_hand():
    p = np.array([[0.5, 0.3, 0.2, 0.0],   # true 0: first guess -> 1
                  [0.5, 0.3, 0.2, 0.0],   # true 1: second -> 1/2
                  [0.5, 0.3, 0.2, 0.0],   # true 2: third -> 1/3
                  [0.5, 0.3, 0.2, 0.0]])  # true 3: not in the top 3 -> 0
    y = np.arange(4)
    assert score("map@3", y, p) == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
    assert score("map@1", y, p) == pytest.approx(score("accuracy", y, p))
    assert score("map@2", y, p) == pytest.approx((1 + 1 / 2) / 4)


def test_label_metrics_match_sklearn(data):
    y, p = data
    pred = p.argmax(1)
    assert score("f2", y, p) == pytest.approx(skm.fbeta_score(y, pred, beta=2, average="macro"))
    assert score("f0.5", y, p) == pytest.approx(skm.fbeta_score(y, pred, beta=0.5, average="macro"))
    assert score("qwk", y, p) == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    # QWK weighs by index distance, also when a middle grade is never predicted
    y2, pred2 = np.array([0, 2, 2, 0]), np.array([2, 0, 2, 0])
    assert score("qwk", y2, pred2) == pytest.approx(skm.cohen_kappa_score(y2, pred2, weights="quadratic",
                                                                          labels=[0, 1, 2]))


def test_ece_of_a_calibrated_and_an_overconfident_predictor():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 20000)
    right = rng.random(20000) < conf  # right exactly as often as confident
    y = np.zeros(20000, dtype=int)
    p = np.c_[np.where(right, conf, 1 - conf), np.where(right, 1 - conf, conf)]
    assert score("ece", y, p) < 0.02
    sharp = np.c_[np.where(right, 1.0, 0.0), np.where(right, 0.0, 1.0)]
    assert score("ece", y, sharp) > 0.2


def test_directions_and_needs():
    assert not get_metric("log_loss").higher_is_better and not get_metric("ece").higher_is_better
    for name in ("accuracy", "roc_auc", "map@3", "top5", "qwk", "f2"):
        assert get_metric(name).higher_is_better
    assert get_metric("log_loss").better is np.less and get_metric("map@3").better is np.greater
    assert {n for n in ("log_loss", "roc_auc", "map@3", "top5", "qwk", "f2") if get_metric(n).needs_probs} == \
        {"log_loss", "roc_auc", "map@3", "top5"}


@pytest.mark.parametrize("name", ["bogus", "map@0", "map@x", "top", "f", "log-loss"])
def test_unknown_metrics_are_refused_with_the_known_ones(name):
    with pytest.raises(FastclsError, match="Unknown metric.*map@3"):
        get_metric(name)


def test_a_probability_metric_refuses_labels(data):
    y, p = data
    with pytest.raises(FastclsError, match="scores class probabilities"):
        score("log_loss", y, p.argmax(1))


def test_qwk_needs_the_recipes_class_order():
    with pytest.raises(FastclsError, match="needs ordered classes.*classes="):
        metric_names(Recipe(name="dr", metric="qwk"))
    assert metric_names(Recipe(name="dr", metric="qwk", classes=("0", "1", "2")))[-1] == "qwk"


@pytest.mark.parametrize("name", ["log_loss", "map@3", "top2", "f2"])
def test_fastai_counterparts_agree_with_the_registry(name, data):
    import torch
    y, p = data
    m = get_metric(name).make_fastai()
    assert m.name == name
    m.reset()
    from types import SimpleNamespace
    t = torch.tensor(y)
    m.accumulate(SimpleNamespace(pred=torch.tensor(np.log(p), dtype=torch.float32), y=t, yb=(t,), training=False,
                                 to_detach=lambda x, gather=True: x.detach()))
    assert float(m.value) == pytest.approx(score(name, y, p), rel=1e-5)


# -- direction in the consumers --------------------------------------------------------------------------------------

def _members():
    """Three members whose order differs by metric. 0: right on every row but never more than 0.4 sure (accuracy 1,
    log loss 0.92). 1: sure, and wrong on a fifth of the rows (accuracy 0.8, log loss ~1.0). 2: right on 70% with
    0.6, 0.4 on a wrong class otherwise (accuracy 0.7, the lowest log loss, ~0.72)."""
    rng = np.random.default_rng(0)
    n = 400
    y, rows = rng.integers(0, 4, n), np.arange(n)
    m0 = np.full((n, 4), 0.2)
    m0[rows, y] = 0.4
    wrong = rng.random(n) < 0.2
    m1 = np.eye(4)[np.where(wrong, (y + 1) % 4, y)] * 0.97 + 0.0075
    right = rng.random(n) < 0.7
    m2 = np.full((n, 4), 0.4 / 3)
    m2[rows, y] = 0.6
    m2[~right] = 0.15
    m2[rows[~right], y[~right]] = 0.3
    m2[rows[~right], (y[~right] + 2) % 4] = 0.4
    return y, [m.astype(np.float32) for m in (m0, m1, m2)]


def test_hill_climbing_follows_each_metrics_direction():
    y, ms = _members()
    ll = [score("log_loss", y, m) for m in ms]
    acc = [score("accuracy", y, m) for m in ms]
    assert np.argmin(ll) == 2 and np.argmax(acc) == 0 and np.argmax(ll) == 1
    # hill starts from the best single member: the lowest log loss, the highest accuracy
    assert fit_combiner("hill", ms, y, "log_loss", hill_steps=0).weights.tolist() == [0.0, 0.0, 1.0]
    assert fit_combiner("hill", ms, y, "accuracy", hill_steps=0).weights.tolist() == [1.0, 0.0, 0.0]
    # with steps, the searched mixture never scores worse than the best member, in the metric's direction
    for method in ("hill", "weighted"):
        c = fit_combiner(method, ms, y, "log_loss")
        assert c.fit_score <= min(ll) + 1e-9
        assert c.fit_score == pytest.approx(score("log_loss", y, sum(w * m for w, m in zip(c.weights, ms))), rel=1e-5)


def test_tta_beta_follows_the_metric(data):
    y, p = data
    sharp = softmax(np.log(p) * 6, 1)  # same argmax, overconfident: worse log loss, same accuracy
    assert choose_beta(sharp, p, y, "log_loss") == 0.0  # all weight on the calibrated view
    assert choose_beta(p, sharp, y, "log_loss") == 1.0


def test_run_listing_sorts_lower_is_better_metrics_ascending(tmp_path):
    store = RunStore(tmp_path / "runs")
    y = np.arange(4)
    for ll in (0.9, 0.3, 0.6):
        store.save(RunData(config={"recipe": "toy", "arch": "a", "metric": "log_loss"}, vocab=list("abcd"),
                           valid_probs=np.full((1, 4, 4), 0.25, np.float32), valid_targets=y,
                           valid_ids=[str(i) for i in y], metrics={"metric_name": "log_loss", "log_loss": ll}))
    assert store.leaderboard()["metric"].tolist() == [0.3, 0.6, 0.9]


# -- what an ensemble optimises ------------------------------------------------------------------------------------

def _save(store, y, probs, monitor=None, metric="accuracy"):
    cfg = {"recipe": "toy", "arch": "a", "metric": metric, **({"monitor": monitor} if monitor else {})}
    return store.save(RunData(config=cfg, vocab=list("abcd"), valid_probs=probs[None], valid_targets=y,
                              valid_ids=[f"i{i}" for i in range(len(y))], metrics={"metric_name": metric}))


def test_ensembles_optimise_the_recipes_monitor(tmp_path):
    store = RunStore(tmp_path / "runs")
    y, ms = _members()
    ids = [_save(store, y, m, monitor="balanced_accuracy") for m in ms]
    res = ensemble(store, ids, method="hill", n_boot=0)
    assert res.metric == "balanced_accuracy"
    assert store.load(res.run_id).metrics["metric_name"] == "balanced_accuracy"
    res = ensemble(store, ids, method="hill", n_boot=0, metric="log_loss")  # the competition's metric, asked for
    assert res.metric == "log_loss" and res.score == pytest.approx(score("log_loss", y, res.oof_probs), rel=1e-5)
    with pytest.raises(FastclsError, match="Unknown metric"):
        ensemble(store, ids, method="hill", metric="logloss")


def test_ensemble_calibration_lowers_log_loss_and_keeps_labels(tmp_path):
    store = RunStore(tmp_path / "runs")
    y, ms = _members()
    ids = [_save(store, y, m) for m in ms[1:]]
    plain = ensemble(store, ids, method="mean", n_boot=0)
    cal = ensemble(store, ids, method="mean", n_boot=0, calibrate=True)
    assert (cal.valid_probs.argmax(1) == plain.valid_probs.argmax(1)).all()
    assert cal.score == plain.score  # accuracy: unchanged
    m_plain, m_cal = store.load(plain.run_id).metrics, store.load(cal.run_id).metrics
    assert m_cal["log_loss"] < m_plain["log_loss"] - 0.05 and m_cal["temperature"] != pytest.approx(1, abs=0.1)
    assert store.load(cal.run_id).meta["posthoc"]["temperature"] == pytest.approx(m_cal["temperature"])


# -- temperature scaling ----------------------------------------------------------------------------------------------

def test_temperature_scaling_calibrates_an_overconfident_run(data):
    y, p = data
    over = softmax(np.log(p) * 5, 1)  # five times too sharp
    t = fit_temperature(over, y)
    cal = apply_temperature(over, t)
    assert 3 < t < 8
    assert score("log_loss", y, cal) < score("log_loss", y, over) - 0.3
    assert score("ece", y, cal) < score("ece", y, over)
    assert (cal.argmax(1) == over.argmax(1)).all()
    assert fit_temperature(cal, y) == pytest.approx(1.0, abs=0.01)  # a calibrated run is left alone


def test_posthoc_temperature_is_stored_applied_to_every_view_and_undone(data):
    y, p = data
    over = softmax(np.log(p) * 5, 1)
    post = fit_posthoc(over, y, calibrate=True)
    assert post.applied and post.tau is None and post.offsets is None
    back = PostHoc.from_dict(post.to_dict())
    assert back.temperature == pytest.approx(post.temperature)
    views = np.stack([over, over[::-1]])
    adj = back.apply(views)
    assert np.allclose(adj[1], apply_temperature(over[::-1], post.temperature))
    assert np.allclose(back.undo(adj), views, atol=1e-6)
    assert "temperature" in post.describe()
    assert not fit_posthoc(over, y).applied  # off unless asked for
    with pytest.raises(FastclsError, match="temperature must be > 0"):
        apply_temperature(p, 0)


def test_registry_names_match_their_keys():
    assert all(m.name == k for k, m in METRICS.items())


def test_posthoc_steps_optimise_the_monitor():
    from fastcls.train.run import posthoc_metric
    assert posthoc_metric(Recipe(name="q", monitor="balanced_accuracy")) == "balanced_accuracy"
    assert posthoc_metric(Recipe(name="c", metric="log_loss")) == "log_loss"
    assert posthoc_metric(Recipe(name="p")) == "macro_f1"  # plain accuracy on a skewed valid split would undo it


def test_a_calibrated_run_monitoring_log_loss_trains_and_stores_its_temperature(cli, tmp_path):
    """A real tiny digits run, its recipe metric and monitor set to log loss (lower is better) and --calibrate."""
    import json
    from .conftest import TINY
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "digits_ll.py").write_text("from fastcls.recipe import get_recipe\n"
                                          "recipe = get_recipe('digits').override(name='digits_ll', metric='log_loss', "
                                          "extra_metrics=('map@3', 'top2'), monitor='log_loss')\n")
    runs = tmp_path / "runs"
    res = cli("train", "digits_ll", "simple_cnn", *TINY, "--epochs", "2", "--calibrate", "--recipes", recipes,
              "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    run = RunStore(runs).load(RunStore(runs).leaderboard()["id"][0])
    m = run.metrics
    assert m["metric_name"] == "log_loss" and {"map@3", "top2", "ece", "ece_raw"} <= set(m)
    hist = run.history
    assert m["best_epoch"] == int(hist["log_loss"].idxmin())  # the best epoch is the lowest log loss
    assert run.meta["posthoc"]["temperature"] > 0 and "temperature" in m["posthoc"]
    assert m["log_loss"] <= m["log_loss_raw"] + 1e-9 and m["accuracy"] == m["accuracy_raw"]
    json.dumps(m)
