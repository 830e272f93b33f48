"""The image cache within its budgets: raw arrays when they fit, lossless PNG when only that fits the disk budget,
a cache that will not fit refused with the numbers before anything is written, and `$FASTCLS_MEMORY_BUDGET`
deciding what a run keeps in memory."""

from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

import fastcls.budget
from fastcls.budget import DISK_MARGIN, memory_budget, parse_bytes
from fastcls.data import dls, read_items
from fastcls.data.cache import cache_format, fill_cache
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe

from .test_perf import _all_batches

SIZE = 24
RAW = SIZE * SIZE * 3 + 128  # bytes of one raw entry


def smooth_photos(root, classes=("cat", "dog"), n=5, test=2):
    """Folder data of smooth gradients with a little noise, larger than the working size: PNG compresses them."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:40, 0:60]
    for split, names in (("train", [f"{c}/{i}" for c in classes for i in range(n)]), ("test", range(test))):
        for name in names:
            base = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1) + rng.integers(0, 4, (40, 60, 3))
            path = root / split / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(base + rng.integers(0, 60), 0, 255).astype(np.uint8)).save(path)
    return root


@pytest.fixture
def photos(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLS_CACHE", str(tmp_path / "cache"))
    r = Recipe(name="p", layout="folder", size=SIZE, bs=4, aug=False, cache=True)
    return r, read_items(r, smooth_photos(tmp_path / "data")), tmp_path / "cache"


def _free(monkeypatch, free: int):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fastcls.budget.shutil, "disk_usage", lambda p: usage(1 << 40, (1 << 40) - free, free))


def test_a_budget_too_small_for_raw_arrays_caches_lossless_pngs(photos):
    r, items, cache = photos
    n = len(items.train) + len(items.test)
    small = r.override(cache_budget=str(n * RAW - 1))  # one byte short of the raw arrays
    st = fill_cache(small, items)
    assert st.format == "png" and st.written == n and st.bytes < n * RAW
    assert len(list(st.folder.rglob("*.png"))) == n and not list(cache.rglob("*.npy"))
    assert fill_cache(small, items).hits == n
    # lossless: every batch read through the PNG cache equals the batches made from the originals
    want = _all_batches(dls(r.override(cache=False), items, seed=3), items)
    d = dls(small, items, seed=3)
    assert d.cached == "disk+memory"
    got = _all_batches(d, items)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(want, got))
    # a budget that holds the raw arrays keeps the fast raw format
    assert fill_cache(r.override(cache_budget=str(n * RAW)), items).format == "npy"


def test_automatic_choice_follows_the_free_disk_space(photos, monkeypatch):
    r, items, cache = photos
    n = len(items.train) + len(items.test)
    _free(monkeypatch, DISK_MARGIN + n * RAW)
    assert cache_format(r, items).fmt == "npy"
    _free(monkeypatch, DISK_MARGIN + n * RAW - 1)
    assert cache_format(r, items).fmt == "png"
    assert not cache.exists(), "choosing a format writes nothing"


def test_a_cache_that_would_not_fit_is_refused_before_anything_is_written(cli, photos, monkeypatch, tmp_path):
    r, items, cache = photos
    _free(monkeypatch, DISK_MARGIN + 100)
    with pytest.raises(FastclsError, match=r"will not fit: npy-uint8-rgb about 21\.8 KiB.*png-rgb about.*"
                                           r"256\.0 MiB free.*Nothing was written"):
        fill_cache(r, items)
    assert not cache.exists()
    res = cli("cache", "folder", "--data", tmp_path / "data", "--size", "24")  # the CLI: exit 2, no traceback
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "will not fit" in res.stderr and "free" in res.stderr and "--no-cache" in res.stderr
    with pytest.raises(FastclsError, match="will not fit"):  # a training run refuses too, before any epoch
        dls(r, items, seed=0)
    assert not cache.exists()


def test_a_cache_budget_below_even_the_pngs_is_refused_with_the_numbers(photos):
    r, items, cache = photos
    with pytest.raises(FastclsError, match=r"budget of 1\.0 KiB \(cache_budget\)"):
        fill_cache(r.override(cache_budget="1K"), items)
    assert not cache.exists()
    with pytest.raises(FastclsError, match="cache_budget"):
        r.override(cache_budget="lots")


def test_memory_budget_comes_from_the_environment(monkeypatch):
    from fastcls.recipe import get_recipe
    monkeypatch.delenv("FASTCLS_MEMORY_BUDGET", raising=False)
    assert memory_budget() == 1 << 30
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "1.5G")
    assert memory_budget() == int(1.5 * (1 << 30)) and parse_bytes("512M") == 512 << 20
    r = get_recipe("digits").override(size=16)
    items = read_items(r)
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "20M")
    assert dls(r, items, sample=64, num_workers=0).cached == "memory"
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "64K")  # less than the 64 train + 297 test images at 16 px
    assert dls(r, items, sample=64, num_workers=0).cached is None
    monkeypatch.setenv("FASTCLS_MEMORY_BUDGET", "plenty")
    with pytest.raises(FastclsError, match="FASTCLS_MEMORY_BUDGET"):
        memory_budget()
