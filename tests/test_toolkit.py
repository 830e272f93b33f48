"""The training toolkit's command line: every recipe setting reachable (--set and the named flags), ARCH and --data
optional, and the split seed that lets runs differing only in --seed share their validation items."""

import json

import pytest

from fastcls.config import RunConfig
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe, get_recipe, parse_sets

from .conftest import TINY
from .test_cli import _assert_clean_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_set_reads_each_value_as_its_fields_type():
    r = get_recipe("digits")
    got = parse_sets(r, ["wd=0.05", "patience=3", "max_rotate=15", "archs=simple_cnn,resnet18", "flip=false",
                         "normalize=none", "monitor=macro_f1", "size=none", "trim=10,0,0.1,0", "split-seed=7"])
    assert got == {"wd": 0.05, "patience": 3, "max_rotate": 15.0, "archs": ("simple_cnn", "resnet18"), "flip": False,
                   "normalize": "none", "monitor": "macro_f1", "size": None, "trim": (10, 0, 0.1, 0), "split_seed": 7}
    assert type(got["max_rotate"]) is float and type(got["patience"]) is int
    assert r.override(**got).max_rotate == 15.0  # what parse_sets gives passes the recipe's own checks


@pytest.mark.parametrize("sets, phrases", [
    (["max_rotat=3"], ["no setting 'max_rotat'", "Did you mean: max_rotate"]),
    (["patience=2.5"], ["'patience' must be int or NoneType", "'2.5'"]),
    (["normalize=zscore"], ["'normalize' must be one of 'model'"]),
    (["flip=maybe"], ["'flip' must be bool"]),
    (["wd"], ["--set takes field=value"]),
    (["name=x"], ["no setting 'name'"]),
    (["items=x"], ["'items' must be"]),
    (["lr=0.1", "lr=0.2"], ["'lr' twice"]),
])
def test_set_refuses_unknown_fields_and_bad_values(sets, phrases):
    with pytest.raises(FastclsError) as e:
        parse_sets(get_recipe("digits"), sets)
    for p in phrases:
        assert p in str(e.value)


def test_from_options_precedence_arch_default_and_validation():
    cfg = RunConfig.from_options("digits", sets=["max_rotate=3", "wd=0.01"], aug="strong", patience=2)
    assert cfg.arch == "resnet18"  # the recipe's first arch
    r = cfg.recipe
    assert (r.max_rotate, r.max_zoom, r.wd, r.patience) == (3.0, 1.3, 0.01, 2)  # --set beats the preset
    assert RunConfig.from_options("digits", sets=["archs=simple_cnn,resnet18"]).arch == "simple_cnn"
    assert RunConfig.from_options("digits", aug="none").recipe.aug is False
    assert RunConfig.from_options("digits", aug="default").recipe == get_recipe("digits")
    for kw, phrase in [(dict(sets=["valid_pct=1.5"]), "'valid_pct' must be in (0, 1)"),  # the recipe's own check
                       (dict(sets=["wd=0.2"], wd=0.1), "disagrees with the named option"),
                       (dict(aug="wild"), "--aug must be one of"),
                       (dict(drop_path=1.0), "'drop_path' must be in [0, 1)")]:
        with pytest.raises(FastclsError, match=None) as e:
            RunConfig.from_options("digits", **kw)
        assert phrase in str(e.value)


def test_stored_runs_from_before_the_split_seed_keep_their_split():
    d = RunConfig.from_options("digits", "simple_cnn", seed=5).to_dict()
    assert d["split_seed"] == 42
    assert RunConfig.from_dict(d).recipe.split_seed == 42
    del d["split_seed"]  # a config.json written before the field existed: its run's seed split the data
    assert RunConfig.from_dict(d).recipe.split_seed == 5


def test_cli_flags_reach_the_config_and_seeds_share_the_split(cli, tmp_path):
    runs = tmp_path / "runs"
    common = ["train", "digits", *TINY, "--runs-dir", runs, "--set", "archs=simple_cnn", "--wd", "0.05",
              "--patience", "2", "--valid-pct", "0.25", "--aug", "light", "--normalize", "imagenet",
              "--set", "max_lighting=0.3"]
    for seed in (0, 1):
        res = cli(*common, "--seed", seed, "--name", f"s{seed}")
        assert res.exit_code == 0, res.output
    res = cli(*common, "--seed", 0, "--split-seed", 7, "--name", "other-split")
    assert res.exit_code == 0, res.output
    from fastcls.runs import RunStore
    store = RunStore(runs)
    s0, s1, other = (store.load(n) for n in ("s0", "s1", "other-split"))
    c = s0.config
    assert (c["arch"], c["wd"], c["patience"], c["valid_pct"], c["max_rotate"], c["max_lighting"], c["normalize"]) \
        == ("simple_cnn", 0.05, 2, 0.25, 5.0, 0.3, "imagenet")
    assert (s0.config["seed"], s1.config["seed"], other.config["split_seed"]) == (0, 1, 7)
    assert len(s0.valid_ids) == 50  # 25% of the 200-item sample
    assert s0.valid_ids == s1.valid_ids  # --seed leaves the split alone
    assert sorted(s0.valid_ids) != sorted(other.valid_ids)  # --split-seed moves it
    res = cli("ensemble", "s0", "s1", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert "different validation items" in cli("ensemble", "s0", "other-split", "--runs-dir", runs).stderr


def test_bad_flags_stop_before_training(cli, tmp_path):
    runs = tmp_path / "runs"
    base = ["train", "digits", "simple_cnn", *TINY, "--runs-dir", runs]
    _assert_clean_error(cli(*base, "--set", "max_rotat=3"), "no setting 'max_rotat'", "Did you mean: max_rotate",
                        runs=runs)
    _assert_clean_error(cli(*base, "--aug", "wild"), "--aug must be one of", runs=runs)
    _assert_clean_error(cli(*base, "--valid-pct", "1"), "'valid_pct' must be in (0, 1)", runs=runs)
    _assert_clean_error(cli("sweep-dropout", "digits", *TINY, "--runs-dir", runs, "--set", "patience=x"),
                        "'patience' must be int", runs=runs)


def _folder_recipe(tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "pets.py").write_text(
        "from fastcls.recipe import Recipe\nrecipe = Recipe(name='pets', layout='folder', size=16)\n")
    return tmp_path / "recipes"


def test_data_defaults_to_fastcls_data_then_the_current_folder(tmp_path, monkeypatch, cli):
    from fastcls.data.items import resolve_data_path
    recipe = Recipe(name="pets", layout="folder", size=16)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("FASTCLS_DATA", str(tmp_path / "store"))
    with pytest.raises(FastclsError) as e:
        resolve_data_path(recipe)
    msg = str(e.value)
    assert str(tmp_path / "store" / "pets") in msg and str(elsewhere) in msg and "--data" in msg
    here = tmp_path / "here"
    (here / "train" / "cat").mkdir(parents=True)
    monkeypatch.chdir(here)
    assert resolve_data_path(recipe) == here  # the current folder has the layout
    (tmp_path / "store" / "pets").mkdir(parents=True)
    assert resolve_data_path(recipe) == tmp_path / "store" / "pets"  # $FASTCLS_DATA/<recipe> comes first
    assert resolve_data_path(recipe, tmp_path / "store" / "pets") == tmp_path / "store" / "pets"
    monkeypatch.delenv("FASTCLS_DATA")
    monkeypatch.chdir(elsewhere)
    runs = tmp_path / "runs"
    _assert_clean_error(cli("train", "pets", "simple_cnn", "--recipes", _folder_recipe(tmp_path), "--runs-dir", runs,
                            *TINY), "$FASTCLS_DATA is not set", str(elsewhere), "--data", runs=runs)


def test_train_without_arch_or_data_uses_the_recipe_and_the_current_folder(tmp_path, monkeypatch, cli):
    from PIL import Image
    for c, color in (("cat", 0), ("dog", 255)):
        for i in range(6):
            (tmp_path / "pets" / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (color, i * 10, 0)).save(tmp_path / "pets" / "train" / c / f"{i}.png")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "pets.py").write_text(
        "from fastcls.recipe import Recipe\n"
        "recipe = Recipe(name='pets', layout='folder', size=16, archs=('simple_cnn',), pretrained=False)\n")
    monkeypatch.chdir(tmp_path / "pets")
    runs = tmp_path / "runs"
    res = cli("train", "pets", "--recipes", tmp_path / "recipes", "--runs-dir", runs, "--epochs", "1",
              "--freeze-epochs", "0", "--tta", "0", "--quiet", "--bs", "4")
    assert res.exit_code == 0, res.output
    cfg = json.loads(next(runs.glob("*/config.json")).read_text())
    assert cfg["arch"] == "simple_cnn"
