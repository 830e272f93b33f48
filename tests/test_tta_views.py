"""--tta-views: the deterministic views' pixels (flip is the mirror image, crop5 the 4 corners and the centre of
87.5% of the side resized back, scale zoomed in x1.25 and out x0.8), checked against PIL's crop and resize; the
names are validated and recorded."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.predict import named_views, view_count

from .test_cli import _assert_clean_error

S = 16  # crops of round(16 * 0.875) = 14 px


@pytest.fixture
def img():
    """A 16 x 16 single-channel float image with no symmetry (every pixel distinct)."""
    rng = np.random.default_rng(0)
    return rng.random((S, S)).astype(np.float32)


def _pil(a: np.ndarray, box=None, size=None) -> np.ndarray:
    """PIL's crop (left, upper, right, lower) then bilinear resize of a float image: the independent reference."""
    im = Image.fromarray(a, mode="F")
    if box is not None:
        im = im.crop(box)
    if size is not None:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im)


def _views(name, a):
    x = torch.from_numpy(a)[None, None].repeat(2, 3, 1, 1)  # a batch of 2 RGB images
    out = named_views(name, x)
    for v in out:
        assert v.shape == x.shape
        assert torch.equal(v[0], v[1]) and torch.equal(v[0, 0], v[0, 2])  # per image, per channel alike
    return [v[0, 0].numpy() for v in out]


def test_flip_is_the_mirror_image(img):
    (v,) = _views("flip", img)
    np.testing.assert_array_equal(v, img[:, ::-1])


def test_crop5_is_the_four_corners_and_the_centre(img):
    views = _views("crop5", img)
    c = 14
    boxes = [(0, 0, c, c), (S - c, 0, S, c), (0, S - c, c, S), (S - c, S - c, S, S), (1, 1, 1 + c, 1 + c)]
    assert len(views) == 5
    for v, box in zip(views, boxes):
        np.testing.assert_allclose(v, _pil(img, box, (S, S)), atol=1e-5)


def test_scale_zooms_in_and_out(img):
    zin, zout = _views("scale", img)
    c = round(S / 1.25)  # 13: the centre 13 x 13, from (1, 1)
    np.testing.assert_allclose(zin, _pil(img, (1, 1, 1 + c, 1 + c), (S, S)), atol=1e-5)
    small = round(S * 0.8)  # 13 px, padded by 1 above/left and 2 below/right, mirrored at the edge
    shrunk = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(small, small), mode="bilinear",
                                             antialias=True)[0, 0].numpy()
    np.testing.assert_allclose(shrunk, _pil(img, None, (small, small)), atol=2e-2)  # antialiased like PIL's reduce
    np.testing.assert_allclose(zout, np.pad(shrunk, ((1, 2), (1, 2)), mode="reflect"), atol=1e-6)


def test_names_are_validated_recorded_and_counted():
    cfg = RunConfig.from_options("digits", "simple_cnn", tta_views="flip,crop5", tta=2)
    assert cfg.recipe.tta_views == ("flip", "crop5")
    assert cfg.to_dict()["tta_views"] == ["flip", "crop5"]
    assert RunConfig.from_dict(cfg.to_dict()).recipe.tta_views == ("flip", "crop5")
    assert view_count(cfg.recipe) == 1 + 1 + 5 + 2
    assert RunConfig.from_options("digits", sets=["tta_views=scale"]).recipe.tta_views == ("scale",)
    for bad in ("flip,mirror", "flip,flip"):
        with pytest.raises(FastclsError, match="'tta_views' must be distinct names among flip, crop5, scale"):
            RunConfig.from_options("digits", tta_views=bad)


def test_cli_refuses_an_unknown_view(cli, tmp_path):
    res = cli("train", "digits", "simple_cnn", "--tta-views", "flip,rot90", "--runs-dir", tmp_path / "runs")
    _assert_clean_error(res, "'tta_views' must be distinct names among flip, crop5, scale", runs=tmp_path / "runs")


# -- the TTA blend a run chooses on valid ---------------------------------------------------------------------------

def _two_views(plain_right: bool, n: int = 6):
    """Views (3, n, 2) of targets y: the right view(s) mildly right (0.6), the others confidently wrong (0.9); only
    beta 1 (plain_right: the plain view is right) or 0 (the two augmented views are) gets every row right."""
    y = np.arange(n) % 2
    right, wrong = np.eye(2)[y], np.eye(2)[1 - y]
    mild, bad = 0.6 * right + 0.4 * wrong, 0.1 * right + 0.9 * wrong
    plain, aug = (mild, bad) if plain_right else (bad, mild)
    return np.stack([plain, aug, aug]).astype(np.float32), y


def test_the_blend_is_the_best_on_valid_and_ties_keep_fastais():
    from fastcls.predict import choose_tta_beta
    views, y = _two_views(plain_right=True)
    assert choose_tta_beta(views, y, "accuracy") == 1.0  # augmented views that hurt: the plain view
    views, y = _two_views(plain_right=False)
    assert choose_tta_beta(views, y, "accuracy") == 0.0
    assert choose_tta_beta(views, y, "log_loss") == 0.0  # a lower-is-better metric, its direction followed
    same = np.repeat(views[1:2], 3, axis=0)
    assert choose_tta_beta(same, y, "accuracy") == 0.25  # all blends equal: fastai's default
    assert choose_tta_beta(views[:1], y, "accuracy") == 1.0  # no TTA views


def test_a_run_records_its_blend_scores_and_submits_with_it(digits_copy, cli, tmp_path):
    from fastcls.metrics import get_metric
    from fastcls.predict import BETA_GRID, tta_blend
    from fastcls.runs import RunData, RunStore
    store = RunStore(digits_copy)
    run = store.load("tiny-digits")
    beta, name = run.metrics["tta_beta"], run.metrics["metric_name"]
    vp, vt = np.asarray(run.valid_probs), np.asarray(run.valid_targets)
    assert beta in BETA_GRID and vp.shape[0] > 1 and run.meta["tta_beta"] == beta  # meta.json: what predicting reads
    assert run.metrics[f"{name}_tta"] == pytest.approx(get_metric(name)(vt, tta_blend(vp, beta)))
    # a stored run whose test views disagree: `submit` follows the run's beta unless --tta-beta is given
    views, _ = _two_views(plain_right=True, n=len(run.test_ids))
    ten = np.zeros((3, len(run.test_ids), len(run.vocab)), np.float32)
    ten[:, :, :2] = views
    for b, want in ((1.0, views[0].argmax(1)), (0.0, views[1].argmax(1))):
        store.save(RunData(config=run.config, vocab=run.vocab, valid_probs=vp, valid_targets=vt,
                           valid_ids=run.valid_ids, metrics={**run.metrics, "tta_beta": b}, test_probs=ten,
                           test_ids=run.test_ids, name=f"beta-{b}"))
        out = tmp_path / f"sub-{b}.csv"
        res = cli("submit", f"beta-{b}", "--out", out, "--runs-dir", digits_copy)
        assert res.exit_code == 0, res.output
        got = pd.read_csv(out).iloc[:, 1].astype(str).tolist()
        assert got == [str(run.vocab[k]) for k in want]
    res = cli("submit", "beta-1.0", "--out", tmp_path / "fixed.csv", "--tta-beta", "0", "--runs-dir", digits_copy)
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "fixed.csv").iloc[:, 1].astype(str).tolist() == \
        [str(run.vocab[k]) for k in views[1].argmax(1)]
    # each recorded submission's local score is the valid score of what its file holds, on a run whose valid views
    # disagree (scored by log loss: every blend scores differently)
    from fastcls.files import read_json
    vv, vy = _two_views(plain_right=False, n=len(run.valid_ids))
    wide = np.zeros((3, len(vy), len(run.vocab)), np.float32)
    wide[:, :, :2] = vv
    ll = get_metric("log_loss")
    store.save(RunData(config=run.config, vocab=run.vocab, valid_probs=wide, valid_targets=vy, valid_ids=run.valid_ids,
                       metrics={"metric_name": "log_loss", "log_loss": ll(vy, wide[0]), "tta_beta": 0.0,
                                "log_loss_tta": ll(vy, tta_blend(wide, 0.0))},
                       test_probs=ten, test_ids=run.test_ids, name="disagree"))
    for opts in ((), ("--no-tta",), ("--tta-beta", "0.75")):
        assert cli("submit", "disagree", "--out", tmp_path / "s.csv", *opts, "--runs-dir", digits_copy).exit_code == 0
    recs = read_json(digits_copy / "submissions.json")[-3:]
    assert [r["tta_beta"] for r in recs] == [0.0, None, 0.75]
    want = [ll(vy, tta_blend(wide, 0.0)), ll(vy, wide[0]), ll(vy, tta_blend(wide, 0.75))]
    assert len(set(want)) == 3 and [r["local"] for r in recs] == pytest.approx(want)


def test_a_fixed_blend_is_a_recipe_setting():
    from fastcls.recipe import get_recipe
    from fastcls.train.run import Predictions, run_metrics
    views, y = _two_views(plain_right=True)
    preds = Predictions(vocab=["a", "b"], valid_ids=[str(i) for i in y], valid_probs=views, valid_targets=y)
    recipe = get_recipe("digits").override(metric="accuracy", monitor=None)
    assert run_metrics(recipe, preds, None, 10)["accuracy_tta"] == 1.0  # chosen: beta 1
    m = run_metrics(recipe.override(tta_blend=0.25), preds, None, 10)
    assert m["tta_beta"] == 0.25 and m["accuracy_tta"] == 0.0
    with pytest.raises(FastclsError, match="'tta_blend' must be in"):
        recipe.override(tta_blend=1.5)


def test_an_ensemble_of_runs_that_chose_their_blends(digits_copy, cli, tmp_path):
    """An ensemble's config lists its members' blends (`tta_beta`); that key is not a recipe setting, so reading the
    ensemble back (show, submit) works."""
    from fastcls.runs import RunData, RunStore
    store = RunStore(digits_copy)
    run = store.load("tiny-digits")
    store.save(RunData(config=run.config, vocab=run.vocab, valid_probs=np.asarray(run.valid_probs)[::-1].copy(),
                       valid_targets=np.asarray(run.valid_targets), valid_ids=run.valid_ids, metrics=run.metrics,
                       test_probs=np.asarray(run.test_probs), test_ids=run.test_ids, name="twin"))
    res = cli("ensemble", "tiny-digits", "twin", "--name", "ens-of-two", "--submission", tmp_path / "sub.csv",
              "--runs-dir", digits_copy)
    assert res.exit_code == 0, res.output
    assert cli("show", "ens-of-two", "--runs-dir", digits_copy).exit_code == 0
    assert len(store.load("ens-of-two").config["tta_beta"]) == 2  # the members' blends, as the ensemble chose them
    store.save(RunData(config={**run.config, "tta_blend": 0.5}, vocab=run.vocab, valid_probs=np.asarray(run.valid_probs),
                       valid_targets=np.asarray(run.valid_targets), valid_ids=run.valid_ids, metrics=run.metrics,
                       name="fixed-blend"))
    assert cli("ensemble", "twin", "fixed-blend", "--name", "ens-fixed", "--runs-dir", digits_copy).exit_code == 0
    assert store.load("ens-fixed").config["tta_beta"][1] == 0.5  # a member's fixed blend is kept, not chosen again
    assert len(pd.read_csv(tmp_path / "sub.csv")) == len(run.test_ids)


def test_the_blend_setting_keeps_the_ids_made_before_it():
    """cv ids, sweep ids and feature-cache keys hash the recipe: `tta_blend` at its default must leave them as they
    were before the field existed (a cv started then finds its folds; a feature cache still hits)."""
    from fastcls.experiments.cv import cv_id
    from fastcls.experiments.features import HEAD_ONLY
    cfg = RunConfig.from_options("digits", "simple_cnn", seed=3)
    assert cv_id(cfg, 5) == "cv-2f6f4ff4a3"  # computed by the fastcls of commit 3e0b7d8, before the field
    assert "tta_blend" not in cfg.recipe.id_dict() and "tta_blend" in HEAD_ONLY
    assert cfg.recipe.override(tta_blend=0.5).id_dict()["tta_blend"] == 0.5  # a set value is part of the id
