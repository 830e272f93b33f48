"""Security: no pickle is ever loaded from a weights file or a run folder; recipes run only from the known folders;
file names in tables cannot leave the data root."""

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fastcls.data import read_items
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe, find_recipes
from fastcls.runs import RunStore

from .conftest import ROOT, TINY


class Evil:
    """Unpickling this runs a shell command: what a malicious 'weights' file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (__import__("os").system, (f"touch {self.marker}",))


def test_library_source_loads_no_pickle():
    """A guard on the code itself: every torch.load is weights-only, every np.load refuses pickles, no pickle.load."""
    for f in sorted((ROOT / "fastcls").rglob("*.py")):  # subpackages too (data/, experiments/, ...)
        src = f.read_text()
        assert not re.search(r"pickle\.loads?\(|read_pickle\(|allow_pickle\s*=\s*True|dill|joblib\.load", src), f
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (f, call)
        for call in re.findall(r"np\.load\([^)]*\)", src):
            assert "allow_pickle=False" in call, (f, call)


@pytest.fixture
def evil_pth(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "simple_cnn.pth"
    torch.save({"stages.0.0.weight": torch.zeros(1), "payload": Evil(marker)}, path)
    return path, marker


def test_malicious_weights_are_refused_by_weights_add(cli, tmp_path, evil_pth, monkeypatch):
    path, marker = evil_pth
    monkeypatch.setenv("FASTCLS_WEIGHTS", str(tmp_path / "weights"))
    res = cli("weights", "add", path, "--arch", "simple_cnn")
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = res.stderr.replace("\n", " ")
    assert "Refused to load" in msg and "not a plain weights file" in msg and "safetensors" in msg
    assert not marker.exists(), "the pickle's payload must never run"
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())


def test_malicious_weights_are_refused_by_train_before_training(cli, tmp_path, evil_pth):
    path, marker = evil_pth
    runs = tmp_path / "runs"
    args = [a for a in TINY if a != "--no-pretrained"]
    res = cli("train", "digits", "simple_cnn", *args, "--weights", path, "--runs-dir", runs)
    assert res.exit_code == 2 and "Refused to load" in res.stderr and not marker.exists()
    assert RunStore(runs).leaderboard(status=None).empty


def test_a_pickled_array_in_a_run_folder_is_not_loaded(digits_store, tmp_path):
    import shutil
    store_dir = tmp_path / "runs"
    shutil.copytree(digits_store, store_dir)
    rid = RunStore(store_dir).leaderboard()["id"].iloc[0]
    marker = tmp_path / "pwned"
    np.save(store_dir / rid / "valid_probs.npy", np.array([Evil(marker)], dtype=object), allow_pickle=True)
    run = RunStore(store_dir).load(rid)
    with pytest.raises(FastclsError, match="is not a plain numeric array"):
        run.valid_probs
    assert not marker.exists()


def test_recipes_run_only_from_the_known_folders(tmp_path, monkeypatch):
    """A recipe file in a data folder, a runs folder or a subfolder is never executed; ./recipes and --recipes are."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'a').write('x')\nfrom fastcls.recipe import Recipe\nrecipe = Recipe(name='sneaky')\n"
    for d in ("data", "runs", "recipes/sub", "data/recipes"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
        (tmp_path / d / "sneaky.py").write_text(code)
    (tmp_path / "recipes" / "_private.py").write_text(code)
    monkeypatch.chdir(tmp_path / "data")  # its own ./recipes holds a recipe: the cwd is not this folder's parent
    monkeypatch.delenv("FASTCLS_RECIPES", raising=False)
    (tmp_path / "data" / "recipes" / "sneaky.py").unlink()
    assert "sneaky" not in find_recipes() and not marker.exists()
    monkeypatch.chdir(tmp_path)  # ./recipes: its top level only, no _private files
    (tmp_path / "recipes" / "mine.py").write_text("from fastcls.recipe import Recipe\nrecipe = Recipe(name='mine')\n")
    found = find_recipes()
    assert "mine" in found and "sneaky" not in found and not marker.exists()
    assert "sneaky" in find_recipes([tmp_path / "recipes" / "sub"]) and marker.exists()  # --recipes DIR is explicit


@pytest.mark.parametrize("table, name", [
    ("train.csv", "/etc/hostname"),
    ("train.csv", "../outside.png"),
    ("train.csv", "images/../../outside.png"),
    ("test.csv", "/etc/hostname"),
    ("test.csv", "../outside.png"),
])
def test_table_file_names_cannot_leave_the_data_root(tmp_path, table, name):
    (tmp_path / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    rows = [(f"im{i}.png", "ab"[i % 2]) for i in range(4)]
    for f, _ in rows:
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "images" / f)
    train = rows + ([(name, "a")] if table == "train.csv" else [])
    pd.DataFrame(train, columns=["file", "label"]).to_csv(tmp_path / "data" / "train.csv", index=False)
    pd.DataFrame({"file": ["im0.png"] + ([name] if table == "test.csv" else [])}).to_csv(tmp_path / "data" / "test.csv",
                                                                                       index=False)
    r = Recipe(name="t", layout="csv", test_csv="test.csv")
    with pytest.raises(FastclsError, match=rf"{table}, row \d+: file name .* points outside the image folder"):
        read_items(r, tmp_path / "data")


# -- submission CSVs: formula cells neutralised where the format allows it ------------------------------------------
def _sub_recipe(**kw):
    return Recipe(name="s", layout="folder", sub_id="id", sub_id_col="id", sub_label_col="label", **kw)


@pytest.mark.parametrize("label, written", [
    ("=1+1", "'=1+1"), ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"), ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("-1", "-1"), ("+2.5", "+2.5"), ("1e3", "1e3"), ("cat", "cat"), ("a=b", "a=b"),
])
def test_submission_label_cells_never_start_a_formula(tmp_path, label, written):
    """Every formula lead character, numbers left alone (a signed number is not a formula), other cells untouched;
    the file reads back to exactly the written cells."""
    from fastcls.submission import write_submission
    vocab = [label, "zzz"]
    df = write_submission(_sub_recipe(), ["=id1", "id2"], np.array([[0.9, 0.1], [0.2, 0.8]]), vocab, tmp_path / "s.csv")
    back = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    assert back["label"].tolist() == [written, "zzz"] == df["label"].tolist()
    assert back["id"].tolist() == ["'=id1", "id2"] == df["id"].tolist()  # a formula-like file name: escaped too
    assert not [p for p in tmp_path.iterdir() if p.name != "s.csv"], "no temporary file left"


def test_submission_quoting_keeps_the_format_of_indices_and_templates(tmp_path):
    """Class indices (sub_label='index') are numbers: written as they are; a template's other columns untouched."""
    from fastcls.submission import write_submission
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    r = _sub_recipe(classes=("=a", "-b"), sub_label="index")
    assert write_submission(r, ["x", "y"], probs, ["=a", "-b"], tmp_path / "i.csv")["label"].tolist() == [0, 1]
    (tmp_path / "data").mkdir()
    pd.DataFrame({"id": ["y", "x"], "note": ["=keep", "@keep"], "label": ["", ""]}).to_csv(tmp_path / "data" / "t.csv",
                                                                                         index=False)
    r = _sub_recipe(sub_template="t.csv")
    write_submission(r, ["x", "y"], probs, ["=a", "b"], tmp_path / "t.csv", data=tmp_path / "data")
    back = pd.read_csv(tmp_path / "t.csv", dtype=str, keep_default_na=False)
    assert back.to_dict("list") == {"id": ["y", "x"], "note": ["=keep", "@keep"], "label": ["b", "'=a"]}


@pytest.mark.parametrize("name, written", [
    ("=cmd|' /C calc'!A0.png", "'=cmd|' /C calc'!A0.png"), ("+x.png", "'+x.png"), ("-y.png", "'-y.png"),
    ("@SUM(A1).png", "'@SUM(A1).png"), ("img-1.png", "img-1.png"), ("1.png", "1.png"),
])
def test_formula_like_test_file_names_are_escaped_in_the_submission(tmp_path, capsys, name, written):
    """A test file name a spreadsheet would run is written with a leading ' (a warning says so); Kaggle-style ids
    (numbers, plain names) are written as they are; the file reads back to exactly those cells, every row there."""
    from fastcls.submission import write_submission
    ids = [name, "-1", "+2.5", "plain"]
    write_submission(_sub_recipe(), ids, np.eye(4)[:, :2] + 0.1, ["cat", "dog"], tmp_path / "s.csv")
    back = pd.read_csv(tmp_path / "s.csv", dtype=str, keep_default_na=False)
    assert back["id"].tolist() == [written, "-1", "+2.5", "plain"]
    assert not any(c.startswith(("=", "+", "-", "@")) and c not in ("-1", "+2.5") for c in back["id"])
    assert [c[1:] if c != i else c for c, i in zip(back["id"], ids)] == ids  # the original name after the '
    err = " ".join(capsys.readouterr().err.split())
    assert ("1 test id(s) start like a spreadsheet formula" in err) == (written != name)
