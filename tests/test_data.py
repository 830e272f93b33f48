"""Data layouts (folder, CSV, npz, digits) read into one Items table; splits are reproducible and stratified."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastcls.data import CenterSquare, TrimCrop, assign_split, dls, read_items, sample_items
from fastcls.recipe import crop_overrides
from fastcls.data import test_dl as make_test_dl  # aliased: pytest would collect a name starting with test_
from fastcls.errors import FastclsError
from fastcls.recipe import get_recipe, Recipe

from .conftest import shared_data


def make_folder_data(root, classes=("cat", "dog", "fox"), n=6, test=4, size=(20, 12)):
    """A tiny folder-per-class data set with an unlabeled test folder; images coloured by class."""
    for ci, c in enumerate(classes):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", size, (80 * ci, 10 * i, 0)).save(root / "train" / c / f"{c}{i}.png")
    (root / "test").mkdir()
    for i in range(test):
        Image.new("RGB", size, (0, 0, 30 * i)).save(root / "test" / f"t{i}.jpg")
    return root


def test_folder_layout(tmp_path):
    root = make_folder_data(tmp_path)
    r = Recipe(name="f", layout="folder", size=16, bs=4, aug=False)
    items = read_items(r, root)
    assert len(items.train) == 18 and items.vocab == ["cat", "dog", "fox"]
    assert set(items.train["id"]) == {f"{c}/{c}{i}.png" for c in ("cat", "dog", "fox") for i in range(6)}
    assert len(items.test) == 4
    d = dls(r, items, seed=1)
    xb, yb = d.one_batch()
    assert xb.shape == (4, 3, 16, 16)
    tdl = make_test_dl(d, items)
    assert len(tdl.dataset) == 4 and tdl.one_batch()[0].shape[1:] == (3, 16, 16)


def test_csv_layout_and_escape_refused(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(8):
        Image.new("RGB", (10, 10), (i * 20, 0, 0)).save(tmp_path / "images" / f"im{i}.png")
        rows.append((f"im{i}.png", "a" if i % 2 else "b"))
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(tmp_path / "train.csv", index=False)
    r = Recipe(name="c", layout="csv", size=8)
    items = read_items(r, tmp_path)
    assert items.vocab == ["a", "b"] and items.train["x"].str.endswith(".png").all()
    pd.DataFrame([("../secret.png", "a"), ("im0.png", "b")], columns=["file", "label"]).to_csv(tmp_path / "train.csv",
                                                                                           index=False)
    with pytest.raises(FastclsError, match="row 2: file name '../secret.png' points outside"):
        read_items(r, tmp_path)
    with pytest.raises(FastclsError, match="has no column 'klass'"):
        read_items(r.override(label_col="klass"), tmp_path)


def test_npz_layout_on_real_quickdraw():
    path = shared_data("quickdraw-longtail")
    r = Recipe(name="qd", layout="npz", size=28, bs=64)
    items = read_items(r, path)
    counts = items.train["label"].value_counts()
    assert len(items.train) == 1654 and counts.max() == 1000 and counts.min() == 10
    assert len(items.test) == 3000
    d = dls(r, items, seed=0)
    xb, _ = d.one_batch()
    assert xb.shape == (64, 3, 28, 28)
    # stratified split keeps the rarest class in both parts
    valid = d.valid_ds.items
    assert valid["label"].nunique() == counts.size


def test_digits_split_is_reproducible_and_stratified():
    r = get_recipe("digits")
    items = read_items(r)
    a, b, c = (assign_split(items.train, r, s) for s in (1, 1, 2))
    assert a["is_valid"].equals(b["is_valid"]) and not a["is_valid"].equals(c["is_valid"])
    frac = a.groupby("label")["is_valid"].mean()
    assert frac.between(0.15, 0.25).all()
    s = sample_items(items.train, 100, seed=0)
    assert len(s) == 100 and s["label"].nunique() == 10


def test_group_split_keeps_groups_apart():
    df = pd.DataFrame({"id": map(str, range(60)), "x": range(60), "label": ["a", "b", "c"] * 20,
                       "group": np.repeat(np.arange(12), 5)})
    out = assign_split(df, Recipe(name="g", split="group", valid_pct=0.25), seed=0)
    assert not set(out[out.is_valid].group) & set(out[~out.is_valid].group)


def test_crops_give_the_expected_box():
    from fastai.vision.core import PILImage
    img = PILImage(Image.new("RGB", (200, 500)))
    assert TrimCrop(400 // 4, 100 // 4, 50 // 4, 50 // 4)(img).size == (200 - 24, 500 - 100 - 25)
    assert TrimCrop(0.2, 0.1, 0.25, 0.25)(img).size == (100, 350)
    assert CenterSquare()(img).size == (200, 200)
    with pytest.raises(FastclsError, match="leaves nothing"):
        TrimCrop(300, 300, 0, 0)(img)


def test_crop_overrides_trim_implies_the_trim_crop():
    assert crop_overrides(None, None) == {}
    assert crop_overrides("center", None) == {"crop": "center"}
    assert crop_overrides(None, "400,100,50,50") == {"crop": "trim", "trim": (400, 100, 50, 50)}
    assert crop_overrides("none", "0.2,0,0,0") == {"crop": "none", "trim": (0.2, 0, 0, 0)}  # an explicit --crop wins
    with pytest.raises(FastclsError, match="--trim takes 4 margins"):
        crop_overrides(None, "1,2")
