"""Bad images: every kind of damaged or unusual file is decoded correctly where possible, otherwise listed with
its reason before training, and refused (default) or skipped (`--on-bad-image skip`). Never a crash mid-epoch."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fastcls.data import check as fcheck
from fastcls.data import check_images, load_image, read_items, scan_images
from fastcls.errors import FastclsError
from fastcls.recipe import Recipe
from fastcls.runs import RunStore

from ._proc import one_thread  # noqa: F401  (fixture)
from .conftest import TINY


def _png_with_size(w: int, h: int) -> bytes:
    """A real 1x1 PNG whose header claims w x h pixels: what a decompression bomb looks like to a reader."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    b = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    b[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    b[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(b[ihdr - 4:ihdr + 13])))
    return bytes(b)


def _jpeg_bytes(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def write_unusual(folder) -> dict:
    """Files PIL can read but that need care: name -> (expected size, expected RGB at (1, 1) or a check)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)  # red in CMYK
    rgba = Image.new("RGBA", (12, 10), (0, 0, 0, 0))  # fully transparent black: must come out white, not black
    rgba.putpixel((5, 5), (0, 0, 255, 255))
    rgba.save(folder / "rgba.png")
    Image.fromarray(np.full((10, 12), 128 * 257, np.uint16)).save(folder / "gray16.png")  # 16-bit mid-gray
    Image.new("L", (12, 10), 200).save(folder / "gray.png")
    pal = Image.new("P", (12, 10), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(folder / "palette.png", transparency=0)
    Image.new("1", (12, 10), 1).save(folder / "bilevel.png")
    tall = Image.new("RGB", (30, 20), (0, 0, 255))
    tall.paste((255, 0, 0), (0, 0, 15, 20))  # stored: left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (folder / "exif6.jpg").write_bytes(_jpeg_bytes(tall, exif=exif.tobytes(), quality=95))
    return {"cmyk.jpg": ((12, 10), (255, 0, 0)), "rgba.png": ((12, 10), (255, 255, 255)),
            "gray16.png": ((12, 10), (128, 128, 128)), "gray.png": ((12, 10), (200, 200, 200)),
            "palette.png": ((12, 10), (0, 200, 0)), "bilevel.png": ((12, 10), (255, 255, 255)),
            "exif6.jpg": ((20, 30), (255, 0, 0))}


def write_bad(folder) -> dict:
    """Files no reader can use: name -> a phrase of the reason fastcls must give."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    rng = np.random.default_rng(0)
    full = _jpeg_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (folder / "truncated.jpg").write_bytes(full[:len(full) // 2])
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(png, "PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[:-30])
    (folder / "notes.png").write_text("these are my notes, not an image\n")
    (folder / "bomb.png").write_bytes(_png_with_size(20000, 20000))  # 400 M pixels: over twice PIL's limit
    (folder / "bomb-warning.png").write_bytes(_png_with_size(10000, 9500))  # 95 M pixels: over PIL's limit
    return {"empty.jpg": "empty file", "truncated.jpg": "corrupt or truncated", "truncated.png": "corrupt or truncated",
            "notes.png": "not an image", "bomb.png": "too large", "bomb-warning.png": "too large"}


def test_unusual_images_are_decoded_to_the_right_rgb(tmp_path):
    for name, (size, rgb) in write_unusual(tmp_path).items():
        img = load_image(tmp_path / name)
        assert img.mode == "RGB" and img.size == size, name
        px = np.asarray(img, dtype=int)
        assert np.abs(px[1, 1] - rgb).max() <= 12, (name, px[1, 1])
    rot = np.asarray(load_image(tmp_path / "exif6.jpg"), dtype=int)
    assert rot[:12, :, 0].mean() > 200 and rot[-12:, :, 2].mean() > 200, "EXIF rotation: red on top, blue below"
    assert tuple(np.asarray(load_image(tmp_path / "rgba.png"))[5, 5]) == (0, 0, 255)


def test_scan_lists_each_bad_file_with_its_reason(tmp_path):
    bad = write_bad(tmp_path / "bad")
    write_unusual(tmp_path / "ok")
    paths = sorted((tmp_path / "bad").iterdir()) + sorted((tmp_path / "ok").iterdir()) + [tmp_path / "gone.jpg"]
    found = dict(scan_images(paths))
    assert set(found) == {str(tmp_path / "bad" / n) for n in bad} | {str(tmp_path / "gone.jpg")}
    for name, phrase in bad.items():
        assert phrase in found[str(tmp_path / "bad" / name)], (name, found[str(tmp_path / "bad" / name)])
    assert found[str(tmp_path / "gone.jpg")] == "missing file"


def test_scan_in_threads_refuses_every_image_over_the_limit(tmp_path):
    """Between PIL's limit and twice it PIL only warns; scanning decodes in threads, where warnings filters (global to
    the process) race. Every such file must still be refused, whatever the other threads do."""
    paths = []
    for i in range(24):
        paths.append(tmp_path / f"big{i}.png")
        paths[-1].write_bytes(_png_with_size(10000, 9000 + i))
        paths.append(tmp_path / f"ok{i}.png")
        Image.new("RGB", (8, 8), (i, 0, 0)).save(paths[-1])
    found = dict(scan_images(paths, workers=8))
    assert sorted(found) == sorted(str(p) for p in paths if p.name.startswith("big"))
    assert all("too large" in why for why in found.values()), found


def make_folder_data(root, n=6):
    """Two classes of good images, every unusual and bad kind mixed in; a test folder with one bad image."""
    for ci, c in enumerate(("a", "b")):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (20, 20), (200 * ci, 30 * i, 50)).save(d / f"{c}{i}.png")
    write_unusual(root / "train" / "a")
    bad = write_bad(root / "train" / "b")
    (root / "test").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (0, 90 * i, 0)).save(root / "test" / f"t{i}.png")
    (root / "test" / "t9.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    return bad


@pytest.fixture
def pics(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCLS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "pics.py").write_text(
        "from fastcls.recipe import Recipe\n"
        "recipe = Recipe(name='pics', layout='folder', size=16, pretrained=False, bs=4, tta=1, aug=False)\n")
    bad = make_folder_data(tmp_path / "data")
    return tmp_path, bad


def test_train_refuses_bad_images_by_default_listing_every_one(cli, pics):
    tmp, bad = pics
    runs = tmp / "runs"
    res = cli("train", "pics", "simple_cnn", "--recipes", tmp / "recipes", "--data", tmp / "data", "--runs-dir", runs,
              *TINY)
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = res.stderr.replace("\n", " ")
    assert f"{len(bad) + 1} of" in msg and "nothing was trained" in msg and "--on-bad-image skip" in msg
    for name, phrase in bad.items():
        assert f"{name} (train): {phrase}" in msg, name
    assert "t9.jpg (test): corrupt or truncated" in msg
    assert not any(runs.iterdir()), "nothing may be written to the run store"
    assert RunStore(runs).leaderboard(status=None).empty


@pytest.mark.usefixtures("one_thread")
def test_skip_trains_without_them_and_keeps_every_test_row(cli, pics):
    tmp, bad = pics
    runs = tmp / "runs"
    res = cli("train", "pics", "simple_cnn", "--recipes", tmp / "recipes", "--data", tmp / "data", "--runs-dir", runs,
              *TINY, "--on-bad-image", "skip")
    assert res.exit_code == 0, res.output
    assert f"leaving out {len(bad) + 1} unusable image(s)" in res.stderr
    assert (tmp / "cache" / "image-scan.sqlite").is_file()
    run = RunStore(runs).load(RunStore(runs).leaderboard()["id"].iloc[0])
    listed = {b["id"]: b["reason"] for b in run.meta["bad_images"]}
    assert set(listed) == {f"b/{n}" for n in bad} | {"t9.jpg"}
    n_good = 2 * 6 + 7  # the unusual images train normally
    assert run.metrics["n_train"] + run.metrics["n_valid"] == n_good
    assert run.test_ids == ["t0.png", "t1.png", "t2.png", "t9.jpg"] and run.test_probs.shape[1] == 4
    assert run.config["on_bad_image"] == "skip"


def test_scan_verdicts_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    make_folder_data(tmp_path / "data")
    items = read_items(Recipe(name="p", layout="folder"), tmp_path / "data")
    calls = []
    real = fcheck._image_problem
    monkeypatch.setattr(fcheck, "_image_problem", lambda p: calls.append(p) or real(p))
    cache = tmp_path / "runs"
    first = check_images(items, "skip", cache_dir=cache)
    n_all = len(items.train) + len(items.test)
    assert len(calls) == n_all
    calls.clear()
    again = check_images(items, "skip", cache_dir=cache)
    assert calls == [] and again.bad == first.bad, "unchanged files are not decoded again"
    good = tmp_path / "data" / "train" / "a" / "a0.png"
    Image.new("RGB", (21, 20)).save(good)  # changed size and mtime: decoded again
    repaired = tmp_path / "data" / "train" / "b" / "empty.jpg"
    repaired.write_bytes((tmp_path / "data" / "train" / "a" / "a1.png").read_bytes())
    third = check_images(items, "skip", cache_dir=cache)
    assert sorted(calls) == sorted([str(good), str(tmp_path / "data" / "train" / "b" / "empty.jpg")])
    assert len(third.bad) == len(first.bad) - 1, "a repaired file is used again"
    with pytest.raises(FastclsError, match="cannot be used"):
        check_images(items, "fail", cache_dir=cache)
    assert json.loads(json.dumps(third.bad))  # plain JSON, as stored in meta.json


def test_checking_checked_items_again_keeps_the_record(tmp_path, capsys):
    """cv, students and probes check the items, then fit_run checks them again: the second check must keep the
    list of training images the first one left out (they are no longer in the items to find again)."""
    make_folder_data(tmp_path / "data")
    items = read_items(Recipe(name="p", layout="folder"), tmp_path / "data")
    once = check_images(items, "skip", cache_dir=tmp_path / "cache")
    assert {b["split"] for b in once.bad} == {"train", "test"}
    capsys.readouterr()
    twice = check_images(once, "skip", cache_dir=tmp_path / "cache")
    assert twice.bad == once.bad and len(twice.train) == len(once.train)
    assert "leaving out" not in capsys.readouterr().err, "warned once"
