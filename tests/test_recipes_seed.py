"""The seed competitions' recipes: layouts (real simpsons data, synthetic fixtures in the exact layouts for the others),
a tiny run each, submissions in each competition's exact format, the masks person split, crops, `fastcls check`."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from fastai.data.transforms import Normalize
from PIL import Image

from fastcls.config import RunConfig
from fastcls.data import check_data, dls, read_items
from fastcls.errors import FastclsError
from fastcls.recipe import get_recipe
from fastcls.submission import neutralise, write_submission

from .conftest import shared_data

# a 15-person masks fixture has classes of 2-3 images: sklearn's StratifiedGroupKFold warns, as expected
pytestmark = [pytest.mark.filterwarnings("ignore:The least populated class:UserWarning"),
              pytest.mark.usefixtures("one_thread")]  # one torch thread (conftest): see test_imbalance_train

# tiny training options shared by the recipe runs (the recipes' own archs and sizes are far too big for tests)
QUICK = ["--size", "16", "--epochs", "1", "--freeze-epochs", "0", "--bs", "16", "--tta", "1", "--no-pretrained",
         "--quiet"]


# -- synthetic fixtures in the competitions' exact layouts ------------------------------------------------------------
def _img(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_tshirts(root, classes=("floral", "striped", "plain"), n=6, n_test=5):
    """train.csv (image, class) + test.csv (image), photos in images/, tall enough for the seed's pixel trim."""
    rows = []
    for ci, c in enumerate(classes):
        for i in range(n):
            name = f"{c}_{i}.jpg"
            _img(root / "images" / name, (160, 560), (90 * ci, 20 * i, 60))
            rows.append((name, c))
    pd.DataFrame(rows, columns=["image", "class"]).to_csv(root / "train.csv", index=False)
    tests = [f"t{i}.jpg" for i in range(n_test)]
    for i, name in enumerate(tests):
        _img(root / "images" / name, (160, 560), (0, 40 * i, 90))
    pd.DataFrame({"image": tests}).to_csv(root / "test.csv", index=False)
    return root


def make_generated64(root, n_classes=4, n_train=5, n_val=2, n_test=6):
    """train.csv / val.csv (Image, Class), test.csv (Image), with train_images/, val_images/, test_images/."""
    for split, n in (("train", n_train), ("val", n_val)):
        rows = []
        for c in range(n_classes):
            for i in range(n):
                name = f"{c}_{i}.png"  # the same names in train and val: ids must still be unique
                _img(root / f"{split}_images" / name, (64, 64), (60 * c, 10 * i + (100 if split == "val" else 0), 30))
                rows.append((name, f"class_{c:02d}"))
        pd.DataFrame(rows, columns=["Image", "Class"]).to_csv(root / f"{split}.csv", index=False)
    tests = [f"test_{i}.png" for i in range(n_test)]
    for i, name in enumerate(tests):
        _img(root / "test_images" / name, (64, 64), (30 * i, 0, 0))
    pd.DataFrame({"Image": tests}).to_csv(root / "test.csv", index=False)
    return root


MASK_FILES = ["mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal"]


def make_masks(root, n_people=15, n_test=8):
    """train/train.csv + per-person folders of 7 images (mixed extensions), eval/info.csv + eval/images/."""
    people = []
    for p in range(n_people):
        gender, age = ("male", "female")[p % 2], (22, 45, 63)[p % 3]
        folder = f"{p:06d}_{gender}_Asian_{age}"
        people.append((f"{p:06d}", gender, "Asian", age, folder))
        for j, stem in enumerate(MASK_FILES):
            ext = ".png" if j % 3 == 0 else ".jpg"
            _img(root / "train" / "images" / folder / f"{stem}{ext}", (24, 32), (10 * j, 15 * p, 100 * (age > 30)))
        (root / "train" / "images" / folder / "._mask1.jpg").write_bytes(b"\0macOS fork")  # must be ignored
    table = pd.DataFrame(people, columns=["id", "gender", "race", "age", "path"])
    table.to_csv(root / "train" / "train.csv", index=False)
    ids = [f"{i:04x}abcd.jpg" for i in range(n_test)]
    for i, name in enumerate(ids):
        _img(root / "eval" / "images" / name, (24, 32), (20 * i, 0, 50))
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(root / "eval" / "info.csv", index=False)
    return root


def make_folder(root, classes=("ants", "bees", "wasps"), n=8, val=0, test=4, size=(40, 30), at_root=False):
    """Class folders in train/ (or at the root), optional val/ and test/."""
    base = root if at_root else root / "train"
    for ci, c in enumerate(classes):
        for i in range(n):
            _img(base / c / f"{c}{i}.png", size, (80 * ci, 12 * i, 0))
        for i in range(val):
            _img(root / "val" / c / f"{c}{i}.png", size, (80 * ci, 12 * i, 200))
    for i in range(test):
        _img(root / "test" / f"t{i}.jpg", size, (0, 0, 30 * i))
    return root


# -- every seed recipe: check, tiny run, submission in its exact format ---------------------------------------------
def _expect_simpsons(data):
    return "simple_cnn", ["Id", "Expected"], pd.read_csv(data / "sample_submission.csv")["Id"].tolist()


def _expect_tshirts(data):
    return "simple_cnn", ["image", "class"], pd.read_csv(data / "test.csv")["image"].tolist()


def _expect_generated64(data):
    return "seed_cnn64", ["Image", "Class"], pd.read_csv(data / "test.csv")["Image"].tolist()


def _expect_masks(data):
    return "simple_cnn", ["ImageID", "ans"], pd.read_csv(data / "eval" / "info.csv")["ImageID"].tolist()


def _expect_folder(data):
    return "simple_cnn", ["id", "label"], [f"t{i}.jpg" for i in range(4)]


SEED = {"simpsons": (None, _expect_simpsons), "tshirts": (make_tshirts, _expect_tshirts),
        "generated64": (make_generated64, _expect_generated64), "masks": (make_masks, _expect_masks),
        "folder": (make_folder, _expect_folder)}


@pytest.fixture
def seed_data(request, tmp_path):
    name = request.param
    make = SEED[name][0]
    return name, (shared_data("simpsons") if make is None else make(tmp_path / "data"))


@pytest.mark.parametrize("seed_data", sorted(SEED), indirect=True)
def test_seed_recipe_checks_trains_and_submits(cli, tmp_path, seed_data):
    name, data = seed_data
    arch, columns, ids = SEED[name][1](data)
    res = cli("recipes")
    assert res.exit_code == 0 and name in res.stdout
    res = cli("check", name, "--data", data)
    assert res.exit_code == 0, res.output
    assert "OK: the data folder matches the recipe" in res.stdout and f"{len(ids)} test images" in res.stdout
    runs = tmp_path / "runs"
    res = cli("train", name, arch, "--data", data, *QUICK, "--sample", 40, "--runs-dir", runs, "--name", "tiny")
    assert res.exit_code == 0, res.output
    out = tmp_path / "sub" / "submission.csv"
    res = cli("submit", "tiny", "--out", out, "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(sub.columns) == columns
    assert sub[columns[0]].tolist() == ids, "ids must be written as the competition expects, in its order"
    vocab = json.loads(next(p for p in runs.iterdir() if p.is_dir()).joinpath("vocab.json").read_text())
    if name == "masks":
        assert set(sub["ans"].astype(int)) <= set(range(18))
    else:
        assert set(sub[columns[1]]) <= set(vocab)
    assert not list(out.parent.glob(".*.tmp")), "no temporary file may be left behind"


# -- layouts, splits and the seed specifics ---------------------------------------------------------------------------
def test_simpsons_real_layout_and_test_labels():
    data = shared_data("simpsons")
    items = read_items(get_recipe("simpsons"), data)
    counts = items.train["label"].value_counts()
    assert len(items.train) == 324 and counts.size == 5 and counts.min() == 29
    assert len(items.test) == 95 and items.test["id"].str.match(r"img\d+\.jpg").all()
    truth = pd.read_csv(data / "test_solution.csv").set_index("Id")["Expected"]
    assert items.test.set_index("id")["label"].equals(truth.loc[items.test["id"]].rename("label").rename_axis("id"))


def test_simpsons_early_stopping_ends_the_run(tmp_path):
    """The recipe's patience stops the run `patience` epochs after its best one (macro-F1 monitored)."""
    from fastcls.runs import RunStore
    from fastcls.config import RunConfig
    from fastcls.train import fit_run
    data = shared_data("simpsons")
    assert get_recipe("simpsons").patience == 5 and get_recipe("simpsons").metric == "macro_f1"
    # a learning rate too small to change anything: macro-F1 stops improving at once
    r = get_recipe("simpsons").override(size=16, epochs=8, freeze_epochs=0, patience=1, lr=1e-9, pretrained=False,
                                        tta=0, bs=16, aug=False)
    res = fit_run(RunConfig(r, "simple_cnn", str(data), sample=40), RunStore(tmp_path), progress="none")
    assert len(res.history) < 8, "early stopping must end the run before its last epoch"
    assert len(res.history) == res.metrics["best_epoch"] + 1 + r.patience
    assert "macro_f1" in res.history.columns


def test_masks_classes_labels_and_person_split(tmp_path):
    data = make_masks(tmp_path)
    r = get_recipe("masks")
    items = read_items(r, data)
    assert len(items.train) == 15 * 7, "7 images per person; hidden '._' files are ignored"
    # person 1: female, 45 -> wear_female_30-59 (index 4), incorrect (10), not worn (16)
    p1 = items.train[items.train["group"] == "000001"].set_index("id")["label"]
    folder = "000001_female_Asian_45"
    for file, label, index in (("mask3.jpg", "wear_female_30-59", 4), ("normal.png", "not_wear_female_30-59", 16),
                               ("incorrect_mask.jpg", "incorrect_female_30-59", 10)):
        assert p1[f"{folder}/{file}"] == label and r.classes.index(label) == index
    assert r.classes[0] == "wear_male_0-29" and r.classes[17] == "not_wear_female_60+"
    for seed in range(5):
        d = dls(r.override(size=16, bs=8), items, seed=seed)
        train_people, valid_people = set(d.train_ds.items["group"]), set(d.valid_ds.items["group"])
        assert valid_people and not train_people & valid_people, "no person may be in both splits"
        assert list(d.vocab) == list(r.classes), "the vocab follows the seed's class order"


def test_masks_bad_row_is_a_clear_error(tmp_path):
    data = make_masks(tmp_path, n_people=3)
    df = pd.read_csv(data / "train" / "train.csv", dtype=str)
    df.loc[1, "gender"] = "unknown"
    df.to_csv(data / "train" / "train.csv", index=False)
    with pytest.raises(FastclsError, match=r"train.csv, row 3: gender 'unknown'"):
        read_items(get_recipe("masks"), data)


def test_generated64_given_split_and_own_normalisation(cli, tmp_path):
    data = make_generated64(tmp_path / "data")
    r = get_recipe("generated64")
    items = read_items(r, data)
    assert items.train["is_valid"].sum() == 8 and len(items.train) == 28 and items.train["id"].is_unique
    runs = tmp_path / "runs"
    res = cli("train", "generated64", "seed_cnn64", "--data", data, *QUICK, "--runs-dir", runs, "--name", "g")
    assert res.exit_code == 0, res.output
    run = next(p for p in runs.iterdir() if p.is_dir())
    valid_ids = json.loads((run / "valid_ids.json").read_text())
    assert sorted(valid_ids) == sorted(f"val_images/{c}_{i}.png" for c in range(4) for i in range(2)), \
        "the given val.csv split is used as is"
    stats = json.loads((run / "meta.json").read_text())["normalize_stats"]
    train_px = np.concatenate([np.asarray(Image.open(x), dtype=np.float32).reshape(-1, 3) / 255
                               for x in items.train.loc[~items.train["is_valid"], "x"]])
    np.testing.assert_allclose(stats[0], train_px.mean(0), atol=1e-4)
    np.testing.assert_allclose(stats[1], train_px.std(0), atol=1e-4)
    # the stored stats rebuild the same normalisation
    d = dls(r.override(size=16, aug=False), items, stats=stats)
    norm = [t for t in d.after_batch.fs if isinstance(t, Normalize)][0]  # fastai's, or fastcls's in-place subclass
    np.testing.assert_allclose(norm.mean.flatten().cpu().numpy(), stats[0], atol=1e-6)


def test_folder_recipe_infers_classes_size_and_split(tmp_path):
    r = get_recipe("folder")
    given = make_folder(tmp_path / "a", val=2, size=(40, 30))
    items = read_items(r, given)
    assert sorted(items.train["label"].unique()) == ["ants", "bees", "wasps"] and len(items.test) == 4
    d = dls(r.override(bs=4), items, seed=0)
    assert sorted(d.valid_ds.items["id"]) == sorted(f"val/{c}/{c}{i}.png" for c in ("ants", "bees", "wasps")
                                                     for i in range(2)), "a val/ folder is the split"
    assert d.one_batch()[0].shape[-1] == 32, "size inferred from 40x30 images: median shorter side 30 -> 32"
    flat = make_folder(tmp_path / "b", at_root=True, size=(100, 90))
    items = read_items(r, flat)
    assert sorted(items.train["label"].unique()) == ["ants", "bees", "wasps"], "test/ is not a class"
    d = dls(r.override(bs=4), items, seed=0)
    assert len(d.valid_ds) == 5 and d.valid_ds.items["label"].nunique() == 3, "else a stratified 20% split (of 24)"
    assert d.one_batch()[0].shape[-1] == 88


# -- crops on a known image, through the recipe's real pipeline -------------------------------------------------------
def _boxed(path, size, box, inside=(255, 0, 0), outside=(0, 0, 255)):
    img = Image.new("RGB", size, outside)
    img.paste(Image.new("RGB", (box[2] - box[0], box[3] - box[1]), inside), box[:2])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.mark.parametrize("crop, trim, size, box", [
    ("trim", None, (600, 1000), (50, 400, 550, 900)),  # the seed's pixels: 400 top, 100 bottom, 50 each side
    ("trim", "0.4,0.1,0.05,0.05", (1000, 1000), (50, 400, 950, 900)),  # the same margins as fractions
    (None, "400,100,50,50", (600, 1000), (50, 400, 550, 900)),  # --trim implies --crop trim
    ("center", None, (400, 800), (0, 200, 400, 600)),  # the central square of a tall photo
])
def test_crops_give_the_expected_box(tmp_path, crop, trim, size, box):
    data = tmp_path / "data"
    rows = []
    for i in range(4):
        _boxed(data / "images" / f"im{i}.png", size, box)
        rows.append((f"im{i}.png", "ab"[i % 2]))
    pd.DataFrame(rows, columns=["image", "class"]).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"image": ["im0.png"]}).to_csv(data / "test.csv", index=False)
    cfg = RunConfig.from_options("tshirts", "simple_cnn", data=data, size=24, crop=crop, trim=trim, aug=False,
                                 normalize="none", bs=2)
    d = dls(cfg.recipe, read_items(cfg.recipe, data), seed=0)
    for xb in (d.train.one_batch()[0], d.valid.one_batch()[0]):
        assert xb.shape[-2:] == (24, 24)
        assert torch.allclose(xb[:, 0], torch.ones(()), atol=1e-3) and xb[:, 2].abs().max() < 1e-3, \
            "the crop must keep exactly the coloured box"
    whole = dls(cfg.recipe.override(crop="none"), read_items(cfg.recipe, data), seed=0).valid.one_batch()[0]
    assert whole[:, 2].max() > 0.9, "without the crop the border is still there"


def test_trim_option_is_validated(cli, tmp_path):
    res = cli("train", "tshirts", "simple_cnn", "--trim", "400,100,50", "--data", tmp_path, "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "--trim takes 4 margins" in res.stderr.replace("\n", " ")


# -- fastcls check: planted problems ----------------------------------------------------------------------------------
def test_check_reports_an_unreadable_file(cli, tmp_path):
    data = make_folder(tmp_path / "data")
    (data / "train" / "bees" / "broken.jpg").write_bytes(b"this is not a jpeg")
    res = cli("check", "folder", "--data", data)
    assert res.exit_code == 1, res.output
    text = res.stdout.replace("\n", "")
    assert "1 unreadable image file" in text and "broken.jpg" in text and "training on this folder would fail" in text
    rep = check_data(get_recipe("folder"), data)
    assert not rep.ok and rep.counts.set_index("class").loc["bees", "total"] == 9


def test_check_reports_an_unknown_label_and_training_refuses_it(cli, tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "ab.py").write_text("from fastcls.recipe import Recipe\nrecipe = Recipe(name='ab', layout='csv', "
                                   "classes=('a', 'b'), file_col='image', label_col='class', test_dir=None)\n")
    data = make_tshirts(tmp_path / "data", classes=("a", "b", "zebra"), n=3)
    res = cli("check", "ab", "--data", data, "--recipes", recipes)
    assert res.exit_code == 1, res.output
    text = res.stdout.replace("\n", " ")
    assert "3 training item(s) have a label the recipe does not declare: 'zebra'" in text and "zebra_0.jpg" in text
    runs = tmp_path / "runs"
    res = cli("train", "ab", "simple_cnn", "--data", data, "--recipes", recipes, *QUICK, "--runs-dir", runs)
    assert res.exit_code == 2 and "does not declare: 'zebra'" in res.stderr.replace("\n", " ")
    assert not runs.exists() or not any(runs.iterdir())


def test_check_reports_a_trim_that_leaves_nothing(cli, tmp_path):
    data = make_tshirts(tmp_path / "data")
    _img(data / "images" / "tiny.jpg", (90, 90), (1, 2, 3))
    pd.concat([pd.read_csv(data / "train.csv"), pd.DataFrame([("tiny.jpg", "plain")], columns=["image", "class"])]
              ).to_csv(data / "train.csv", index=False)
    res = cli("check", "tshirts", "--data", data)
    text = " ".join(res.stdout.split())
    assert res.exit_code == 1 and "leaves nothing of 1 image" in text and "or --crop none" in text
    res = cli("check", "tshirts", "--data", data, "--crop", "none")  # the hint's option: `check` takes it too
    assert res.exit_code == 0 and "OK: the data folder matches the recipe" in res.stdout, res.output
    res = cli("check", "tshirts", "--data", data, "--trim", "10,10,10,10")
    assert res.exit_code == 0 and "leaves nothing" not in res.stdout, res.output


# -- submissions ------------------------------------------------------------------------------------------------------
def test_submission_neutralises_formula_labels_and_ids(tmp_path):
    r = get_recipe("tshirts")
    vocab = ["=HYPERLINK(1)", "@cmd", "plain", "-1"]
    probs = np.eye(4)
    df = write_submission(r, ["-a.jpg", "b.jpg", "+c.jpg", "d.jpg"], probs, vocab, tmp_path / "s.csv")
    back = pd.read_csv(tmp_path / "s.csv", dtype=str)
    assert back["image"].tolist() == ["'-a.jpg", "b.jpg", "'+c.jpg", "d.jpg"]
    assert back["class"].tolist() == ["'=HYPERLINK(1)", "'@cmd", "plain", "-1"] == df["class"].tolist()
    assert neutralise("+SUM(A1)") == "'+SUM(A1)" and neutralise("2.5") == "2.5"


def test_submission_template_mismatch_writes_nothing(tmp_path):
    data = shared_data("simpsons")
    r = get_recipe("simpsons")
    out = tmp_path / "s.csv"
    out.write_text("previous\n")
    with pytest.raises(FastclsError, match="1 template row.*no prediction .e.g. 'img0.jpg'"):
        write_submission(r, [f"img{i}.jpg" for i in range(1, 95)], np.full((94, 5), 0.2), list("abcde"), out, data=data)
    assert out.read_text() == "previous\n" and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(FastclsError, match="--data"):
        write_submission(r, ["img0.jpg"], np.ones((1, 1)), ["a"], out)


def test_submit_without_test_probabilities_is_a_clear_error(cli, tmp_path):
    data = make_folder(tmp_path / "data", test=0)
    runs = tmp_path / "runs"
    res = cli("train", "folder", "simple_cnn", "--data", data, *QUICK, "--runs-dir", runs, "--name", "notest")
    assert res.exit_code == 0, res.output
    res = cli("submit", "notest", "--out", tmp_path / "s.csv", "--runs-dir", runs)
    assert res.exit_code == 2 and "has no test probabilities" in res.stderr.replace("\n", " ")
    assert not (tmp_path / "s.csv").exists()


# -- the seeds' architectures -----------------------------------------------------------------------------------------
def test_seed_arch_variants():
    from torch import nn
    from fastcls.archs import ARCHS, build_model
    torch.manual_seed(0)
    m = build_model("seed_cnn64", 100, ps=0.3)
    body, head = m
    assert [c.out_channels for c in body.modules() if isinstance(c, nn.Conv2d)] == [64, 64, 128, 256]
    assert sum(isinstance(b, nn.BatchNorm2d) for b in body.modules()) == 4
    assert [(l.in_features, l.out_features) for l in head.modules() if isinstance(l, nn.Linear)] == \
        [(4 * 4 * 256, 256), (256, 256), (256, 100)], "64 px -> 4x4x256 flattened, dense 256-256, then the classes"
    assert [d.p for d in head.modules() if isinstance(d, nn.Dropout)] == [0.3, 0.3]
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 100)
    spec = ARCHS["efficientnet_b3_fc"]  # the body is timm's efficientnet_b3 (built by the registry test)
    assert spec.timm_name == "efficientnet_b3" and "efficientnet_b3_fc" in get_recipe("masks").archs
    head = spec.head(1536, 18, get_recipe("masks").ps)
    assert [(l.in_features, l.out_features) for l in head.modules() if isinstance(l, nn.Linear)] == [(1536, 512), (512, 18)]
    assert [d.p for d in head.modules() if isinstance(d, nn.Dropout)] == [0.7]
    assert head(torch.randn(2, 1536, 10, 10)).shape == (2, 18)


def test_submit_blends_the_stored_tta_views(cli, digits_copy, tmp_path):
    from fastcls.predict import run_tta_beta, tta_blend
    from fastcls.runs import RunStore
    run = RunStore(digits_copy).load("tiny-digits")
    vocab = np.array(run.vocab)
    for args, probs in ((["--no-tta"], run.test_probs[0]), (["--tta-beta", "1"], run.test_probs[0]),
                        ([], tta_blend(run.test_probs, run_tta_beta(run.meta))),  # the blend the run chose
                        (["--tta-beta", "0"], run.test_probs[1:].mean(0))):
        res = cli("submit", "tiny-digits", "--out", tmp_path / "s.csv", "--runs-dir", digits_copy, *args)
        assert res.exit_code == 0, res.output
        sub = pd.read_csv(tmp_path / "s.csv", dtype=str)
        assert list(sub.columns) == ["id", "label"] and sub["id"].tolist() == run.test_ids
        assert sub["label"].tolist() == vocab[probs.argmax(1)].tolist(), args
    res = cli("submit", "tiny-digits", "--out", tmp_path / "s.csv", "--runs-dir", digits_copy, "--tta-beta", "2")
    assert res.exit_code == 2 and "--tta-beta must be in [0, 1]" in res.stderr
