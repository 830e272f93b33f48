"""`fastcls predict` / `fastcls export`: predicting new images reproduces what the store holds (runs, cv runs, every
ensemble method), an exported folder predicts offline in a fresh process, and bad input is refused cleanly."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastcls.ensemble import ensemble
from fastcls.errors import FastclsError
from fastcls.inference import export, predict
from fastcls.runs import RunStore

from ._proc import child_env
from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
# one deterministic view (no random TTA views): stored probabilities are reproducible exactly
PLAIN = [a if a != "1" or TINY[i - 1] != "--tta" else "0" for i, a in enumerate(TINY)]
METHODS = ["mean", "weighted", "hill", "rank", "vote", "stack"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from typer.testing import CliRunner
    from fastcls.cli import app
    root = tmp_path_factory.mktemp("runs")
    for args in (["--name", "a"], ["--name", "b", "--size", "24", "--ps", "0.1"], ["--name", "t", "--tta", "2"],
                 ["--name", "k", "--folds", "2"], ["--name", "p", "--tune-thresholds", "--imbalance", "logit-adjust"],
                 ["--name", "m", "--set", "sub_format=topk", "--set", "sub_k=3"],
                 ["--name", "v", "--tta-views", "flip,crop5,scale"]):
        res = CliRunner().invoke(app, ["train", "digits", "simple_cnn", *PLAIN, *args, "--runs-dir", str(root)])
        assert res.exit_code == 0, res.output
    return RunStore(root)


@pytest.fixture(scope="module")
def images(store, tmp_path_factory):
    """The digits test set as PNG files: grayscale (one channel) and RGBA, named by item id."""
    from sklearn.datasets import load_digits
    folder = tmp_path_factory.mktemp("test-images")
    d = np.clip(load_digits().images * 16, 0, 255).astype(np.uint8)
    for i in range(1500, len(d)):
        img = Image.fromarray(d[i])
        (img if i % 2 else img.convert("RGBA")).save(folder / f"digit-{i:04d}.png")
    return folder


def _stored(store, ref):
    return np.asarray(store.load(ref).test_probs)


def test_run_reproduces_stored_views(store):
    """Plain view exactly; the TTA views are as many, augmented (random), and blended as `fastcls submit` does."""
    run = store.load("t")
    res = predict(store, "t")
    views = res.members[run.id]
    assert views.shape == run.test_probs.shape == (3, 297, 10)
    np.testing.assert_allclose(views[0], run.test_probs[0], atol=1e-4)
    assert np.abs(views[1] - views[0]).max() > 1e-5  # augmented views differ from the plain one (exact equal: 0)
    np.testing.assert_allclose(res.probs, 0.25 * views[0] + 0.75 * views[1:].mean(0), atol=1e-6)
    assert res.ids == list(run.test_ids)
    plain = predict(store, "a")
    np.testing.assert_allclose(plain.probs, _stored(store, "a")[0], atol=1e-4)


def test_named_views_are_stored_and_reproduced_exactly(store):
    """--tta-views flip,crop5,scale: 1 + 1 + 5 + 2 deterministic views stored, each reproduced by predict; the blend
    is the one `fastcls submit` writes."""
    run = store.load("v")
    assert run.config["tta_views"] == ["flip", "crop5", "scale"]
    assert run.test_probs.shape == run.valid_probs.shape[:1] + (297, 10) == (9, 297, 10)
    res = predict(store, "v")
    views = res.members[run.id]
    np.testing.assert_allclose(views, run.test_probs, atol=1e-4)
    for k in range(1, 9):  # each view is its own picture
        assert np.abs(views[k] - views[0]).max() > 1e-4, k
    np.testing.assert_allclose(res.probs, 0.25 * views[0] + 0.75 * views[1:].mean(0), atol=1e-6)
    np.testing.assert_allclose(predict(store, "v", tta=False).probs, run.test_probs[0], atol=1e-4)


def test_posthoc_steps_are_applied(store):
    """A run with logit adjustment and tuned thresholds: its stored (adjusted) test probabilities are reproduced."""
    run = store.load("p")
    assert run.meta["posthoc"]["offsets"] is not None and run.meta["posthoc"]["tau"] is not None
    np.testing.assert_allclose(predict(store, "p").probs, run.test_probs[0], atol=1e-4)


def test_cv_run_averages_its_folds(store):
    cv = store.load("k")
    assert cv.kind == "cv"
    res = predict(store, cv.id)
    np.testing.assert_allclose(res.probs, cv.test_probs[0], atol=1e-4)
    one = predict(store, cv.config["fold_runs"][0]).probs
    assert np.abs(one - res.probs).max() > 1e-4  # not just one fold


@pytest.mark.parametrize("method", METHODS)
def test_ensemble_reproduces_stored_probs(store, method):
    kw = {"weights": [0.7, 0.3]} if method == "vote" else {}
    ens = ensemble(store, ["a", "b"], method=method, n_boot=0, folds=3, **kw)
    res = predict(store, ens.run_id)
    np.testing.assert_allclose(res.probs, _stored(store, ens.run_id)[0], atol=1e-4)
    assert len(res.members) == 2


def test_folder_of_images_and_csv_match_the_arrays(store, images, tmp_path):
    """PNG files of other channel counts (L, RGBA) go through the run's own RGB conversion: the same predictions."""
    run = store.load("a")
    res = predict(store, "a", data=images, out=tmp_path / "sub.csv", probs_out=tmp_path / "p.npz")
    order = [res.ids.index(f"{i}.png") for i in run.test_ids]
    np.testing.assert_allclose(res.probs[order], run.test_probs[0], atol=1e-4)
    sub = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    assert list(sub.columns) == ["id", "label"] and len(sub) == 297
    z = np.load(tmp_path / "p.npz", allow_pickle=False)
    np.testing.assert_array_equal(z["probs"], res.probs)
    pd.DataFrame({"path": [f"{images.name}/{i}" for i in res.ids[:5]]}).to_csv(images.parent / "few.csv", index=False)
    few = predict(store, "a", data=images.parent / "few.csv")
    np.testing.assert_allclose(few.probs, res.probs[:5], atol=1e-6)


def test_predict_writes_the_recipes_submission_format(store, images, tmp_path, cli):
    """A MAP@3 recipe (sub_format=topk, sub_k=3): `fastcls predict` writes three guesses per image, best first, the
    as `fastcls submit` writes from the stored test probabilities (the images named after the test ids)."""
    res = cli("predict", "m", "--data", images, "--out", tmp_path / "sub.csv", "--probs", tmp_path / "p.npz",
              "--runs-dir", store.root)
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    z = np.load(tmp_path / "p.npz", allow_pickle=False)
    vocab = [str(v) for v in z["vocab"]]
    best3 = [" ".join(vocab[k] for k in np.argsort(-p, kind="stable")[:3]) for p in z["probs"]]
    assert list(sub.columns) == ["id", "label"] and sub["label"].tolist() == best3
    assert all(len(set(g.split())) == 3 for g in sub["label"])
    assert cli("submit", "m", "--out", tmp_path / "stored.csv", "--runs-dir", store.root).exit_code == 0
    stored = pd.read_csv(tmp_path / "stored.csv", dtype=str)
    stored = stored.set_index(stored["id"].str.removesuffix(".png"))["label"]
    assert stored.reindex(sub["id"].str.removesuffix(".png")).tolist() == sub["label"].tolist()  # the same model


def test_export_predicts_offline_in_a_fresh_process(store, images, tmp_path):
    """An exported stacked ensemble of a cv run and a run predicts from another folder, with the store deleted."""
    cv_id = store.load("k").id
    ens = ensemble(store, ["a", "b"], method="stack", n_boot=0, folds=3)
    predict(store, ens.run_id, data=images, out=tmp_path / "want.csv")
    bundle = export(store, ens.run_id, tmp_path / "bundle")
    cv_bundle = export(store, cv_id, tmp_path / "cv-bundle")
    man = json.loads((bundle / "manifest.json").read_text())
    assert man["format"] == 1 and man["combine"]["method"] == "stack" and len(man["members"]) == 2
    assert all(len(n["sha256"]) == 64 for m in man["members"] for n in m["nets"])
    cv_want = predict(store, cv_id, data=images).probs
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(store.root, tmp_path / "store-backup")
    shutil.rmtree(store.root)
    try:
        p = subprocess.run([sys.executable, "-m", "fastcls", "predict", str(bundle), "--data", str(images), "--out",
                            "got.csv"], cwd=moved, env=child_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert (moved / "got.csv").read_text() == (tmp_path / "want.csv").read_text()
        assert not (moved / "runs").exists()
        np.testing.assert_allclose(predict(cv_bundle, data=images).probs, cv_want, atol=1e-6)
    finally:
        shutil.copytree(tmp_path / "store-backup", store.root)


def test_bad_bundles_are_refused(store, images, tmp_path, cli):
    bundle = export(store, "a", tmp_path / "b")
    man = json.loads((bundle / "manifest.json").read_text())
    w = bundle / man["members"][0]["nets"][0]["weights"]
    blob = bytearray(w.read_bytes())
    blob[-1] ^= 1
    w.write_bytes(bytes(blob))
    res = cli("predict", bundle, "--data", images, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 2 and "does not match the checksum" in res.output and w.name in res.output
    assert not (tmp_path / "sub.csv").exists() and "Traceback" not in res.output
    w.unlink()
    res = cli("predict", bundle, "--data", images, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 2 and "missing" in res.output and not (tmp_path / "sub.csv").exists()
    newer = export(store, "a", tmp_path / "newer")
    (newer / "manifest.json").write_text(json.dumps({**man, "format": 99}))
    with pytest.raises(FastclsError, match="format version 99"):
        predict(newer, data=images)
    with pytest.raises(FastclsError, match="not empty"):
        export(store, "a", newer)


def test_unreadable_images(store, images, tmp_path, cli):
    folder = tmp_path / "imgs"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"not a png")
    res = cli("predict", "a", "--runs-dir", store.root, "--data", folder, "--out", tmp_path / "sub.csv")
    assert res.exit_code == 2 and "broken.png" in res.output and not (tmp_path / "sub.csv").exists()
    res = predict(store, "a", data=folder, on_bad_image="skip", out=tmp_path / "sub.csv")
    assert [b["id"] for b in res.bad] == ["broken.png"] and "broken.png" in res.ids
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 298


def test_missing_store_weights(store, tmp_path):
    run = store.load("b")
    moved = tmp_path / "w.safetensors"
    shutil.move(run.weights_path, moved)
    try:
        with pytest.raises(FastclsError, match="no weights file"):
            predict(store, "b", out=tmp_path / "x.csv")
        assert not (tmp_path / "x.csv").exists()
    finally:
        shutil.move(moved, run.weights_path)
    assert os.path.exists(run.weights_path)
