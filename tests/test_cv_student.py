"""K-fold with OOF parent runs, noisy-student pseudo-labels, distillation from stored probabilities, probes."""

import contextlib
import os

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from fastcls.cli import app
from fastcls.config import RunConfig
from fastcls.data import assign_folds, read_items, sample_items
from fastcls.recipe import get_recipe
from fastcls.runs import RunData, RunStore
from fastcls.experiments.student import distill_loss

from .conftest import TINY
from .test_recipes_seed import QUICK, make_masks

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")]


def _cli(*args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    return res


def _rows(runs, **where):
    df = RunStore(runs).leaderboard(sort="newest", status=None)
    for k, v in where.items():
        df = df[df[k] == v]
    return df


@pytest.fixture(scope="module")
def cv_store(tmp_path_factory):
    """Two 3-fold cv runs of digits (simple_cnn and seed_cnn64) and one plain run, all with seed 42 on 200 items."""
    runs = tmp_path_factory.mktemp("cv-runs")
    for arch in ("simple_cnn", "seed_cnn64"):
        res = _cli("train", "digits", arch, *TINY, "--folds", "3", "--runs-dir", runs)
        assert res.exit_code == 0, res.output
    res = _cli("train", "digits", "simple_cnn", *TINY, "--name", "plain", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    return runs


def _cv(runs, arch):
    store = RunStore(runs)
    rows = _rows(runs, kind="cv", arch=arch)
    assert len(rows) == 1
    return store.load(rows["id"].iloc[0])


# -- folds ---------------------------------------------------------------------------------------------------------
def test_oof_covers_every_item_once_and_folds_agree_across_archs(cv_store):
    store = RunStore(cv_store)
    items = read_items(get_recipe("digits"))
    ids = sample_items(items.train, 200, 42)["id"].astype(str).tolist()
    per_arch = {}
    for arch in ("simple_cnn", "seed_cnn64"):
        cv = _cv(cv_store, arch)
        assert cv.valid_ids == ids  # every training item, in item order
        assert cv.valid_probs.shape == (2, 200, 10)
        folds = _rows(cv_store, parent=cv.id).sort_values("name")
        assert len(folds) == 3 and set(folds["kind"]) == {"train"}
        fold_runs = [store.load(i) for i in folds["id"]]
        held = [set(r.valid_ids) for r in fold_runs]
        assert sum(map(len, held)) == 200 and set().union(*held) == set(ids)  # each item held out exactly once
        for r in fold_runs:  # the parent's OOF rows are the fold runs' own predictions
            pos = [ids.index(i) for i in r.valid_ids]
            np.testing.assert_allclose(cv.valid_probs[:, pos], r.valid_probs, rtol=0, atol=0)
        mean = np.mean([np.asarray(r.test_probs) for r in fold_runs], axis=0)
        np.testing.assert_allclose(cv.test_probs, mean, atol=1e-6)
        per_arch[arch] = [r.valid_ids for r in fold_runs]
        assert cv.config["folds"] == 3 and cv.config["fold_runs"] == folds["id"].tolist()
    assert per_arch["simple_cnn"] == per_arch["seed_cnn64"]  # identical folds for both archs


def test_fold_assignment_is_stratified_and_ignores_arch():
    items = read_items(get_recipe("digits"))
    a = assign_folds(items.train, RunConfig.from_options("digits", "simple_cnn").recipe, 5, 1)
    b = assign_folds(items.train, RunConfig.from_options("digits", "resnet18").recipe, 5, 1)
    np.testing.assert_array_equal(a, b)
    counts = pd.crosstab(items.train["label"], a)
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1  # every class spread evenly over the folds
    assert not np.array_equal(a, assign_folds(items.train, get_recipe("digits"), 5, 2))  # the seed matters


def test_cv_run_is_listed_shown_ensembled_and_submitted(cv_store, tmp_path):
    a, b = _cv(cv_store, "simple_cnn"), _cv(cv_store, "seed_cnn64")
    res = _cli("runs", "--runs-dir", cv_store)
    assert res.exit_code == 0 and a.id in res.output and "cv" in res.output
    res = _cli("show", a.name, "--runs-dir", cv_store)
    assert res.exit_code == 0, res.output
    res = _cli("ensemble", a.id, b.id, "--runs-dir", cv_store, "--name", "two-cv")
    assert res.exit_code == 0, res.output
    ens = RunStore(cv_store).load("two-cv")
    assert ens.valid_ids == a.valid_ids and ens.valid_probs.shape[1] == 200
    out = tmp_path / "sub.csv"
    res = _cli("submit", a.id, "--out", out, "--runs-dir", cv_store)
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(out)) == len(a.test_ids)


def test_single_fold_then_the_rest_builds_the_parent(tmp_path):
    runs = tmp_path / "runs"
    res = _cli("train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "2", "--fold", "1",
               "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert len(_rows(runs, kind="cv")) == 0 and len(_rows(runs)) == 1
    assert "1 of 2 folds stored" in res.output
    res = _cli("train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "2", "--name", "my-cv",
               "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert len(_rows(runs)) == 3 and len(_rows(runs, kind="cv")) == 1  # fold 1 was reused, not trained again
    assert _rows(runs, kind="cv")["name"].tolist() == ["my-cv"], "--name names the cv run"
    assert RunStore(runs).load("my-cv").config["folds"] == 2
    res = _cli("train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "2", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert len(_rows(runs)) == 3, "the same folds again: the stored cv run is found, not stored twice"
    res = _cli("train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "2", "--name", "my-cv",
               "--runs-dir", runs)
    assert res.exit_code == 0 and len(_rows(runs)) == 3, "--name of this cv's own run: the same command again"
    res = _cli("train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "3", "--name", "my-cv",
               "--runs-dir", runs)
    assert res.exit_code == 2 and "--name 'my-cv' is taken" in res.output and len(_rows(runs)) == 3


def test_fold_errors(tmp_path):
    res = _cli("train", "digits", "simple_cnn", *TINY, "--folds", "3", "--fold", "3", "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "--fold 3 is not a fold of --folds 3" in res.output
    res = _cli("train", "digits", "simple_cnn", *TINY, "--fold", "1", "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "--fold K needs --folds" in res.output
    res = _cli("train", "digits", "simple_cnn", *TINY, "--folds", "1", "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "at least 2" in res.output


def test_masks_folds_keep_each_person_in_one_fold(tmp_path):
    data = make_masks(tmp_path / "masks", n_people=6)
    runs = tmp_path / "runs"
    res = _cli("train", "masks", "simple_cnn", "--data", data, *QUICK, "--folds", "7", "--runs-dir", runs)
    assert res.exit_code == 2 and "only 6 groups" in res.output and "--folds 6 or fewer" in res.output
    assert len(_rows(runs)) == 0  # nothing trained
    res = _cli("train", "masks", "simple_cnn", "--data", data, *QUICK, "--folds", "3", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    store = RunStore(runs)
    cv = store.load(_rows(runs, kind="cv")["id"].iloc[0])
    assert len(cv.valid_ids) == 42 and len(set(cv.valid_ids)) == 42
    people = [{i.split("/")[0] for i in store.load(r).valid_ids} for r in cv.config["fold_runs"]]
    assert all(p for p in people) and sum(map(len, people)) == 6  # no person in two folds


# -- noisy student ------------------------------------------------------------------------------------------------
def test_pseudo_label_adds_exactly_the_items_above_the_threshold(cv_store):
    store = RunStore(cv_store)
    teacher = store.load("plain")
    from fastcls.predict import run_tta_beta, tta_blend
    conf = tta_blend(teacher.test_probs, run_tta_beta(teacher.meta)).max(1)
    thr = float(np.quantile(conf, 0.6))
    expected = int((conf >= thr).sum())
    assert 0 < expected < len(conf)
    res = _cli("pseudo-label", "plain", "--threshold", thr, "--rounds", "2", "--runs-dir", cv_store, "--quiet")
    assert res.exit_code == 0, res.output
    rounds = _rows(cv_store, kind="pseudo").sort_values("name")
    assert len(rounds) == 2
    first, second = (store.load(i) for i in rounds["id"])
    info = first.meta["pseudo"]
    assert info["pseudo"] == expected and info["new"] == expected and info["teachers"] == [teacher.id]
    assert first.metrics["n_train"] == teacher.metrics["n_train"] + expected
    assert first.valid_ids == teacher.valid_ids  # the student validates on the teacher's split
    conf2 = tta_blend(first.test_probs, run_tta_beta(first.meta)).max(1)
    assert second.meta["pseudo"]["pseudo"] == int((conf2 >= thr).sum())  # round 2's teacher is round 1's student
    assert second.meta["pseudo"]["teachers"] == [first.id]
    assert "relabelled" in res.output and "round" in res.output


def test_pseudo_label_errors(cv_store):
    n = len(_rows(cv_store))
    res = _cli("pseudo-label", "plain", "--threshold", "1.0", "--runs-dir", cv_store)
    assert res.exit_code == 2 and "selects none of the" in res.output and "Lower --threshold" in res.output
    store = RunStore(cv_store)
    plain = store.load("plain")
    store.save(RunData(config=plain.config, vocab=plain.vocab, valid_probs=np.asarray(plain.valid_probs),
                       valid_targets=np.asarray(plain.valid_targets), valid_ids=plain.valid_ids,
                       metrics=plain.metrics, name="no-test"))
    res = _cli("pseudo-label", "no-test", "--runs-dir", cv_store)
    assert res.exit_code == 2 and "no stored test probabilities" in res.output
    assert len(_rows(cv_store)) == n + 1  # only the fake teacher


# -- distillation -------------------------------------------------------------------------------------------------
def test_distill_loss_known_case():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]])
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 0.0]])
    target = torch.tensor([0, 2, 1])
    has_soft, has_hard = torch.tensor([True, True, False]), torch.tensor([True, False, True])
    T, a = 2.0, 0.3

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()
    z, p = logits.numpy().astype(np.float64), soft.numpy().astype(np.float64)
    want = []
    for i in range(3):
        pt = softmax(np.log(np.clip(p[i], 1e-12, None)) / T)
        kl = float((pt * (np.log(pt) - np.log(softmax(z[i] / T)))).sum()) * T * T
        ce = float(-np.log(softmax(z[i])[target[i]]))
        want.append([a * kl + (1 - a) * ce, kl, ce][i])  # both terms / soft only / hard only
    got = distill_loss(logits, target, soft, has_soft, has_hard, T, a)
    assert got.item() == pytest.approx(np.mean(want), rel=1e-5)
    # alpha 0 on fully labelled rows is the plain cross-entropy
    ones = torch.ones(3, dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert distill_loss(logits, target, soft + 1 / 3, ones, ones, T, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_distill_from_cv_oof_stores_a_student_trained_on_the_soft_targets(cv_store):
    store = RunStore(cv_store)
    cv = _cv(cv_store, "simple_cnn")
    # a teacher whose OOF probabilities all say class '3': with alpha=1 only the soft targets train the student.
    # One epoch, because the stored student is its best epoch on the hard labels (all-'3' epochs tie at accuracy 0.1,
    # so the earliest, least trained one would be kept); bs 4 (40 steps, not 5) so that epoch predicts '3' in eval mode
    # too (BatchNorm running statistics settled), not by chance from a near-uniform output.
    fake = np.zeros_like(np.asarray(cv.valid_probs))
    fake[..., 3] = 1.0
    store.save(RunData(config={**cv.config, "bs": 4}, vocab=cv.vocab, valid_probs=fake,
                       valid_targets=np.asarray(cv.valid_targets), valid_ids=cv.valid_ids, metrics=cv.metrics,
                       test_probs=np.asarray(cv.test_probs), test_ids=cv.test_ids, kind="cv", name="all-threes"))
    res = _cli("distill", "all-threes", "--arch", "simple_cnn", "--alpha", "1", "--temperature", "1", "--epochs",
               "1", "--lr", "0.01", "--runs-dir", cv_store, "--quiet", "--name", "threes-student")
    assert res.exit_code == 0, res.output
    st = store.load("threes-student")
    assert st.kind == "distill" and st.valid_probs.shape == (2, 40, 10) and st.test_probs is not None
    assert st.meta["distill"]["soft_train_items"] == 160  # the cv covers every training item
    assert (np.asarray(st.valid_probs[0]).argmax(1) == 3).mean() > 0.8  # it learned the soft targets, not labels
    res = _cli("distill", cv.id, "--arch", "simple_cnn", "--unlabeled", "--runs-dir", cv_store, "--quiet")
    assert res.exit_code == 0, res.output
    assert "teacher" in res.output and "student" in res.output
    new = store.load(_rows(cv_store, kind="distill")["id"].iloc[0])
    assert new.meta["distill"]["soft_test_items"] == len(cv.test_ids)
    assert new.metrics["n_train"] == 160 + len(cv.test_ids)


def test_distill_errors(cv_store):
    store = RunStore(cv_store)
    plain = store.load("plain")
    res = _cli("distill", "plain", "--arch", "simple_cnn", "--runs-dir", cv_store)
    assert res.exit_code == 2 and "none of the student's" in res.output and "--folds" in res.output
    vocab = [str(v) for v in plain.vocab]
    other = vocab[:-1] + ["ten"]
    store.save(RunData(config=plain.config, vocab=other, valid_probs=np.asarray(plain.valid_probs),
                       valid_targets=np.asarray(plain.valid_targets), valid_ids=plain.valid_ids,
                       metrics=plain.metrics, test_probs=np.asarray(plain.test_probs), test_ids=plain.test_ids,
                       name="other-vocab"))
    res = _cli("distill", "plain", "other-vocab", "--arch", "simple_cnn", "--runs-dir", cv_store)
    assert res.exit_code == 2 and "different vocabularies" in res.output
    res = _cli("distill", "plain", "--arch", "simple_cnn", "--alpha", "1.5", "--runs-dir", cv_store)
    assert res.exit_code == 2 and "--alpha" in res.output


# -- probes ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clf", ["logreg", "lda", "hgb"])
def test_probe_stores_a_run_that_ensembles(cv_store, clf):
    res = _cli("probe", "digits", "simple_cnn", "--clf", clf, "--size", "16", "--sample", "200", "--tta", "1",
               "--no-pretrained", "--quiet", "--name", f"probe-{clf}", "--runs-dir", cv_store)
    assert res.exit_code == 0, res.output
    store = RunStore(cv_store)
    run = store.load(f"probe-{clf}")
    assert run.kind == "probe" and run.config["probe"] == clf
    assert run.valid_probs.shape == (2, 40, 10) and run.test_probs.shape[1] == len(run.test_ids)
    assert run.metrics["accuracy"] > 0.3  # pooled features of even a random body separate digits
    res = _cli("ensemble", f"probe-{clf}", "plain", "--runs-dir", cv_store)
    assert res.exit_code == 0, res.output
    assert (store.root / "cache" / "features").is_dir()


def test_probe_bad_classifier(tmp_path):
    res = _cli("probe", "digits", "simple_cnn", "--clf", "svm", "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "logreg, lda, hgb" in res.output


@pytest.mark.parametrize("kind, command", [("pseudo", "fastcls pseudo-label"), ("distill", "fastcls distill")])
def test_an_interrupted_student_is_not_resumed_from_the_recipes_data(tmp_path, kind, command):
    store = RunStore(tmp_path / "runs")
    rid = store.begin(RunConfig.from_options("digits", "simple_cnn").to_dict(), kind=kind)
    store.set_status(rid, "interrupted", note="interrupted (Ctrl-C) after 1 of 2 epochs")
    res = _cli("resume", rid, "--runs-dir", store.root)
    assert res.exit_code == 2 and "cannot be resumed" in res.output and command in res.output
    assert store.resolve(rid)["status"] == "interrupted", "the refusal changes nothing in the store"


def test_ctrl_c_in_a_student_points_to_its_command(tmp_path, monkeypatch):
    import fastcls.train.run as ftrain
    from fastcls.errors import RunInterrupted

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ftrain, "train", interrupted)
    cfg = RunConfig.from_options("digits", "simple_cnn", size=16, epochs=1, sample=60, tta=0, pretrained=False)
    store = RunStore(tmp_path / "runs")
    with pytest.raises(RunInterrupted, match="built by `fastcls pseudo-label`") as e:
        ftrain.fit_run(cfg, store, progress="none", kind="pseudo")
    assert "fastcls resume" not in str(e.value)
    assert store.leaderboard(status="interrupted")["kind"].tolist() == ["pseudo"]


def test_the_cv_run_is_assembled_under_a_store_lock(tmp_path, monkeypatch):
    """Two processes finishing the last folds at once (`--fold K` each) must not both store a cv run: the check for
    a stored cv run and its assembly run under the store lock named by the cv id."""
    fcntl = pytest.importorskip("fcntl")
    runs = tmp_path / "runs"
    store = RunStore(runs)
    held = []
    real = RunStore.exclusive

    def spy(self, key):
        held.append(key)
        with real(self, key):
            fd = os.open(self.root / f".{key}.lock", os.O_RDWR)
            with pytest.raises(BlockingIOError):  # another process would wait here
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.close(fd)
            yield
    monkeypatch.setattr(RunStore, "exclusive", contextlib.contextmanager(spy))
    res = _cli("train", "digits", "simple_cnn", *TINY, "--sample", "60", "--folds", "2", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    [cv_id] = held
    assert cv_id.startswith("cv-") and store.load(cv_id).kind == "cv"
    fd = os.open(runs / f".{cv_id}.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released afterwards
    os.close(fd)
