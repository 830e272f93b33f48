"""Interruption: Ctrl-C / SIGTERM / an exception mid-training leave a resumable run; resuming gives the same result.

Measured tolerance (CPU, one torch thread): a resumed run is bitwise equal to the uninterrupted one (weights,
validation and test probabilities, metrics, history: max |difference| 0.0). The tests allow 1e-6.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastcls.train.checkpoint import RunInterrupted, read_checkpoint
from fastcls.config import RunConfig
from fastcls.runs import CHECKPOINT, RunStore
from fastcls.train import fit_run, resume_run

from ._proc import one_thread  # noqa: F401  (fixture; `wave`: conftest)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from resume_tolerance import differences, outputs  # noqa: E402  (the benchmark's own comparison)

TOL = 1e-6
pytestmark = pytest.mark.usefixtures("one_thread")
TINY3 = dict(seed=3, sample=200, size=16, epochs=3, freeze_epochs=0, bs=16, tta=1, pretrained=False)

CONFIGS = {
    "plain": lambda w: RunConfig.from_options("digits", "simple_cnn", **TINY3),
    # frozen stage of 1 epoch + 2 unfrozen, early stopping with patience 1 (its state is checkpointed too)
    "frozen": lambda w: RunConfig.from_options("digits", "simple_cnn", weights=w,
                                    **{**TINY3, "freeze_epochs": 1, "epochs": 2, "tta": 0}, patience=1),
    # the same with an EMA of the unfrozen stage (its average is checkpointed; the better model is kept)
    "ema": lambda w: RunConfig.from_options("digits", "simple_cnn", weights=w,
                                 **{**TINY3, "freeze_epochs": 1, "epochs": 2, "tta": 0}, ema=0.7),
    # ReduceLROnPlateau: its wait counter and best value are checkpointed with the lr it set
    "plateau": lambda w: RunConfig.from_options("digits", "simple_cnn", **{**TINY3, "epochs": 4, "lr": 0.05},
                                                sched="plateau", sets=["lr_patience=2", "lr_gamma=0.5"]),
    # ranger: fastai's Lookahead keeps a step count and slow weights beside RAdam's state
    "ranger": lambda w: RunConfig.from_options("digits", "simple_cnn", **{**TINY3, "epochs": 2}, opt="ranger"),
    # progressive resizing: the smaller size's loaders share the shuffling generators the checkpoint saves
    "progressive": lambda w: RunConfig.from_options("digits", "simple_cnn", **{**TINY3, "size": "16,20"}),
    # gradient accumulation: 10 micro-batches per epoch, steps after 3, 6, 9; the 10th is dropped
    "accum": lambda w: RunConfig.from_options("digits", "simple_cnn", **TINY3, accum=3),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return RunStore(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def reference(store, body_weights):
    """The uninterrupted run of each config."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fit_run(CONFIGS[name](body_weights), store, progress="none").run_id
        return cache[name]
    return get


def _interrupt(cfg, store, point, monkeypatch):
    monkeypatch.setenv("FASTCLS_FAULT", f"{point}:interrupt")
    with pytest.raises(RunInterrupted) as e:
        fit_run(cfg, store, progress="none")
    monkeypatch.delenv("FASTCLS_FAULT")
    return e.value


@pytest.mark.parametrize("config, point", [
    ("plain", "after-epoch-0"),   # between epochs
    ("plain", "batch-2-5"),       # in the middle of the last epoch
    ("frozen", "after-epoch-0"),  # at the end of the frozen stage: the optimizer state is reset by unfreezing
    ("ema", "after-epoch-0"),     # before the average starts: it starts from the restored weights
    ("ema", "after-epoch-1"),     # the average halfway: restored from the checkpoint
    ("plateau", "after-epoch-1"),  # the plateau callback's wait counter restored (patience 2)
    ("ranger", "after-epoch-0"),  # 10 steps done: the next slow-weight sync (every 6) needs the saved count
    ("progressive", "after-epoch-0"),  # interrupted at 16 px: resumes at 16 px, then 20 px
    ("accum", "after-epoch-0"),
])
def test_resume_gives_the_uninterrupted_result(store, reference, body_weights, config, point, monkeypatch):
    ref = reference(config)
    e = _interrupt(CONFIGS[config](body_weights), store, point, monkeypatch)
    rid = e.run_id
    assert f"fastcls resume {rid}" in str(e)
    row = store.resolve(rid)
    assert row["status"] == "interrupted"
    meta = json.loads((store.root / rid / "meta.json").read_text())
    done = int(point.split("-")[-1]) + 1 if point.startswith("after") else int(point.split("-")[1])
    assert meta["epochs_done"] == done
    ck = read_checkpoint(store.root / rid / CHECKPOINT)
    if done:
        assert ck["meta"]["epochs_done"] == done and len(ck["meta"]["history"]) == done
        assert {"rng.torch", "rng.numpy", "rng.python", "rng.dl0"} <= set(ck["tensors"])
        assert ck["tensors"]["rng.torch"].dtype == torch.uint8
    with pytest.raises(Exception, match="interrupted: it has no predictions yet"):
        store.load(rid)
    res = resume_run(store, rid, progress="none")
    assert res.run_id == rid and store.resolve(rid)["status"] == "done"
    assert not (store.root / rid / CHECKPOINT).exists(), "a finished run keeps its weights, not its checkpoint"
    if config == "ema":
        ref_meta = store.load(ref).meta["ema"]
        assert ref_meta == store.load(rid).meta["ema"] and ref_meta["updates"] == 2 * 10  # 160 train items / bs 16
        if point == "after-epoch-1":
            assert ck["meta"]["ema_updates"] == 10 and any(k.startswith("ema.") for k in ck["tensors"])
    if config == "ranger":
        assert ck["meta"]["opt"]["lookahead_count"] == 10 and "slow.0.0" in ck["tensors"]
    if config == "plateau":
        assert ck["meta"]["plateau"]["wait"] == 1, "the interruption must fall while the plateau callback waits"
    d = differences(outputs(store, ref), outputs(store, rid))
    print(f"resume tolerance {config} at {point}: {d}")
    assert max(d.values()) <= TOL, d


def test_best_epoch_is_kept_across_the_interruption(store, reference, body_weights, monkeypatch):
    """Interrupted after the last epoch, while predicting: the checkpoint holds the best epoch's weights by the
    metric (not the last epoch's); resume only predicts, from those weights."""
    ref = store.load(reference("plain"))
    e = _interrupt(CONFIGS["plain"](body_weights), store, "after-epoch-2", monkeypatch)
    ck = read_checkpoint(store.root / e.run_id / CHECKPOINT)
    hist = [r["accuracy"] for r in ck["meta"]["history"]]
    best_epoch = int(np.argmax(hist))  # first of equal maxima, as fastai's tracker (strictly greater) keeps
    assert ck["meta"]["keep"]["best_epoch"] == best_epoch and ck["meta"]["keep"]["best"] == pytest.approx(max(hist))
    best = {k[5:]: v for k, v in ck["tensors"].items() if k.startswith("best.")}
    last = {k[6:]: v for k, v in ck["tensors"].items() if k.startswith("model.")}
    assert best and best.keys() == last.keys()
    if best_epoch != len(hist) - 1:
        assert any(not torch.equal(best[k], last[k]) for k in best), "best and last epoch weights must differ"
    resume_run(store, e.run_id, progress="none")
    final = load_file(store.load(e.run_id).weights_path)
    assert all(torch.equal(final[k], best[k]) for k in best), "the stored model must be the best epoch's"
    assert store.load(e.run_id).metrics["best_epoch"] == ref.metrics["best_epoch"] == best_epoch
    d = differences(outputs(store, ref.id), outputs(store, e.run_id))
    assert max(d.values()) <= TOL, d


def test_a_crash_marks_the_run_failed_and_it_can_be_resumed(store, reference, body_weights, monkeypatch):
    import fastcls.train.run as ftrain
    real = ftrain.predict_views
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(ftrain, "predict_views", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        fit_run(CONFIGS["plain"](body_weights), store, progress="none")
    rid = store.leaderboard(status="failed")["id"].iloc[0]
    meta = json.loads((store.root / rid / "meta.json").read_text())
    assert meta["status"] == "failed" and "out of memory" in meta["note"] and meta["epochs_done"] == 3
    monkeypatch.setattr(ftrain, "predict_views", real)
    resume_run(store, rid, progress="none")
    d = differences(outputs(store, reference("plain")), outputs(store, rid))
    assert max(d.values()) <= TOL, d


def test_signals_to_real_training_processes_then_cli_resume(cli, wave, store, reference):
    """SIGTERM (a scheduler's kill) and SIGINT (Ctrl-C) mid-epoch 2 of real `fastcls train` processes: exit 130,
    runs 'interrupted' with the finished epoch saved; `fastcls resume` gives the uninterrupted result."""
    root, res = wave
    board = RunStore(root)
    for k in ("sigterm", "sigint"):
        code, out, err = res[k]
        assert code == 130, err
        assert "interrupted" in err and f"fastcls resume {board.resolve(k)['id']}" in " ".join(err.split())
        assert f"interrupted ({'Ctrl-C' if k == 'sigint' else 'SIGTERM'}) after 1 of 3 epochs" in " ".join(err.split())
        assert "Traceback" not in err
        rid = board.resolve(k)["id"]
        assert board.resolve(rid)["status"] == "interrupted"
        assert read_checkpoint(root / rid / CHECKPOINT)["meta"]["epochs_done"] == 1
    rid = board.resolve("sigterm")["id"]
    res_ = cli("show", rid, "--runs-dir", root)
    assert res_.exit_code == 0 and "after 1 of 3 epochs" in res_.stdout and "fastcls resume" in res_.stdout
    res_ = cli("resume", "sigterm", "--runs-dir", root, "--quiet")
    assert res_.exit_code == 0, res_.output
    d = differences(outputs(store, reference("plain")), outputs(RunStore(root), rid))
    assert max(d.values()) <= TOL, d
    res_ = cli("resume", rid, "--runs-dir", root)
    assert res_.exit_code == 2 and "already done" in res_.stderr


def test_ctrl_c_outside_training_names_the_command(cli, monkeypatch):
    """Ctrl-C while a command reads data (no run yet): exit 130, what stopped and what to do, no traceback."""
    import fastcls.data

    def interrupted(*a, **k):
        raise KeyboardInterrupt()
    monkeypatch.setattr(fastcls.data, "check_data", interrupted)
    res = cli("check", "digits")
    assert res.exit_code == 130 and "Traceback" not in res.output and "()" not in res.output
    assert "Interrupted: `fastcls check` stopped by Ctrl-C before it finished" in " ".join(res.stderr.split())
