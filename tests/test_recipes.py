"""Recipes: every registered recipe loads and validates; overrides are checked; user recipes win over built-ins."""

import dataclasses
import subprocess
import sys
import zipfile

import pytest

from fastcls.errors import FastclsError
from fastcls.recipe import Recipe, builtin_recipe_dir, find_recipes, get_recipe

from .conftest import ROOT

RECIPES = sorted(find_recipes())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid(name):
    from fastcls.archs import get_arch
    from fastcls.data import LAYOUTS
    from fastcls.metrics import get_metric
    r = get_recipe(name)
    assert isinstance(r, Recipe) and r.name == name
    assert r.layout in LAYOUTS
    get_metric(r.metric)
    for a in r.archs:
        get_arch(a)
    assert r.override() == r
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.size = 1


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_listed(cli, name):
    res = cli("recipes")
    assert res.exit_code == 0 and name in res.stdout


def test_override_checks_keys_and_types():
    r = get_recipe("digits")
    assert r.override(size=48, lr=1).lr == 1.0 and r.override(size=48).size == 48
    assert r.override(archs=["resnet18"]).archs == ("resnet18",)
    assert r.size == 32, "overrides must not change the registered recipe"
    with pytest.raises(FastclsError, match="no setting 'sise'.*Did you mean: size"):
        r.override(sise=48)
    with pytest.raises(FastclsError, match="'size' must be int"):
        r.override(size="big")
    with pytest.raises(FastclsError, match="'size' must be int"):
        r.override(size=True)
    with pytest.raises(FastclsError, match="'crop' must be one of 'none', 'center', 'trim'"):
        r.override(crop="middle")
    with pytest.raises(FastclsError, match="'ps' must be in"):
        r.override(ps=1.2)


def test_unknown_recipe_suggests():
    with pytest.raises(FastclsError, match="Did you mean: digits"):
        get_recipe("digit")


def test_user_recipe_in_cwd_wins(tmp_path, monkeypatch, cli):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "digits.py").write_text(
        "from fastcls.recipe import Recipe\nrecipe = Recipe(name='digits', description='mine', layout='digits', size=20)\n")
    (tmp_path / "recipes" / "mydata.py").write_text(
        "from fastcls.recipe import Recipe\nrecipe = Recipe(name='mydata', layout='folder', data='somewhere')\n")
    monkeypatch.chdir(tmp_path)
    found = find_recipes()
    assert found["digits"].recipe.size == 20 and found["digits"].origin == "user"
    assert found["digits"].shadows == builtin_recipe_dir() / "digits.py"
    assert "mydata" in found
    res = cli("recipes")
    assert res.exit_code == 0 and "replaces built-in digits.py" in res.stdout and "mydata" in res.stdout
    # the file that runs is shown: nobody runs a stranger's recipe unknowingly
    assert f"  mydata: {tmp_path / 'recipes' / 'mydata.py'}\n" in res.stdout  # whole, however long
    assert f"  digits: {tmp_path / 'recipes' / 'digits.py'}\n" in res.stdout


def test_broken_recipe_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.py").write_text("recipe = 3\n")
    with pytest.raises(FastclsError, match="defines no `recipe = Recipe"):
        find_recipes([tmp_path])


def test_wheel_ships_builtin_recipes(tmp_path):
    """Build a wheel, install it into a folder, and find the built-in recipes from an unrelated directory."""
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(wheel_dir.glob("fastcls-*.whl"))
    assert "fastcls/_recipes/digits.py" in zipfile.ZipFile(wheel).namelist()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import fastcls, fastcls.recipe as r; print(fastcls.__file__); print(r.builtin_recipe_dir()); "
            "print(sorted(r.find_recipes()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(target), "PATH": ""}).stdout.splitlines()
    assert out[0].startswith(str(target)), "the installed copy, not the source tree, must be imported"
    assert out[1].startswith(str(target))
    assert "'digits'" in out[2]
