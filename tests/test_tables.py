"""Bad tables: missing columns, duplicate ids, empty or unknown labels, files listed but missing, files present
but unlisted, broken npz labels: one clear report before training, naming the file and the rows."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastcls.data import check_images, read_items
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe

from .conftest import TINY

RECIPE = ("from fastcls.recipe import Recipe\n"
          "recipe = Recipe(name='tab', layout='csv', size=16, pretrained=False, classes=('cat', 'dog'))\n")


def make_csv_data(root, rows, extra_images=()):
    (root / "images").mkdir(parents=True)
    for name in {r[0] for r in rows} | set(extra_images):
        if name != "gone.png":
            Image.new("RGB", (10, 10), (len(name) * 9, 0, 0)).save(root / "images" / name)
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(root / "train.csv", index=False)
    return root


GOOD = [(f"im{i}.png", "cat" if i % 2 else "dog") for i in range(8)]


@pytest.fixture
def recipes(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "tab.py").write_text(RECIPE)
    return tmp_path / "recipes"


def test_one_report_lists_every_table_problem_with_rows(cli, tmp_path, recipes):
    rows = GOOD + [("im1.png", "cat"), ("im9.png", ""), ("im10.png", "cow"), ("im11.png", "horse"), ("im3.png", "cat")]
    data = make_csv_data(tmp_path / "data", rows, extra_images=["stray.png", "stray2.png"])
    runs = tmp_path / "runs"
    res = cli("train", "tab", "simple_cnn", "--recipes", recipes, "--data", data, "--runs-dir", runs, *TINY)
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = res.stderr.replace("\n", " ")
    assert "3 problem(s), nothing was trained" in msg
    # csv rows are numbered as in a spreadsheet: the header is row 1
    assert "duplicate item ids: 'im1.png' appears 2 times (train.csv row 3, row 10); 'im3.png' appears 2 times " \
           "(train.csv row 5, row 14)" in msg
    assert "1 training item(s) have an empty label (train.csv row 11)" in msg
    assert "2 training item(s) have a label the recipe does not declare: 'cow', 'horse' (train.csv row 12, row 13, " \
           "e.g. item 'im10.png'). Declared classes: cat, dog" in msg
    assert "2 image file(s)" in msg and "listed in no table" in msg and "stray.png, stray2.png" in msg
    assert not runs.exists() or not any(p for p in runs.iterdir() if not p.name.startswith("."))


def test_missing_column_is_named_with_the_columns_found(cli, tmp_path, recipes):
    data = make_csv_data(tmp_path / "data", GOOD)
    pd.DataFrame({"file": [r[0] for r in GOOD], "klass": [r[1] for r in GOOD]}).to_csv(data / "train.csv", index=False)
    res = cli("train", "tab", "simple_cnn", "--recipes", recipes, "--data", data, "--runs-dir", tmp_path / "r", *TINY)
    assert res.exit_code == 2
    assert "has no column 'label' (it has 'file', 'klass')" in res.stderr.replace("\n", " ")


def test_files_listed_but_missing_are_refused_and_unlisted_files_a_note(tmp_path, capsys):
    data = make_csv_data(tmp_path / "data", GOOD + [("gone.png", "cat")], extra_images=["stray.png"])
    r = Recipe(name="tab", layout="csv", size=16, classes=("cat", "dog"))
    with pytest.raises(FastclsError, match=r"1 training image file\(s\) are listed but do not exist \(train.csv row "
                                           r"10\): \S*gone\.png"):
        read_items(r, data)
    pd.DataFrame(GOOD, columns=["file", "label"]).to_csv(data / "train.csv", index=False)
    items = read_items(r, data)
    err = capsys.readouterr().err
    assert "1 image file(s)" in err and "are listed in no table" in err and "stray.png" in err
    assert len(check_images(items, "fail").train) == 8


def test_labels_are_checked_only_when_the_recipe_declares_classes(tmp_path):
    data = make_csv_data(tmp_path / "data", GOOD + [("im8.png", "cow")])
    assert "cow" in read_items(Recipe(name="tab", layout="csv"), data).vocab
    with pytest.raises(FastclsError, match="does not declare: 'cow'"):
        read_items(Recipe(name="tab", layout="csv", classes=("cat", "dog")), data)


@pytest.mark.parametrize("labels, n_images, phrase", [
    (np.array([0, 1, 2, 7]), 4, "are not indices into its 3 classes, e.g. item 3 has 7"),
    (np.array([0, 1, -1, 2]), 4, "e.g. item 2 has -1"),
    (np.array([0, 1, 2]), 4, "has 4 images but 3 labels"),
])
def test_npz_labels_that_do_not_fit(tmp_path, labels, n_images, phrase):
    np.savez(tmp_path / "train.npz", images=np.zeros((n_images, 8, 8), np.uint8), labels=labels,
             classes=np.array(["x", "y", "z"]))
    with pytest.raises(FastclsError, match=phrase):
        read_items(Recipe(name="n", layout="npz", npz_test=None), tmp_path)


def test_one_image_under_two_paths_is_refused_naming_both_rows(tmp_path):
    """`./a.png` and `x/../a.png` are one file: listed twice (with two labels, or one) is refused, naming the rows."""
    data = make_csv_data(tmp_path / "data", GOOD)
    (data / "images" / "sub").mkdir()
    rows = GOOD + [("./im1.png", "dog"), ("sub/../im2.png", "dog")]
    pd.DataFrame(rows, columns=["file", "label"]).to_csv(data / "train.csv", index=False)
    with pytest.raises(FastclsError) as e:
        read_items(Recipe(name="tab", layout="csv"), data)
    msg = str(e.value)
    assert "2 image file(s) are listed more than once under different paths (1 with different labels)" in msg
    assert f"{(data / 'images' / 'im1.png').resolve()} as 'im1.png' (train.csv row 3, label 'cat'), './im1.png' " \
           "(train.csv row 10, label 'dog')" in msg
    assert "'im2.png' (train.csv row 4, label 'dog'), 'sub/../im2.png' (train.csv row 11, label 'dog')" in msg


def test_rows_of_a_given_validation_table_are_numbered_in_their_own_file(tmp_path):
    data = make_csv_data(tmp_path / "data", GOOD)
    pd.DataFrame([("im0.png", "dog"), ("./im1.png", "cat")], columns=["file", "label"]).to_csv(data / "val.csv",
                                                                                               index=False)
    with pytest.raises(FastclsError) as e:
        read_items(Recipe(name="tab", layout="csv", valid_csv="val.csv"), data)
    msg = str(e.value)
    assert "'images/im0.png' appears 2 times (train.csv row 2, val.csv row 2)" in msg
    assert "'images/./im1.png' (val.csv row 3, label 'cat')" in msg and "(train.csv row 3, label 'cat')" in msg


def test_missing_value_labels_are_refused_not_made_a_class(tmp_path):
    """A NaN written out as text ('NaN', 'null', ...) is no class; a recipe that declares such a class keeps it."""
    data = make_csv_data(tmp_path / "data", GOOD + [("im8.png", "NaN"), ("im9.png", "cat"), ("im10.png", "null")])
    with pytest.raises(FastclsError, match=r"2 training item\(s\) have a missing-value label 'NaN', 'null' "
                                           r"\(train.csv row 10, row 12\): a missing label is not a class"):
        read_items(Recipe(name="tab", layout="csv"), data)
    declared = read_items(Recipe(name="tab", layout="csv", classes=("cat", "dog", "NaN", "null")), data)
    assert declared.vocab == ["NaN", "cat", "dog", "null"]


def _folder(root, classes=("cat", "dog")):
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (90 * len(c), 20 * i, 0)).save(root / "train" / c / f"{i}.png")
    return root


FOLDER = Recipe(name="f", layout="folder", test_dir=None)


def test_empty_class_folder_is_a_warning_naming_it(tmp_path, capsys, cli):
    """A class with no images cannot be learned: training goes on without it, and says so (`check`: a warning)."""
    data = _folder(tmp_path / "data")
    (data / "train" / "cow").mkdir()
    items = read_items(FOLDER, data)
    assert items.vocab == ["cat", "dog"]
    err = " ".join(capsys.readouterr().err.split())
    assert f"fastcls: warning: class folder {data / 'train' / 'cow'} has no images: class 'cow' is left out" in err
    res = cli("check", "folder", "--data", data, "--no-verify")
    assert res.exit_code == 0 and "has no images: class 'cow' is left out" in " ".join(res.stdout.split())


def test_linked_folders_loops_and_one_file_under_two_labels(tmp_path, capsys):
    """A folder linked into itself is read once (a warning); a file reached under two class folders is refused."""
    data = _folder(tmp_path / "data")
    (data / "train" / "cat" / "again").symlink_to("../cat")  # a loop inside a class
    (data / "train" / "all").symlink_to(".")                 # the training folder as a class of itself
    items = read_items(FOLDER, data)
    assert sorted(items.train["id"]) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    err = " ".join(capsys.readouterr().err.split())
    assert f"warning: {data / 'train' / 'cat' / 'again'} leads to {(data / 'train' / 'cat').resolve()}, which is " \
           "read already (a loop" in err and f"{data / 'train' / 'all'} links back to" in err
    (data / "train" / "dog" / "in").mkdir()
    (data / "train" / "dog" / "in" / "out").symlink_to("../../dog")  # a loop two levels down
    assert len(read_items(FOLDER, data).train) == 6
    (data / "train" / "cat" / "dogs").symlink_to("../dog")  # dog's images under 'cat' too
    with pytest.raises(FastclsError) as e:
        read_items(FOLDER, data)
    assert f"{(data / 'train' / 'dog' / '0.png').resolve()} as 'cat/dogs/0.png' (label 'cat'), 'dog/0.png' " \
           "(label 'dog')" in str(e.value) and "3 with different labels" in str(e.value)
