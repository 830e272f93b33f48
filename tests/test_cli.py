"""The CLI as a user meets it: help everywhere, a stored digits run read back, clear errors for bad input."""

import json
import shutil
import sqlite3

import numpy as np
import pytest
import typer

from fastcls.cli import app

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest) for the trainings below
RUN_FILES = ["config.json", "metrics.json", "history.csv", "model.safetensors", "valid_probs.npy", "valid_targets.npy",
             "valid_ids.json", "test_probs.npy", "test_ids.json", "vocab.json", "meta.json"]


def _commands():
    return sorted(typer.main.get_command(app).commands)


def test_top_level_help(cli):
    res = cli("--help")
    assert res.exit_code == 0
    for name in _commands():
        assert name in res.stdout


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help_for_every_option(cli, command):
    res = cli(command, "--help")
    assert res.exit_code == 0, res.output
    click_cmd = typer.main.get_command(app).commands[command]
    assert click_cmd.help, f"{command} has no help text"
    for p in click_cmd.params:
        if p.param_type_name == "option" and p.name != "help":
            assert p.help, f"{command} option {p.name} has no help text"


def test_train_stores_every_file_and_an_index_row(digits_store):
    run_dirs = [p for p in digits_store.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1
    run = run_dirs[0]
    for f in RUN_FILES:
        assert (run / f).is_file(), f"missing {f}"
    assert not list(digits_store.glob(".tmp-*")), "no temporary folder may be left behind"
    with sqlite3.connect(digits_store / "index.sqlite") as con:
        rows = con.execute("SELECT id, name, recipe, arch, size, metric_name, metric FROM runs").fetchall()
    assert rows == [(run.name, "tiny-digits", "digits", "simple_cnn", 16, "accuracy", pytest.approx(rows[0][6]))]
    probs = np.load(run / "valid_probs.npy")
    targets = np.load(run / "valid_targets.npy")
    ids = json.loads((run / "valid_ids.json").read_text())
    vocab = json.loads((run / "vocab.json").read_text())
    assert probs.shape == (2, len(ids), 10) and len(targets) == len(ids) and vocab == [str(i) for i in range(10)]
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-4)
    assert not np.allclose(probs[0], probs[1]), "the TTA view must differ from the plain view"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx((probs[0].argmax(1) == targets).mean())
    test_probs = np.load(run / "test_probs.npy")
    assert test_probs.shape == (2, 297, 10)
    meta = json.loads((run / "meta.json").read_text())
    assert {"torch", "fastai", "timm"} <= set(meta["versions"]) and "git_commit" in meta
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"] == "digits" and cfg["arch"] == "simple_cnn" and cfg["size"] == 16 and cfg["sample"] == 200
    from safetensors.torch import load_file
    assert load_file(run / "model.safetensors")


def test_runs_and_show_read_the_run_back(cli, digits_store):
    res = cli("runs", "--runs-dir", digits_store)
    assert res.exit_code == 0 and "tiny-digits" in res.stdout and "simple_cnn" in res.stdout
    rid = next(p.name for p in digits_store.iterdir() if p.is_dir())
    for ref in (rid, rid[:17], "tiny-digits"):
        res = cli("show", ref, "--runs-dir", digits_store)
        assert res.exit_code == 0, res.output
        assert rid in res.stdout and '"arch": "simple_cnn"' in res.stdout and "train_loss" in res.stdout
    res = cli("runs", "--recipe", "nope", "--runs-dir", digits_store)
    assert res.exit_code == 0 and "No runs" in res.stdout


def _assert_clean_error(res, *phrases, runs=None):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "Error:" in res.stderr
    for p in phrases:
        assert p in res.stderr.replace("\n", " "), res.stderr
    if runs is not None:
        assert not runs.exists() or not any(runs.iterdir()), "nothing may be written to the run store"


@pytest.mark.parametrize("args, phrases", [
    (["train", "digitz", "simple_cnn"], ["Unknown recipe 'digitz'", "Did you mean: digits"]),
    (["train", "digits", "resnet19"], ["Unknown architecture 'resnet19'", "Did you mean: resnet18"]),
    (["train", "digits", "simple_cnn", "--ps", "1.5"], ["'ps' must be in [0, 1)"]),
    (["train", "digits", "simple_cnn", "--size", "0"], ["'size' must be a positive"]),
    (["train", "digits", "resnet18", "--size", "8"], ["too small for resnet18"]),
    (["train", "digits", "simple_cnn", "--sample", "1"], ["--sample must be at least 2"]),
    (["train", "digits", "resnet18", "--pretrained", "--size", "32"], ["No pretrained weights for resnet18",
                                                                         "--weights"]),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(cli, tmp_path, monkeypatch, args, phrases):
    monkeypatch.setenv("FASTCLS_WEIGHTS", str(tmp_path / "weights"))
    runs = tmp_path / "runs"
    _assert_clean_error(cli(*args, "--runs-dir", runs, "--quiet"), *phrases, runs=runs)


def test_missing_and_wrong_data_folder(cli, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "pets.py").write_text(
        "from fastcls.recipe import Recipe\nrecipe = Recipe(name='pets', layout='folder', size=16)\n")
    runs = tmp_path / "runs"
    base = ["train", "pets", "simple_cnn", "--recipes", tmp_path / "recipes", "--runs-dir", runs, *TINY]
    _assert_clean_error(cli(*base), "no default data folder", "--data", runs=runs)
    _assert_clean_error(cli(*base, "--data", tmp_path / "nowhere"), "does not exist", runs=runs)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    _assert_clean_error(cli(*base, "--data", tmp_path / "flat"), "does not match the 'folder' layout",
                        "train/<class>/<image>", runs=runs)


def test_unknown_run(cli, digits_store):
    _assert_clean_error(cli("show", "no-such-run", "--runs-dir", digits_store), "No run 'no-such-run'", "fastcls runs")


def test_an_error_off_a_terminal_is_one_unbroken_line(cli, digits_store, tmp_path):
    """Off a terminal (a pipe, a log, a notebook's `!fastcls`) an error is not wrapped: a long path and the command
    it suggests stay whole on one line, to be copied or grepped."""
    deep = tmp_path / ("store-with-a-long-name-" * 8)
    shutil.copytree(digits_store, deep)
    res = cli("show", "no-such-run", "--runs-dir", deep)
    line = next(x for x in res.stderr.splitlines() if x.startswith("Error:"))
    assert len(line) > 200 and f"No run 'no-such-run' in {deep}. List the runs with `fastcls runs`" in line, res.stderr


def test_ensemble_cli_stores_a_run_and_writes_a_submission(cli, tmp_path):
    """Three real tiny digits runs of two archs -> `fastcls ensemble` -> stored ensemble run + submission CSV."""
    import pandas as pd
    runs = tmp_path / "runs"
    # one seed: every member must share the validation split (a different split is refused by design)
    for arch, ps in (("simple_cnn", 0.1), ("simple_cnn", 0.5), ("seed_cnn64", 0.25)):
        res = cli("train", "digits", arch, *TINY, "--ps", ps, "--name", f"{arch}-{ps}", "--runs-dir", runs)
        assert res.exit_code == 0, res.output
    names = ["simple_cnn-0.1", "simple_cnn-0.5", "seed_cnn64-0.25"]
    for method in ("mean", "weighted", "rank", "vote", "hill", "stack"):
        res = cli("ensemble", *names, "--method", method, "--runs-dir", runs, "--submission", tmp_path / f"{method}.csv")
        assert res.exit_code == 0, res.output
        assert "ensemble" in res.stdout and "gain" in res.stdout
        sub = pd.read_csv(tmp_path / f"{method}.csv", dtype=str)
        assert list(sub.columns) == ["id", "label"] and len(sub) == 297
    assert cli("runs", "--runs-dir", runs).stdout.count("ensemble") >= 6
    n_before = len(list(runs.iterdir()))
    _assert_clean_error(cli("ensemble", "simple_cnn-0.1", "nope", "--runs-dir", runs), "No run 'nope'")
    _assert_clean_error(cli("ensemble", *names, "--weights", "1,x", "--runs-dir", runs), "--weights must be")
    assert len(list(runs.iterdir())) == n_before, "a refused ensemble writes nothing"
