"""Performance features, checked for correctness only (speed lives in bench/): the pre-resized image cache gives the
same tensors as decoding the originals, follows changed files, keys sizes and crops apart, and `fastcls cache` fills
it; the hardware switches (mixed precision, channels-last, compile) reach the learner and the run's record."""

import json
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from fastcls.data.cache import CachedImageGetter, cache_settings, fill_cache, use_cache
from fastcls.data import ImageGetter, dls, item_tfms, read_items
from fastcls.data import test_dl as make_test_dl  # aliased: pytest would collect a name starting with test_
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe, get_recipe



def make_photos(root, classes=("cat", "dog"), n=6, test=3, size=(72, 48)):
    """Folder data with noisy images well above the working size (so resizing really changes pixels)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "train" / c / f"{i}.png")
    (root / "test").mkdir()
    for i in range(test):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / "test" / f"t{i}.jpg")
    return root


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("FASTCLS_CACHE", str(d))
    return d


def _all_batches(d, items):
    """Every batch the pipeline makes, in a fixed order: train (unshuffled), valid, test."""
    train = d.train.new(shuffle=False, drop_last=False)
    return [x for x, _ in train] + [x for x, _ in d.valid] + [b[0] for b in make_test_dl(d, items)]


@pytest.mark.parametrize("crop, trim, in_memory", [("none", (0, 0, 0, 0), True), ("center", (0, 0, 0, 0), False),
                                                  ("trim", (4, 2, 0.1, 3), True), ("trim", (4, 2, 0.1, 3), False)])
def test_cache_gives_the_same_tensors_cold_and_warm(tmp_path, cache_dir, monkeypatch, crop, trim, in_memory):
    if not in_memory:  # too big to keep in memory: each item is read from the disk cache every epoch
        monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "0")
    root = make_photos(tmp_path / "data")
    r = Recipe(name="p", layout="folder", size=20, bs=4, crop=crop, trim=trim, aug=False)
    items = read_items(r, root)
    plain = dls(r.override(cache=False), items, seed=3)
    assert not plain.cached and not (cache_dir / "images").exists()
    want = _all_batches(plain, items)
    for state in ("cold", "warm"):
        d = dls(r.override(cache=True), items, seed=3)
        assert d.cached == ("disk+memory" if in_memory else "disk")
        got = _all_batches(d, items)
        assert len(got) == len(want)
        for a, b in zip(want, got):
            assert a.shape == b.shape and torch.equal(a, b), f"{state} cache differs from the originals"
    n_images = len(items.train) + len(items.test)
    assert len(list(cache_dir.rglob("*.npy"))) == n_images
    assert not list(cache_dir.rglob(".tmp-*"))


@pytest.mark.parametrize("crop", ["none", "trim"])
def test_presized_arrays_give_the_same_tensors(crop):
    r = get_recipe("digits").override(size=20, bs=16, aug=False, crop=crop, trim=(1, 0, 2, 0))
    items = read_items(r)
    plain = dls(r.override(cache=False), items, seed=0, sample=64)
    fast = dls(r, items, seed=0, sample=64)
    assert plain.cached is None and fast.cached == "memory"
    for a, b in zip(_all_batches(plain, items), _all_batches(fast, items)):
        assert a.shape == b.shape and torch.equal(a, b)
    # items not seen when the DataLoaders were built (another test set) are made on first use, the same way
    other = items.train.iloc[100:110].reset_index(drop=True)
    a, b = (torch.cat([x[0] for x in d.test_dl(other)]) for d in (plain, fast))
    assert torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 1])
def test_presized_batches_match_item_by_item_batches_shuffled_with_labels(workers):
    r = get_recipe("digits").override(size=16, bs=16, aug=False)
    items = read_items(r)
    plain = dls(r.override(cache=False), items, seed=5, sample=100, num_workers=0)
    fast = dls(r, items, seed=5, sample=100, num_workers=workers)
    assert type(fast.train).__name__ == "PresizedDL" and type(plain.train).__name__ == "TfmdDL"
    for dl_a, dl_b in ((plain.train, fast.train), (plain.valid, fast.valid)):
        a, b = list(dl_a), list(dl_b)
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and type(xa) is type(xb) and type(ya) is type(yb)
    assert fast.train.one_batch()[0].shape == (16, 3, 16, 16)


def test_presizing_arrays_stays_within_the_memory_budget(monkeypatch):
    r = get_recipe("digits").override(size=16)
    items = read_items(r)
    assert dls(r, items, sample=64, num_workers=0).cached == "memory"
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "1000")
    assert dls(r, items, sample=64, num_workers=0).cached is None
    assert dls(r.override(cache=True), items, sample=64, num_workers=0).cached is None


def test_changed_source_invalidates_its_entry(tmp_path, cache_dir):
    root = make_photos(tmp_path / "data", n=3, test=0)
    r = Recipe(name="p", layout="folder", size=16, test_dir=None)
    items = read_items(r, root)
    get = CachedImageGetter(ImageGetter(), item_tfms(r), cache_settings(r))
    row = items.train.iloc[0]
    before = np.asarray(get(row))
    old_entry = get.entry(row["x"])
    assert old_entry.is_file() and np.array_equal(np.load(old_entry), before)
    # rewrite the source with other pixels, same size and name; move the mtime on explicitly (coarse clocks)
    st = os.stat(row["x"])
    Image.new("RGB", Image.open(row["x"]).size, (250, 10, 10)).save(row["x"])
    os.utime(row["x"], ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    after = np.asarray(get(row))
    assert np.array_equal(after, np.asarray(get.make(row))) and np.array_equal(after[0, 0], [250, 10, 10])
    assert not np.array_equal(after, before)
    assert get.entry(row["x"]) != old_entry and not old_entry.exists(), "the stale entry must be gone"
    assert len(list(cache_dir.rglob("*.npy"))) == 1


def test_cache_key_separates_sizes_and_crops(tmp_path, cache_dir):
    root = make_photos(tmp_path / "data", n=2, test=0)
    base = Recipe(name="p", layout="folder", test_dir=None, size=16)
    items = read_items(base, root)
    variants = [base, base.override(size=24), base.override(crop="center"),
                base.override(crop="trim", trim=(2, 0, 0, 0)),
                base.override(crop="trim", trim=(4, 0, 0, 0))]
    folders = set()
    for r in variants:
        st = fill_cache(r, items)
        assert st.written == len(items.train) and st.hits == 0
        settings = json.loads((st.folder / "settings.json").read_text())
        assert settings["size"] == r.size and settings["crop"] == r.crop
        assert all(np.load(p).shape == (r.size, r.size, 3) for p in st.folder.rglob("*.npy"))
        folders.add(st.folder)
    assert len(folders) == len(variants)
    # settings that do not touch the cached stage (augmentation, batch size) share the entries
    assert fill_cache(base.override(aug=False, bs=7, max_rotate=30.0), items).hits == len(items.train)


def test_auto_rule_and_overrides(tmp_path):
    root = make_photos(tmp_path / "data", n=2, test=0, size=(48, 40))
    r = Recipe(name="p", layout="folder", test_dir=None, size=16)
    items = read_items(r, root)
    assert use_cache(r, items)  # 48x40 = 1920 px > 2 x 16^2
    assert not use_cache(r.override(size=32), items)  # 1920 < 2 x 32^2
    assert use_cache(r.override(size=32, cache=True), items) and not use_cache(r.override(cache=False), items)
    digits = get_recipe("digits")
    assert not use_cache(digits.override(cache=True), read_items(digits)), "arrays in memory are never cached"


def test_concurrent_fills_leave_whole_entries(tmp_path, cache_dir):
    root = make_photos(tmp_path / "data", n=8, test=4)
    r = Recipe(name="p", layout="folder", size=16)
    items = read_items(r, root)
    errors = []

    def fill():
        try:
            fill_cache(r, items, threads=2)
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)
    threads = [threading.Thread(target=fill) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    entries = list(cache_dir.rglob("*.npy"))
    assert len(entries) == 20 and not list(cache_dir.rglob(".tmp-*"))
    get = CachedImageGetter(ImageGetter(), item_tfms(r), cache_settings(r))
    for row in items.train.to_dict("records"):
        assert np.array_equal(np.load(get.entry(row["x"])), np.asarray(get.make(row)))


def test_cache_reads_parse_headers_one_thread_at_a_time_and_refuse_damaged_entries(tmp_path, cache_dir, monkeypatch):
    """numpy parses an .npy header with ast.literal_eval, which CPython 3.11 cannot run in two threads at once
    (SystemError "AST constructor recursion depth mismatch", seen once in CI); entries are read from threads, so
    every header parse must hold the reader's lock. A damaged entry is a miss (rebuilt), never an error."""
    import ast
    import fastcls.data.cache as fcache
    root = make_photos(tmp_path / "data", n=8, test=0)
    r = Recipe(name="p", layout="folder", size=16, test_dir=None)
    items = read_items(r, root)
    fill_cache(r, items)
    get = CachedImageGetter(ImageGetter(), item_tfms(r), cache_settings(r))
    rows = items.train.to_dict("records")
    unlocked, real = [], ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda *a: unlocked.append(not fcache._NPY_PARSE.locked()) or real(*a))
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda row: np.asarray(get(row)), rows * 5))
    assert len(unlocked) == 5 * len(rows) and not any(unlocked), "a header parsed without the lock"
    for row, arr in zip(rows * 5, got):
        assert np.array_equal(arr, np.asarray(get.make(row)))
    entry = get.entry(rows[0]["x"])
    entry.write_bytes(entry.read_bytes()[:-7])  # truncated
    assert np.array_equal(np.asarray(get(rows[0])), np.asarray(get.make(rows[0])))
    assert np.array_equal(np.load(entry), np.asarray(get.make(rows[0]))), "the damaged entry was rewritten whole"


def _recipe_file(folder, data, **kw):
    folder.mkdir(exist_ok=True)
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    (folder / "photos.py").write_text("from fastcls.recipe import Recipe\n"
                                      f"recipe = Recipe(name='photos', layout='folder', data={str(data)!r}, size=16, "
                                      f"pretrained=False, bs=4{extra})\n")
    return folder


def test_cache_command_fills_the_cache(cli, tmp_path, cache_dir):
    root = make_photos(tmp_path / "data")
    recipes = _recipe_file(tmp_path / "recipes", root)
    res = cli("cache", "photos", "--recipes", recipes, "--size", 24)
    assert res.exit_code == 0, res.output
    assert "15 images at 24 px" in res.stdout and "15 written, 0 already cached" in res.stdout
    entries = list(cache_dir.rglob("*.npy"))
    assert len(entries) == 15 and all(np.load(p).shape == (24, 24, 3) for p in entries)
    res = cli("cache", "photos", "--recipes", recipes, "--size", 24)
    assert res.exit_code == 0 and "0 written, 15 already cached" in res.stdout
    res = cli("cache", "digits")
    assert res.exit_code == 2 and "arrays in memory" in res.stderr and "nothing to cache" in res.stderr



def test_cache_command_fills_each_progressive_size(cli, tmp_path, cache_dir):
    """`cache --size 16,24` caches both sizes a progressive run reads; the single-size commands then find them all."""
    recipes = _recipe_file(tmp_path / "recipes", make_photos(tmp_path / "data"))
    res = cli("cache", "photos", "--recipes", recipes, "--size", "16,24")
    assert res.exit_code == 0, res.output
    out = res.stdout.replace("\n", " ")
    assert out.index("15 images at 16 px") < out.index("15 images at 24 px") and out.count("15 written") == 2
    shapes = sorted(np.load(p).shape[0] for p in cache_dir.rglob("*.npy"))
    assert shapes == [16] * 15 + [24] * 15
    for size in (16, 24):
        res = cli("cache", "photos", "--recipes", recipes, "--size", size)
        assert res.exit_code == 0 and "0 written, 15 already cached" in res.stdout, res.output
    res = cli("cache", "photos", "--recipes", recipes, "--size", "0,24")
    assert res.exit_code == 2 and "progressive_sizes" in res.stderr and "Traceback" not in res.output

def test_train_with_cache_and_hardware_flags_on_cpu(cli, tmp_path, cache_dir):
    root = make_photos(tmp_path / "data")
    recipes = _recipe_file(tmp_path / "recipes", root, tta=1)
    runs = tmp_path / "runs"
    res = cli("train", "photos", "simple_cnn", "--recipes", recipes, "--runs-dir", runs, "--epochs", 1, "--quiet",
              "--cache", "--amp", "--channels-last", "--workers", 0)
    assert res.exit_code == 0, res.output
    run = next(p for p in runs.iterdir() if p.is_dir())
    meta = json.loads((run / "meta.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    assert meta["image_cache"] == "disk+memory" and len(list(cache_dir.rglob("*.npy"))) == 15
    assert meta["accel"] == {"device": "cpu", "amp": "bf16", "channels_last": True, "compile": None}
    assert cfg["amp"] is True and cfg["channels_last"] is True and cfg["cache"] is True and cfg["workers"] == 0
    assert np.isfinite(np.load(run / "valid_probs.npy")).all()
    res = cli("train", "photos", "simple_cnn", "--recipes", recipes, "--runs-dir", runs, "--workers", -1)
    assert res.exit_code == 2 and "--workers" in res.output


def test_hardware_defaults_off_on_cpu_and_compile_wiring():
    from fastcls.hardware import resolve_accel
    from fastcls.config import RunConfig
    from fastcls.train import learner
    assert resolve_accel(cuda=False) == {"device": "cpu", "amp": None, "channels_last": False, "compile": None}
    assert resolve_accel(cuda=False, amp=True)["amp"] == "bf16"
    with pytest.raises(FastclsError, match="Unknown torch.compile backend 'nope'"):
        resolve_accel(cuda=False, compile="nope")
    r = get_recipe("digits").override(size=16, bs=16, epochs=1, freeze_epochs=0)
    d = dls(r, read_items(r), sample=64, num_workers=0)
    learn = learner(d, RunConfig(r, "simple_cnn", compile="eager"))  # dynamo wiring without a C++ build
    assert learn.accel["compile"] == "eager"
    keys = set(learn.model.state_dict())
    learn.fit(1)
    assert set(learn.model.state_dict()) == keys, "compiling in place keeps the parameter names (saved weights)"
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_small_image_files_are_kept_in_memory_without_the_disk_cache(tmp_path, cache_dir):
    root = make_photos(tmp_path / "data", size=(20, 12))
    r = Recipe(name="p", layout="folder", size=16, bs=4, aug=False)
    items = read_items(r, root)
    assert not use_cache(r, items)  # 240 px per image < 2 x 16^2: decoding is cheap, no disk cache
    plain, fast = dls(r.override(cache=False), items, seed=1), dls(r, items, seed=1)
    assert plain.cached is None and fast.cached == "memory" and not (cache_dir / "images").exists()
    for a, b in zip(_all_batches(plain, items), _all_batches(fast, items)):
        assert torch.equal(a, b)
