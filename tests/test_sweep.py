"""Sweeps as a user meets them: one stored run per grid point, a table and a plot, resume after an interruption,
the cached-feature fast path (reused across sweeps, transplantable weights), the dropout check, and bad grid values
refused before anything trains."""

import json
import struct

import numpy as np
import pandas as pd
import pytest
import torch

import fastcls.experiments.features
import fastcls.train.run
from fastcls.archs import ARCHS, ArchSpec, SimpleCNN, build_model, register_arch
from fastcls.errors import FastclsError
from fastcls.runs import RunStore
from fastcls.experiments.sweep import check_dropout, list_sweeps, load_sweep, parse_values

from .conftest import TINY

# the fast path on digits: random frozen simple_cnn body, head trained 2 frozen epochs on 2 cached views
FAST = ["--epochs", "0", "--freeze-epochs", "2", "--size", "16", "--bs", "32", "--sample", "200", "--tta", "1",
        "--no-pretrained", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Counter:
    """Wrap a function and count its calls; optionally raise KeyboardInterrupt on call number `interrupt_at`."""

    def __init__(self, fn, interrupt_at=None):
        self.fn, self.calls, self.interrupt_at = fn, 0, interrupt_at

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def _sweep_id(stdout: str) -> str:
    return next(w for w in stdout.split() if w.startswith("sw-")).rstrip(":")


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def fast_sweep(tmp_path_factory):
    """One fast dropout sweep (ps 0, 0.3) on digits, with feature computations counted."""
    from typer.testing import CliRunner
    from fastcls.cli import app
    runs = tmp_path_factory.mktemp("sweeps")
    mp = pytest.MonkeyPatch()
    computed = Counter(fastcls.experiments.features.compute_features)
    mp.setattr(fastcls.experiments.features, "compute_features", computed)
    try:
        res = CliRunner().invoke(app, ["sweep-dropout", "digits", "simple_cnn", "--ps", "0,0.3", *FAST,
                                       "--runs-dir", str(runs)])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return runs, _sweep_id(res.stdout), res.stdout, computed.calls


def test_fast_dropout_sweep_stores_one_run_per_ps_a_table_and_a_plot(cli, fast_sweep):
    runs, sid, stdout, computed = fast_sweep
    assert computed == 1, "one feature computation serves every ps"
    store = RunStore(runs)
    board = store.leaderboard(sweep=sid)
    assert sorted(board["ps"]) == [0.0, 0.3] and set(board["kind"]) == {"fast"}
    for _, row in board.iterrows():
        run = store.load(row["id"])
        assert run.config["fast"] is True and run.config["ps"] == row["ps"] and run.config["epochs"] == 0
        assert run.valid_probs.shape == (2, 40, 10) and run.test_probs.shape == (2, 297, 10)
        assert run.metrics["accuracy"] == pytest.approx((run.valid_probs[0].argmax(1) == run.valid_targets).mean())
        assert list(run.history["stage"]) == ["frozen", "frozen"]
    # the table: both ps values, the metric, one best row
    assert "0.3" in stdout and "accuracy" in stdout and "valid_loss" in stdout and stdout.count("best") >= 1
    folder = runs / "sweeps" / sid
    rec = json.loads((folder / "sweep.json").read_text())
    assert rec["status"] == "done" and [t["status"] for t in rec["trials"]] == ["done", "done"]
    assert {t["run_id"] for t in rec["trials"]} == set(board["id"])
    table = pd.read_csv(folder / "results.csv")
    assert list(table["ps"]) == [0.0, 0.3] and list(table["best"].fillna("")).count("best") == 1
    best = board.loc[board["metric"].idxmax()]
    assert rec["best"]["run_id"] == best["id"] or board["metric"].nunique() == 1
    assert _png_size(folder / "accuracy_vs_ps.png") == (640, 420)
    # listed and shown
    res = cli("sweeps", "--runs-dir", runs)
    assert res.exit_code == 0 and sid in res.stdout and "2/2" in res.stdout
    res = cli("show", sid[:6], "--runs-dir", runs)
    assert res.exit_code == 0 and sid in res.stdout and "accuracy_vs_ps.png" in res.stdout
    assert load_sweep(runs, sid)["id"] == sid and sid in list(list_sweeps(runs)["id"])


def test_fast_run_weights_are_the_full_model(fast_sweep):
    """The stored weights (frozen body + trained head) load into the arch's full model and reproduce the stored
    plain validation probabilities from the images."""
    from safetensors.torch import load_file
    from fastcls import data as fdata
    runs, sid, _, _ = fast_sweep
    store = RunStore(runs)
    run = store.load(store.leaderboard(sweep=sid).query("ps == 0.3")["id"].iloc[0])
    model = build_model("simple_cnn", 10, ps=0.3)
    model.load_state_dict(load_file(run.weights_path))
    model.eval()
    from fastcls.recipe import get_recipe
    recipe = get_recipe("digits").override(size=16)
    d = fdata.dls(recipe, fdata.read_items(recipe), seed=42, sample=200)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x.as_subclass(torch.Tensor)), 1)
                           for x, _ in d.valid.new(shuffle=False, drop_last=False)]).numpy()
    assert list(d.valid_ds.items["id"]) == run.valid_ids
    # the stored probabilities come from the head on the float16 feature cache (about 3 significant digits): the
    # full model in float32 reproduces them to float16 rounding, not bit for bit (a wrong head is off by ~1e-1)
    np.testing.assert_allclose(probs, run.valid_probs[0], atol=5e-4)


def test_a_second_sweep_reuses_the_cached_features(cli, fast_sweep, monkeypatch):
    runs, first_id, _, _ = fast_sweep
    computed = Counter(fastcls.experiments.features.compute_features)
    monkeypatch.setattr(fastcls.experiments.features, "compute_features", computed)
    res = cli("sweep-dropout", "digits", "simple_cnn", "--ps", "0.3,0.6", *FAST, "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    sid = _sweep_id(res.stdout)
    assert sid != first_id and computed.calls == 0, "same recipe, arch, size, data: the cache must be hit"
    assert "from the cache" in res.stdout
    store = RunStore(runs)
    a = store.load(store.leaderboard(sweep=first_id).query("ps == 0.3")["id"].iloc[0])
    b = store.load(store.leaderboard(sweep=sid).query("ps == 0.3")["id"].iloc[0])
    assert a.id != b.id
    np.testing.assert_array_equal(a.valid_probs, b.valid_probs)
    np.testing.assert_array_equal(a.test_probs, b.test_probs)
    folder = next((runs / "cache" / "features").glob("*/meta.json")).parent
    z = {k: np.load(folder / f"{k}.npy") for k in ("train", "valid", "test")}  # the cached views are augmented
    assert z["train"].shape == (2, 160, 256) and z["valid"].shape == (2, 40, 256) and z["test"].shape[1] == 297
    assert not np.allclose(z["train"][0], z["train"][1]) and not np.allclose(z["valid"][0], z["valid"][1])
    # a different image size is a different feature set
    res = cli("sweep-dropout", "digits", "simple_cnn", "--ps", "0.3", *FAST, "--size", "24", "--runs-dir", runs)
    assert res.exit_code == 0, res.output
    assert computed.calls == 1
    assert len(list((runs / "cache" / "features").glob("*/meta.json"))) == 2


@pytest.mark.parametrize("path", ["fast", "full"])
def test_an_interrupted_sweep_resumes_without_retraining_finished_trials(cli, fast_sweep, tmp_path, monkeypatch, path):
    """Ctrl-C in the middle of the 2nd trial's training; the same command then trains only the unfinished trials."""
    if path == "fast":  # shares the fixture's cache, so only heads train
        runs, args = fast_sweep[0], ["sweep", "digits", "--arch", "simple_cnn", "--ps", "0.1,0.2,0.4", "--lr", "0.01",
                                     *FAST]
        module = fastcls.experiments.features
    else:
        runs, args = tmp_path / "runs", ["sweep", "digits", "--arch", "simple_cnn", "--ps", "0,0.5", "--full", *TINY]
        module = fastcls.train.run
    args += ["--runs-dir", runs]
    first = Counter(module.train, interrupt_at=2)
    monkeypatch.setattr(module, "train", first)
    res = cli(*args)
    assert res.exit_code == 130 and first.calls == 2 and "Run the same command again to resume" in res.stderr
    assert "continues from its last finished epoch" in res.stderr, "the local executor's checkpoints are here"
    store = RunStore(runs)
    sweep_dir = next(p for p in (runs / "sweeps").iterdir()
                     if json.loads((p / "sweep.json").read_text())["status"] == "interrupted")
    rec = json.loads((sweep_dir / "sweep.json").read_text())
    assert [t["status"] for t in rec["trials"]][:2] == ["done", "interrupted"]
    done_id = rec["trials"][0]["run_id"]
    assert list(store.leaderboard(sweep=rec["id"])["id"]) == [done_id]
    assert not list(runs.glob(".tmp-*")), "the interrupted trial left nothing half-written"

    again = Counter(first.fn)
    monkeypatch.setattr(module, "train", again)
    res = cli(*args)
    assert res.exit_code == 0, res.output
    n = len(rec["trials"])
    assert again.calls == n - 1, "only the unfinished trials train"
    assert f"{n - 1} trial(s) trained now, 1 already" in res.stdout
    rec = load_sweep(runs, rec["id"])
    assert rec["status"] == "done" and rec["trials"][0]["run_id"] == done_id
    board = store.leaderboard(sweep=rec["id"])
    assert len(board) == n and board["name"].is_unique
    assert set(board["kind"]) == {"fast" if path == "fast" else "train"}


def _deaf_head(nf, n_out, ps):
    """A head that ignores ps (its dropout is never built), like timm heads whose dropout was never called."""
    from fastai.vision.learner import create_head
    return create_head(nf, n_out, ps=0.0)


@pytest.fixture
def deaf_arch():
    spec = register_arch(ArchSpec("deaf_cnn", "SmallCNN", factory=SimpleCNN, size=32, min_size=8, head=_deaf_head,
                                  description="test arch whose head has no working dropout"))
    yield spec.name
    del ARCHS[spec.name]


def test_dropout_check(deaf_arch):
    check_dropout("simple_cnn", 128, 10, [0.0, 0.1, 0.5])  # fastai's head: dropout fires exactly when ps > 0
    check_dropout(deaf_arch, 128, 10, [0.0])
    with pytest.raises(FastclsError, match=r"ps=0.2 would have no effect for deaf_cnn"):
        check_dropout(deaf_arch, 128, 10, [0.0, 0.2])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_registered_head_has_working_dropout_and_a_cacheable_input(arch):
    """Walk the registry: each arch's head passes the dropout check and splits into parameter-free pooling (what the
    fast path caches) and the rest, which maps pooled features to the same logits as the whole head."""
    from fastcls.archs import make_head, split_head
    check_dropout(arch, 16, 3, [0.0, 0.25])
    head = make_head(arch, 16, 3, 0.25).eval()
    pool, rest = split_head(head)
    assert not list(pool.parameters())
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rest(pool(x)), head(x))


def test_a_sweep_of_a_head_without_working_dropout_is_refused(cli, deaf_arch, tmp_path, monkeypatch):
    trained = _no_training(monkeypatch)
    runs = tmp_path / "runs"
    res = cli("sweep-dropout", "digits", deaf_arch, "--ps", "0,0.25", *FAST, "--runs-dir", runs)
    assert res.exit_code == 2, res.output
    assert "ps=0.25 would have no effect for deaf_cnn" in res.stderr.replace("\n", " ")
    assert trained() == 0 and not (runs / "sweeps").exists()


def _no_training(monkeypatch):
    counters = [Counter(fastcls.train.run.train), Counter(fastcls.experiments.features.train),
                Counter(fastcls.experiments.features.compute_features)]
    monkeypatch.setattr(fastcls.train.run, "train", counters[0])
    monkeypatch.setattr(fastcls.experiments.features, "train", counters[1])
    monkeypatch.setattr(fastcls.experiments.features, "compute_features", counters[2])
    return lambda: sum(c.calls for c in counters)


@pytest.mark.parametrize("args, phrases", [
    (["sweep-dropout", "digits", "simple_cnn", "--ps", "0.1,1.5"], ["'ps' must be in [0, 1)", "1.5"]),
    (["sweep-dropout", "digits", "simple_cnn", "--ps", "0.1,abc"], ["--ps: 'abc' is not a number"]),
    (["sweep-dropout", "digits", "simple_cnn", "--ps", "0.1,,0.2"], ["empty value"]),
    (["sweep-dropout", "digits", "simple_cnn", "--ps", "0.1,0.1"], ["ps=0.1 twice"]),
    (["sweep", "digits", "--arch", "simple_cnn,resnet19", "--ps", "0.1"], ["Unknown architecture 'resnet19'"]),
    (["sweep", "digits", "--arch", "simple_cnn", "--size", "16,4"], ["Image size 4 is too small for simple_cnn"]),
    (["sweep", "digits", "--arch", "simple_cnn", "--crop", "none,diagonal"], ["'crop' must be one of", "diagonal"]),
    (["sweep", "digits", "--arch", "simple_cnn", "--lr", "0.01,-1"], ["'lr' must be > 0", "-1"]),
    (["sweep", "digits", "--arch", "simple_cnn", "--size", "16,3x"], ["--size: '3x' is not a whole number"]),
    (["sweep", "digits", "--arch", "simple_cnn"], ["Nothing to sweep"]),
    (["sweep-dropout", "digits", "simple_cnn", "--fast", "--freeze-epochs", "0", "--ps", "0.1"],
     ["--freeze-epochs 0", "--full"]),
    (["sweep-dropout", "digits", "simple_cnn", "--full", "--epochs", "0", "--ps", "0.1"], ["would train nothing"]),
    (["sweep-dropout", "digits", "resnet18", "--pretrained", "--size", "32", "--ps", "0.1"],
     ["No pretrained weights for resnet18"]),
])
def test_bad_grid_values_are_refused_before_any_training(cli, tmp_path, monkeypatch, args, phrases):
    monkeypatch.setenv("FASTCLS_WEIGHTS", str(tmp_path / "weights"))
    trained = _no_training(monkeypatch)
    runs = tmp_path / "runs"
    size = [] if "--size" in args or args[0] == "sweep" else ["--size", "16"]  # sweep's --size is a grid
    extra = ["--sample", "200", "--quiet", *size,
             *([] if "--pretrained" in args else ["--no-pretrained"])]
    res = cli(*args, *extra, "--runs-dir", runs)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for p in phrases:
        assert p in res.stderr.replace("\n", " "), res.stderr
    assert trained() == 0
    assert not runs.exists() or not any(runs.iterdir()), "nothing may be written to the run store"


def test_parse_values_types_values_like_the_recipe_setting():
    assert parse_values("ps", "0.1, 0.2") == (0.1, 0.2)
    assert parse_values("size", "64,128") == (64, 128)
    assert parse_values("crop", "none,center") == ("none", "center")
    with pytest.raises(FastclsError, match="no setting 'pss'"):
        parse_values("pss", "0.1")
