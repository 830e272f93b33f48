"""The imbalance toolkit inside real tiny training runs, and the quickdraw recipe on its real data.

Option tests use a long-tailed cut of scikit-learn's digits (150, 60, 24, 10 per class; balanced labelled test set)
written in the quickdraw npz layout, so they run everywhere; the recipe test uses ../shared/data/quickdraw-longtail.
"""

import json

import numpy as np
import pandas as pd
import pytest
from fastai.callback.data import WeightedDL
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat

from fastcls import data as fdata
from fastcls.errors import FastclsError
from fastcls.posthoc import PostHoc, apply_offsets, fit_posthoc, logit_adjust, tune_tau
from fastcls.imbalance import WeightedFocalLossFlat, class_weights
from fastcls.metrics import score
from fastcls.predict import predict_views
from fastcls.recipe import get_recipe
from fastcls.runs import RunStore
from fastcls.config import RunConfig
from fastcls.train import fit_run, imbalance_plan

from .conftest import shared_data

TAIL = {0: 150, 1: 60, 2: 24, 3: 10}  # training items per class
NAMES = np.array(["d0", "d1", "d2", "d3"])  # sorted like the tail, so vocab index = rarity rank
N_TEST = 15  # per class, balanced
# one torch thread (conftest): tiny models step many times slower with 2 threads spinning on a busy 2-core CPU
pytestmark = pytest.mark.usefixtures("one_thread")
TINY_QD = ["--size", "8", "--epochs", "1", "--bs", "32", "--tta", "1", "--quiet"]


@pytest.fixture(scope="module")
def longtail(tmp_path_factory):
    """Digits 0-3 as a long-tailed npz data set in the quickdraw layout (train / test / test_solution)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    tr, te = [], []
    for c, n in TAIL.items():
        idx = rng.permutation(np.flatnonzero(d.target == c))
        tr += idx[:n].tolist()
        te += idx[n:n + N_TEST].tolist()
    tr, te = rng.permutation(tr), np.array(te)
    root = tmp_path_factory.mktemp("longtail")
    np.savez(root / "train.npz", images=images[tr], labels=d.target[tr], classes=NAMES)
    np.savez(root / "test.npz", images=images[te])
    np.savez(root / "test_solution.npz", labels=d.target[te])
    return root


def _fit(data, tmp_path, **over):
    """One tiny quickdraw-recipe run (8 px, 1 epoch) with recipe overrides; the result and the stored run."""
    recipe = get_recipe("quickdraw").override(size=8, epochs=1, bs=32, tta=0, **over)
    store = RunStore(tmp_path / "runs")
    res = fit_run(RunConfig(recipe, "simple_cnn", data=str(data), seed=0), store, progress="none")
    return res, store.load(res.run_id)


def _train_counts(learn):
    vocab = list(learn.dls.vocab)
    labels = learn.dls.train_ds.items["label"].map(vocab.index).to_numpy()
    return np.bincount(labels, minlength=len(vocab)), vocab


def _raw_views(learn, run):
    """The model's own plain predictions on valid and test, before any post-hoc step."""
    valid = predict_views(learn, learn.dls.valid, 0)[0][0]
    test = predict_views(learn, fdata.test_dl(learn.dls, learn.dls.items), 0)[0][0]
    assert valid.shape == run.valid_probs[0].shape and test.shape == run.test_probs[0].shape
    return valid, test


def _test_targets(longtail, vocab):
    y = np.load(longtail / "test_solution.npz")["labels"]
    return np.array([vocab.index(str(NAMES[i])) for i in y])


# ----------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("spec, smoothing, loss_type, weighted", [  # plain and focal alone: see the sampler test
    ("none", 0.1, LabelSmoothingCrossEntropyFlat, False),
    ("weights", 0.0, CrossEntropyLossFlat, True),
    ("weights,focal", 0.1, WeightedFocalLossFlat, True),
])
def test_training_uses_the_options_loss(longtail, tmp_path, spec, smoothing, loss_type, weighted):
    res, run = _fit(longtail, tmp_path, imbalance=spec, label_smoothing=smoothing, tune_thresholds=False)
    loss = res.learn.loss_func
    assert type(loss) is loss_type
    counts, _ = _train_counts(res.learn)
    assert counts.tolist() == sorted(counts.tolist(), reverse=True) and counts[0] > 10 * counts[-1]
    weight = getattr(loss.func, "weight", None)
    if weighted:
        np.testing.assert_allclose(weight.cpu().numpy(), class_weights(counts).numpy(), rtol=1e-6)
        assert weight[-1] > weight[0] * 10, "the rarest class must weigh most"
    else:
        assert weight is None
    if loss_type is WeightedFocalLossFlat:
        assert loss.func.gamma == 2.0 and loss.func.eps == smoothing
    elif smoothing:
        assert loss.func.eps == smoothing
    assert np.isfinite(run.history["train_loss"]).all()
    assert run.config["imbalance"] == spec and run.config["label_smoothing"] == smoothing
    assert not isinstance(res.learn.dls.train, WeightedDL), "only oversample changes the sampler"
    assert "posthoc" not in run.metrics and "logit_adjust_tau" not in run.metrics


# ----------------------------------------------------------------------------------------------------- sampler
def _label_shares(dl, epochs=3):
    ys = np.concatenate([yb.cpu().numpy() for _ in range(epochs) for _, yb in dl])
    return np.bincount(ys, minlength=len(dl.dataset.vocab)) / len(ys)


def test_oversample_draws_balanced_batches_and_keeps_valid_plain(longtail, tmp_path):
    res, run = _fit(longtail, tmp_path, imbalance="focal,oversample", label_smoothing=0.0, tune_thresholds=False)
    dls = res.learn.dls
    assert isinstance(dls.train, WeightedDL)
    assert type(res.learn.loss_func) is WeightedFocalLossFlat and res.learn.loss_func.func.weight is None
    recipe = get_recipe("quickdraw").override(imbalance="focal,oversample")
    np.testing.assert_allclose(dls.train.wgts, imbalance_plan(recipe, dls).sample_weights)  # the plan's weights
    shares = _label_shares(dls.train)
    assert np.all(np.abs(shares - 0.25) < 0.1), f"oversampled batches are not balanced: {shares}"
    # validation: every item once, in order, and scored unweighted
    assert not dls.valid.shuffle
    assert list(dls.valid.get_idxs()) == list(range(len(dls.valid_ds)))
    assert run.valid_ids == dls.valid_ds.items["id"].tolist()
    # plain training draws the long tail as it is
    plain, _ = _fit(longtail, tmp_path, imbalance="none", label_smoothing=0.0, tune_thresholds=False)
    assert type(plain.learn.loss_func) is CrossEntropyLossFlat and plain.learn.loss_func.func.weight is None
    plain_shares = _label_shares(plain.learn.dls.train)
    counts, _ = _train_counts(plain.learn)
    assert plain_shares[0] > 0.5 and plain_shares[-1] < 0.1
    np.testing.assert_allclose(plain_shares, counts / counts.sum(), atol=0.02)


# ----------------------------------------------------------------------------------------------------- post-hoc
def test_logit_adjust_and_thresholds_are_fitted_on_valid_recorded_and_applied(longtail, tmp_path):
    res, run = _fit(longtail, tmp_path, imbalance="logit-adjust", label_smoothing=0.0, tune_thresholds=True)
    counts, vocab = _train_counts(res.learn)
    tau = run.metrics["logit_adjust_tau"]
    post = run.meta["posthoc"]
    offsets = np.array(post["offsets"])
    assert post["tau"] == tau and 0.0 <= tau <= 2.0 and offsets.shape == (4,)
    assert post["fitted_on"].startswith("valid")
    np.testing.assert_allclose(post["prior"], counts / counts.sum())
    raw_valid, raw_test = _raw_views(res.learn, run)
    # tau is the one tune_tau picks on the valid plain view, for the recipe's monitored metric
    assert post["metric"] == "balanced_accuracy"
    assert tau == tune_tau(raw_valid, run.valid_targets, counts, metric="balanced_accuracy")
    for raw, stored in ((raw_valid, run.valid_probs[0]), (raw_test, run.test_probs[0])):
        np.testing.assert_allclose(stored, apply_offsets(logit_adjust(raw, counts, tau), offsets), atol=1e-5)
    y = _test_targets(longtail, vocab)
    for name in ("macro_f1", "accuracy"):  # held-out test scores, before and after the post-hoc steps
        assert run.metrics[f"test_{name}_raw"] == pytest.approx(score(name, y, raw_test), abs=1e-6)
        assert run.metrics[f"test_{name}"] == pytest.approx(score(name, y, run.test_probs[0]), abs=1e-6)
    # fitted on valid: never worse there (tau 0 and zero offsets are candidates), and labelled in-sample
    assert run.metrics["macro_f1"] >= run.metrics["macro_f1_raw"] - 1e-9
    assert run.metrics["macro_f1_raw"] == pytest.approx(score("macro_f1", run.valid_targets, raw_valid), abs=1e-6)
    assert "in-sample" in run.metrics["posthoc"] and "thresholds" in run.metrics["posthoc"]


def test_logit_adjust_moves_predictions_toward_rare_classes(longtail, tmp_path, monkeypatch):
    import fastcls.posthoc
    monkeypatch.setattr(fastcls.posthoc, "tune_tau", lambda *a, **k: 1.0)  # a fixed strength, whatever valid says
    res, run = _fit(longtail, tmp_path, imbalance="logit-adjust", label_smoothing=0.0, tune_thresholds=False)
    assert run.metrics["logit_adjust_tau"] == 1.0
    raw_valid, raw_test = _raw_views(res.learn, run)
    counts, _ = _train_counts(res.learn)
    rare, common = counts.argmin(), counts.argmax()
    for raw, stored in ((raw_valid, run.valid_probs[0]), (raw_test, run.test_probs[0])):
        assert stored[:, rare].mean() > raw[:, rare].mean() and stored[:, common].mean() < raw[:, common].mean()
        assert (stored.argmax(1) == rare).sum() >= (raw.argmax(1) == rare).sum()
        np.testing.assert_allclose(stored, logit_adjust(raw, counts, 1.0), atol=1e-5)


def test_posthoc_applies_to_every_stored_view():
    views = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 20)).astype(np.float32)
    post = PostHoc(tau=0.7, prior=np.array([0.6, 0.3, 0.08, 0.02]), offsets=np.array([0.0, 0.5, -0.2, 1.0]))
    out = post.apply(views)
    assert out.shape == views.shape and post.applied and not PostHoc().applied
    for v, o in zip(views, out):
        np.testing.assert_allclose(o, apply_offsets(logit_adjust(v, post.prior, 0.7), post.offsets), atol=1e-6)
    np.testing.assert_array_equal(PostHoc().apply(views), views)
    back = PostHoc.from_dict(json.loads(json.dumps(post.to_dict()))).undo(out)  # as a run's meta.json records it
    np.testing.assert_allclose(back, views, atol=1e-5)


def test_cv_run_fits_posthoc_once_on_the_out_of_fold_set(cli, longtail, tmp_path):
    """Each fold's post-hoc steps are fitted on its own validation labels; the cv run undoes them (its out-of-fold
    rows are the fold models' own probabilities) and fits the recipe's steps once on the whole out-of-fold set."""
    runs = tmp_path / "runs"
    res = cli("train", "quickdraw", "simple_cnn", "--data", longtail, *TINY_QD, "--folds", "2",
              "--imbalance", "logit-adjust", "--tune-thresholds", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    store = RunStore(runs)
    board = store.leaderboard(status=None)
    cv = store.load(board[board["kind"] == "cv"]["id"].iloc[0])
    post = PostHoc.from_dict(cv.meta["posthoc"])
    assert post.applied and post.offsets is not None and "macro_f1_raw" in cv.metrics
    own = post.undo(cv.valid_probs)  # the out-of-fold set before the cv run's own steps
    pos = {str(i): n for n, i in enumerate(cv.valid_ids)}
    for rid in cv.config["fold_runs"]:
        fold = store.load(rid)
        assert fold.meta.get("posthoc"), "each fold fitted its own steps"
        rows = [pos[str(i)] for i in fold.valid_ids]
        fold_own = PostHoc.from_dict(fold.meta["posthoc"]).undo(fold.valid_probs)
        np.testing.assert_allclose(own[:, rows], fold_own, atol=1e-4)
    y = np.asarray(cv.valid_targets)
    refit = fit_posthoc(own[0], y, prior=np.bincount(y, minlength=len(cv.vocab)), thresholds=True,
                        metric=get_recipe("quickdraw").monitor)  # the steps fitted once, on every item out of fold
    assert post.tau == pytest.approx(refit.tau) and np.allclose(post.offsets, refit.offsets)
    np.testing.assert_allclose(cv.valid_probs, refit.apply(own), atol=1e-5)
    assert cv.metrics["macro_f1_raw"] == pytest.approx(score("macro_f1", y, own[0]), abs=1e-6)


# ----------------------------------------------------------------------------------------------------- CLI
def test_cli_imbalance_options_reach_the_run(cli, longtail, tmp_path):
    runs = tmp_path / "runs"
    res = cli("train", "quickdraw", "simple_cnn", "--data", longtail, *TINY_QD, "--epochs", "3", "--runs-dir", runs,
              "--imbalance", "Oversample, focal", "--label-smoothing", "0.05", "--tune-thresholds")
    assert res.exit_code == 0, res.output
    run = RunStore(runs).load(RunStore(runs).leaderboard()["id"][0])
    # the best epoch is picked by the recipe's monitor (balanced accuracy), not by its headline metric
    assert run.history.columns[-2] == "balanced_accuracy"
    assert run.metrics["best_epoch"] == int(np.argmax(run.history["balanced_accuracy"].to_numpy()))
    assert run.config["imbalance"] == "focal,oversample"  # canonical form
    assert run.config["label_smoothing"] == 0.05 and run.config["tune_thresholds"] is True
    assert len(run.meta["posthoc"]["offsets"]) == 4
    assert "test_macro_f1_raw" in res.stdout


@pytest.mark.parametrize("spec, expect", [
    ("focsl", "Did you mean: focal"),
    ("weights,oversample", "over-correct"),
    ("none,focal", "combines 'none'"),
    ("logit", "logit-adjust"),
])
def test_cli_rejects_bad_imbalance_before_training(cli, tmp_path, spec, expect):
    runs = tmp_path / "runs"
    res = cli("train", "digits", "simple_cnn", "--imbalance", spec, "--runs-dir", runs, "--quiet")
    assert res.exit_code == 2
    assert expect in res.stderr and "Traceback" not in res.output
    assert not runs.exists(), "nothing may be written for a refused run"


def test_cli_rejects_bad_label_smoothing(cli, tmp_path):
    res = cli("train", "digits", "simple_cnn", "--label-smoothing", "1.5", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "label_smoothing" in res.stderr and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------- quickdraw
def test_quickdraw_recipe_declares_its_rules():
    r = get_recipe("quickdraw")
    assert r.layout == "npz" and not r.pretrained and not r.allow_pretrained and r.freeze_epochs == 0
    assert set(r.archs) == {"mobilenetv2_100", "resnet18", "simple_cnn"}
    assert r.metric == "accuracy" and "macro_f1" in r.extra_metrics and r.monitor == "balanced_accuracy"
    assert r.imbalance != "none" and r.label_smoothing > 0 and r.wd
    assert (r.sub_id_col, r.sub_label_col) == ("Id", "Category")
    assert r.data is None or not r.data.startswith("/")
    assert r.flip and r.tta_views == ("flip",)  # trained with mirror images, predicted with one too (measured)
    from fastcls.recipe import parse_sets
    assert parse_sets(r, ["tta_views=none"]) == {"tta_views": ()}  # --tta-views none switches it off
    with pytest.raises(FastclsError, match="from scratch only"):
        r.override(pretrained=True)


def test_balanced_accuracy_is_mean_recall():
    y = np.array([0, 0, 0, 0, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0])
    assert score("balanced_accuracy", y, pred) == pytest.approx((3 / 4 + 1 + 0) / 3)
    assert score("accuracy", y, pred) == pytest.approx(4 / 6)


def test_quickdraw_trains_on_real_data_and_scores_both_metrics(cli, tmp_path):
    data = shared_data("quickdraw-longtail")
    runs = tmp_path / "runs"
    res = cli("train", "quickdraw", "simple_cnn", "--data", data, *TINY_QD, "--tta", "0", "--tta-views", "none", "--sample", "300",
              "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    run = RunStore(runs).load(RunStore(runs).leaderboard()["id"][0])
    m = json.loads((run.path / "metrics.json").read_text())
    assert m["metric_name"] == "accuracy" and run.row["metric"] == m["accuracy"]
    assert m["n_train"] + m["n_valid"] == 300, "test images never join training"
    assert run.vocab == ["apple", "bicycle", "cat", "diamond", "eye", "fish"]
    solution = np.load(data / "test_solution.npz")["labels"]  # indices into train.npz's classes
    classes = np.load(data / "train.npz")["classes"]
    y = np.array([run.vocab.index(c) for c in classes[solution]])
    assert run.test_probs.shape[1] == len(y) == 3000 and run.test_ids[:3] == ["0", "1", "2"]
    for name in ("accuracy", "macro_f1"):
        assert m[f"test_{name}"] == pytest.approx(score(name, y, run.test_probs[0]), abs=1e-6)
        assert m[name] == pytest.approx(score(name, run.valid_targets, run.valid_probs[0]), abs=1e-6)
    assert "macro_f1" in run.history.columns, "macro-F1 is also reported per epoch"
    assert run.config["imbalance"] == get_recipe("quickdraw").imbalance
    sub = tmp_path / "sub.csv"
    res = cli("submit", run.id, "--out", sub, "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(sub, dtype=str)
    assert list(df.columns) == ["Id", "Category"] and df["Id"].tolist() == [str(i) for i in range(3000)]
    assert run.test_probs.shape[0] == 1, "--tta 0, --tta-views none: the plain view only, which the submission uses"
    assert df["Category"].tolist() == [run.vocab[i] for i in np.asarray(run.test_probs[0]).argmax(1)]


def test_quickdraw_refuses_pretrained_weights(cli, tmp_path):
    res = cli("train", "quickdraw", "simple_cnn", "--data", tmp_path, "--pretrained", "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "from scratch only" in res.stderr and "--pretrained" in res.stderr
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"")
    res = cli("train", "quickdraw", "simple_cnn", "--data", tmp_path, "--weights", w, "--runs-dir", tmp_path / "runs")
    assert res.exit_code == 2 and "from scratch only" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_npz_test_solution_must_match_the_test_images(longtail, tmp_path):
    for f in ("train.npz", "test.npz"):
        (tmp_path / f).write_bytes((longtail / f).read_bytes())
    np.savez(tmp_path / "test_solution.npz", labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(FastclsError, match="3 labels for 60 test images"):
        fdata.read_items(get_recipe("quickdraw"), tmp_path)
    np.savez(tmp_path / "test_solution.npz", labels=np.full(4 * N_TEST, 7))
    with pytest.raises(FastclsError, match="outside the 4 classes"):
        fdata.read_items(get_recipe("quickdraw"), tmp_path)
