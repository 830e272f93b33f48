"""The fast path's feature cache at scale: float16 `.npy` files read memory-mapped, older float32 `.npz` caches
converted (or rebuilt when damaged), head sweeps unchanged within float16's precision, and a cache that would not fit
on the disk refused before anything is computed or written."""

import json
import os
from collections import namedtuple

import numpy as np
import pytest

import fastcls.budget
import fastcls.experiments.features as features
from fastcls.runs import RunStore

from .test_sweep import FAST, Counter, _sweep_id

pytestmark = pytest.mark.usefixtures("one_thread")
SWEEP = ["sweep-dropout", "digits", "simple_cnn", "--ps", "0.3", *FAST]


def _cache(runs):
    return runs / "cache" / "features"


def _probs(runs, sid):
    store = RunStore(runs)
    run = store.load(store.leaderboard(sweep=sid)["id"].iloc[0])
    return np.asarray(run.valid_probs), np.asarray(run.test_probs)


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """One fast sweep (ps 0.3) with the default float16 cache."""
    from typer.testing import CliRunner
    from fastcls.cli import app
    runs = tmp_path_factory.mktemp("half")
    res = CliRunner().invoke(app, [*SWEEP, "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.output
    return runs, _sweep_id(res.stdout)


def test_features_are_cached_as_float16_and_read_memory_mapped(half, tmp_path):
    runs, _ = half
    folder = next(_cache(runs).glob("*/meta.json")).parent
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "float16" and not list(_cache(runs).glob("*.npz"))
    for k in ("train", "valid", "test"):
        assert np.load(folder / f"{k}.npy", mmap_mode="r").dtype == np.float16
    fs = features._load(folder)
    assert isinstance(fs.train, np.memmap) and fs.train.dtype == np.float16 and fs.train.shape == (2, 160, 256)
    assert fs.train_targets.dtype == np.int64 and len(fs.valid_ids) == 40


def test_head_sweep_results_match_float32_features_within_tolerance(cli, half, tmp_path, monkeypatch):
    runs, sid = half
    monkeypatch.setattr(features, "FEATURE_DTYPE", np.float32)
    res = cli(*SWEEP, "--runs-dir", tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads(next(_cache(tmp_path).glob("*/meta.json")).read_text())["dtype"] == "float32"
    (v16, t16), (v32, t32) = _probs(runs, sid), _probs(tmp_path, _sweep_id(res.stdout))
    np.testing.assert_allclose(v16, v32, atol=5e-3)
    np.testing.assert_allclose(t16, t32, atol=5e-3)
    assert (v16[0].argmax(1) == v32[0].argmax(1)).mean() >= 0.95


def _as_v1(folder, path):
    """Rewrite a format-2 cache folder as the single float32 .npz that fastcls wrote before (format 1)."""
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {k: np.load(folder / f"{k}.npy").astype(np.float32 if k in ("train", "valid", "test") else np.int64)
              for k in meta["shapes"]}
    with np.load(folder / "bn.npz") as z:
        arrays.update({f"bn:{k}": z[k] for k in z.files})
    old = {k: meta[k] for k in ("key", "arch", "nf", "vocab", "valid_ids", "test_ids", "body_hash", "stats",
                                "seconds")}
    with open(path, "wb") as f:
        np.savez(f, meta=np.array(json.dumps({"format": 1, **old})), **arrays)


def test_an_older_float32_npz_cache_is_converted_without_recomputing(cli, half, tmp_path, monkeypatch):
    import shutil
    runs, sid = half
    src = next(_cache(runs).glob("*/meta.json")).parent
    cache = _cache(tmp_path)
    cache.mkdir(parents=True)
    _as_v1(src, cache / f"{src.name}.npz")
    computed = Counter(features.compute_features)
    monkeypatch.setattr(features, "compute_features", computed)
    res = cli(*SWEEP, "--runs-dir", tmp_path)
    assert res.exit_code == 0, res.output
    assert computed.calls == 0, "the old cache is read, not recomputed"
    assert not list(cache.glob("*.npz")) and (cache / src.name / "meta.json").is_file()
    assert np.load(cache / src.name / "train.npy").dtype == np.float16
    np.testing.assert_allclose(_probs(tmp_path, _sweep_id(res.stdout))[0], _probs(runs, sid)[0], atol=1e-5)
    # a damaged old cache is rebuilt cleanly
    shutil.rmtree(cache / src.name)
    (cache / f"{src.name}.npz").write_bytes(b"PK\x03\x04 not a zip")
    res = cli(*[("0.4" if a == "0.3" else a) for a in SWEEP], "--runs-dir", tmp_path)  # a new sweep, same features
    assert res.exit_code == 0, res.output
    assert computed.calls == 1 and not list(cache.glob("*.npz")) and (cache / src.name / "meta.json").is_file()


def test_a_feature_cache_that_would_not_fit_on_disk_is_refused_before_anything_is_written(cli, tmp_path,
                                                                                        monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fastcls.budget.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    computed = Counter(features.compute_features)
    monkeypatch.setattr(features, "compute_features", computed)
    res = cli(*SWEEP, "--runs-dir", tmp_path)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "Not enough disk space" in res.stderr and "1.0 MiB free" in res.stderr
    assert "Nothing was written" in res.stderr
    assert computed.calls == 0
    assert not _cache(tmp_path).exists() or not any(_cache(tmp_path).iterdir())


def _digits_cfg(**kw):
    from fastcls.config import RunConfig
    return RunConfig.from_options("digits", "simple_cnn", ps=0.3, epochs=0, freeze_epochs=1, size=16, bs=32,
                                  sample=200, tta=1, pretrained=False, **kw)


def test_features_stream_into_the_cache_batch_by_batch_and_equal_the_in_memory_ones(tmp_path, monkeypatch):
    """While the body runs, the train features already extracted are on disk in the (temporary) cache file: nothing
    waits in memory for the end. The file holds exactly the in-memory extraction, in float16."""
    from fastcls.data import read_items
    cfg = _digits_cfg()
    items = read_items(cfg.recipe)
    rows_on_disk = []

    def spy(module, inputs, output):  # at each forward: how many train rows (view 0) are already in the file
        tmp = list(tmp_path.glob("*/.train.npy.tmp-*"))
        if tmp:
            a = np.load(tmp[0], mmap_mode="r")
            rows_on_disk.append(int((np.abs(a[0]).sum(1) > 0).sum()))

    body, _ = features.frozen_body(cfg)
    real = features.frozen_body
    monkeypatch.setattr(features, "frozen_body", lambda c: (body, real(c)[1]))
    hook = body.register_forward_hook(spy)
    fs, _ = features.cached_features(cfg, items, 2, tmp_path, progress="none")
    hook.remove()
    n = fs.train.shape[1]
    assert isinstance(fs.train, np.memmap) and fs.train.dtype == np.float16 and n == 160
    # batches of FEATURE_BS, 2 views each: at each forward pass the rows of view 0 of every earlier batch (and of this
    # batch once its view 0 is done) are already in the file; the file appears at the first batch's first write
    ends = list(range(features.FEATURE_BS, n, features.FEATURE_BS)) + [n]
    want = [ends[0]] + [r for lo, hi in zip(ends, ends[1:]) for r in (lo, hi)]
    assert rows_on_disk == want, rows_on_disk
    assert not list(tmp_path.glob("*/.*.tmp-*")), "no temporary file is left"
    body2, _ = features.frozen_body(cfg)
    mem = features.compute_features(cfg, items, 2, body2, progress="none")
    for k in ("train", "valid", "test"):
        np.testing.assert_array_equal(np.asarray(getattr(fs, k)), getattr(mem, k).astype(np.float16), err_msg=k)
    np.testing.assert_array_equal(fs.train_targets, mem.train_targets)


def test_an_extraction_interrupted_half_way_leaves_no_cache(tmp_path, monkeypatch):
    from fastcls.data import read_items
    cfg = _digits_cfg()
    items = read_items(cfg.recipe)
    body, _ = features.frozen_body(cfg)
    real = features.frozen_body
    monkeypatch.setattr(features, "frozen_body", lambda c: (body, real(c)[1]))

    def interrupt(module, inputs, output):  # once valid's first batch is in its temporary file
        if list(tmp_path.glob("*/.valid.npy.tmp-*")):
            raise KeyboardInterrupt
    hook = body.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        features.cached_features(cfg, items, 1, tmp_path, progress="none")
    hook.remove()
    folder = next(tmp_path.iterdir())
    assert (folder / "train.npy").is_file()  # train was complete, valid was not
    assert not (folder / "valid.npy").exists() and not (folder / "meta.json").exists()
    assert not list(folder.glob(".*")), "no temporary file is left"
    assert features._load(folder) is None  # a miss: computed again next time
    # a killed extraction (SIGKILL: no clean-up) leaves its partial array; the next one removes it, not a live one's
    import subprocess
    import sys
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed, live = folder / f".valid.npy.tmp-{int(gone.stdout)}", folder / f".valid.npy.tmp-{os.getppid()}"
    killed.write_bytes(b"\0" * 1000)
    live.write_bytes(b"\0" * 10)
    fs, _ = features.cached_features(cfg, items, 1, tmp_path, progress="none")
    assert features._load(folder) is not None and fs.valid.shape[1] == 40
    assert not killed.exists() and live.exists()


def test_a_small_memory_budget_extracts_in_smaller_batches_with_the_same_features(tmp_path, monkeypatch):
    """FASTCLS_MEMORY_BUDGET caps the extraction's batch (16 px: 16 x 3 x 16² x 4 = 48 KiB per image, so 200K holds 4
    images); the plain views come out the same, and the cache is another one (other batches, other augmentations). The
    body's batch-norm statistics are kept: re-estimated ones would depend on the batches too."""
    from fastcls.data import read_items
    cfg = _digits_cfg(bn_stats="keep")
    items = read_items(cfg.recipe)
    sizes = []
    real = features.pooled_features
    monkeypatch.setattr(features, "pooled_features", lambda body, pool, dl, *a, **k: sizes.append(dl.bs) or real(
        body, pool, dl, *a, **k))
    full, _ = features.cached_features(cfg, items, 1, tmp_path, progress="none")
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "200K")
    small, _ = features.cached_features(cfg, items, 1, tmp_path, progress="none")
    assert sizes == [features.FEATURE_BS] * 3 + [4] * 3
    assert small.key != full.key and len(list(tmp_path.iterdir())) == 2
    for k in ("valid", "test"):  # view 0: the plain one (view 1 is a random TTA view)
        np.testing.assert_allclose(np.asarray(small.__dict__[k][0], np.float32),
                                   np.asarray(full.__dict__[k][0], np.float32), rtol=2e-3, atol=1e-3, err_msg=k)
