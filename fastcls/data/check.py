"""Checking data before training: every image decoded once (`scan_images`, with a verdict cache), the bad-image
policy (`check_images`), and the report of a data folder without training (`check_data`)."""

__all__ = ["scan_images", "check_images", "DataReport", "check_data"]

import dataclasses
import os
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd
from PIL import Image

from ..errors import FastclsError
from ..recipe import Recipe
from .images import TrimCrop, load_image
from .items import Items, item_notes, item_problems, read_layout, resolve_data_path


# -- bad images: one report before training ----------------------------------------------------------------------------
def _image_problem(path: str) -> Optional[str]:
    """Why `path` cannot be used as an image, or None: the getter's own decoding path, at 1/8 scale for JPEGs."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        load_image(path, draft=(64, 64))
    except Image.DecompressionBombError as e:
        return f"too large to decode safely ({str(e).split('.')[0]})"
    except Image.UnidentifiedImageError:
        return "not an image (no image format recognised)"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for damaged files
        return f"corrupt or truncated ({type(e).__name__}: {e})"
    return None


def scan_images(paths, cache_dir=None, workers: Optional[int] = None) -> list:
    """`(path, reason)` for every file that cannot be decoded into an RGB image; each file is decoded once.

    With `cache_dir` (see `cache_home`) the verdicts are kept in `cache_dir/image-scan.sqlite`, keyed by path,
    size and modification time, so a later run only decodes new or changed files.
    """
    paths = list(dict.fromkeys(str(p) for p in paths))
    stats, known = {}, {}
    for p in paths:
        try:
            st = os.stat(p)
            stats[p] = (st.st_size, st.st_mtime_ns)
        except OSError:
            stats[p] = None
    con = _scan_cache(cache_dir)
    if con is not None:
        with closing(con):
            rows = con.execute("SELECT path, size, mtime, reason FROM scan").fetchall()
        known = {p: r for p, size, mtime, r in rows if stats.get(p) == (size, mtime)}
    todo = [p for p in paths if p not in known]
    if todo:
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as ex:  # PIL decodes without the GIL
            found = dict(zip(todo, ex.map(_image_problem, todo)))
        known.update(found)
        con = _scan_cache(cache_dir)
        if con is not None:
            try:
                with closing(con), con:
                    con.executemany("INSERT OR REPLACE INTO scan VALUES (?, ?, ?, ?)",
                                    [(p, *stats[p], r) for p, r in found.items() if stats[p] is not None])
            except sqlite3.Error:
                pass  # a cache that cannot be written only costs time
    return [(p, known[p]) for p in paths if known[p] is not None]


def _scan_cache(cache_dir) -> Optional[sqlite3.Connection]:
    if cache_dir is None:
        return None
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(Path(cache_dir) / "image-scan.sqlite", timeout=60)
        con.execute("CREATE TABLE IF NOT EXISTS scan (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, reason TEXT)")
        return con
    except (OSError, sqlite3.Error):
        return None


def check_images(items: Items, on_bad: str = "fail", cache_dir=None, limit: int = 20) -> Items:
    """Decode every training and test image once before training: one report of those that cannot be used.

    Args:
        items: from `read_items`; array layouts (npz, digits) hold decoded pixels and are returned unchanged.
        on_bad: 'fail' raises a FastclsError listing every bad image (path and reason); 'skip' leaves bad
            training images out and predicts bad test images from a blank image (so every test id keeps its row),
            with a warning; the list is kept in `items.bad` (and stored in the run's meta.json).
        cache_dir: where verdicts are cached (`cache_home()` in training), see `scan_images`.

    Returns:
        The items to train on.
    """
    if on_bad not in ("fail", "skip"):
        raise FastclsError(f"--on-bad-image must be 'fail' or 'skip', got {on_bad!r}.")
    if items.arrays or items.checked == on_bad:  # arrays hold decoded pixels; checked items were checked already
        return items
    splits = [("train", items.train)] + ([("test", items.test)] if items.test is not None else [])
    bad = dict(scan_images([x for _, df in splits for x in df["x"]], cache_dir))
    if not bad:
        return dataclasses.replace(items, checked=on_bad)
    listed = [{"split": split, "id": str(r.id), "path": str(r.x), "reason": bad[r.x]}
              for split, df in splits for r in df.itertuples() if r.x in bad]
    n_all = sum(len(df) for _, df in splits)
    lines = "\n".join(f"  {b['path']} ({b['split']}): {b['reason']}" for b in listed[:limit])
    more = f"\n  ... and {len(listed) - limit} more" if len(listed) > limit else ""
    if on_bad == "fail":
        raise FastclsError(f"{len(listed)} of {n_all} images cannot be used (data {items.root}); nothing was trained:\n"
                           f"{lines}{more}\nFix or delete them, or pass --on-bad-image skip to leave them out "
                           "(bad test images are then predicted from a blank image).")
    print(f"fastcls: warning: leaving out {len(listed)} unusable image(s) of {n_all}:\n{lines}{more}", file=sys.stderr)
    train = items.train[~items.train["x"].isin(bad)].reset_index(drop=True)
    blank = frozenset(str(x) for x in items.test["x"] if x in bad) if items.test is not None else frozenset()
    return dataclasses.replace(items, train=train, bad=listed, blank=blank, checked=on_bad)


# -- checking a data folder without training -------------------------------------------------------------------------
@dataclass
class DataReport:
    """What `check_data` found: class counts, the test set's size, problems (training would fail) and warnings."""

    recipe: str
    layout: str
    path: Optional[Path]
    counts: pd.DataFrame  # one row per class: train, valid (a given split) and total
    n_test: int = 0
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_data(recipe: Recipe, data=None, verify_images: bool = True) -> DataReport:
    """Validate a data folder against the recipe without training.

    Args:
        recipe: the recipe whose layout, classes and crop the data must fit.
        data: the data folder (default: the recipe's own).
        verify_images: decode every image file (`scan_images`) to find unreadable ones.

    Returns:
        A `DataReport`; `report.ok` is False when training on this folder would fail.
    """
    path = resolve_data_path(recipe, data)
    empty = pd.DataFrame(columns=["class", "train", "valid", "total"])
    try:
        items = read_layout(recipe, path)
    except FastclsError as e:
        return DataReport(recipe.name, recipe.layout, path, empty, problems=[str(e)])
    train = items.train
    problems, warnings = item_problems(items, recipe), item_notes(items, recipe)
    valid = train["is_valid"].astype(bool) if "is_valid" in train else pd.Series(False, index=train.index)
    order = [str(c) for c in recipe.classes] if recipe.classes else sorted(train["label"].unique())
    order += sorted(set(train["label"]) - set(order))
    per_class = lambda rows: rows["label"].value_counts().reindex(order, fill_value=0).values  # noqa: E731
    counts = pd.DataFrame({"class": order, "train": per_class(train[~valid]), "valid": per_class(train[valid])})
    counts["total"] = counts["train"] + counts["valid"]
    if verify_images and not items.arrays:
        problems += _image_problems(items, recipe)
    for c in counts.loc[counts["total"] == 0, "class"]:
        warnings.append(f"declared class {c!r} has no images.")
    few = counts.loc[(counts["total"] > 0) & (counts["total"] < 2), "class"].tolist()
    if few:
        warnings.append(f"class(es) with a single image (no stratified split possible): {', '.join(few)}.")
    n_test = 0 if items.test is None else len(items.test)
    if not n_test:
        warnings.append("no test images: runs will store validation predictions only (no submission).")
    return DataReport(recipe.name, recipe.layout, path, counts, n_test, problems, warnings)


def _image_problems(items: Items, recipe: Recipe, show: int = 5) -> list[str]:
    """Image files that cannot be decoded (see `scan_images`), and images the recipe's trim crop would leave empty."""
    paths = [x for df in (items.train, items.test) if df is not None for x in df["x"] if os.path.isfile(x)]
    found = dict(scan_images(paths))  # missing files: reported by item_problems
    bad = [f"{x} ({why})" for x, why in found.items()]
    too_small = []
    if recipe.crop == "trim":
        trim = TrimCrop(*recipe.trim)
        for x in dict.fromkeys(p for p in paths if p not in found):
            with Image.open(x) as im:
                size = im.size
            if trim.box_for(*size) is None:
                too_small.append(f"{x} ({size[0]}x{size[1]})")
    out = []
    if bad:
        out.append(f"{len(bad)} unreadable image file(s): {'; '.join(bad[:show])}{' ...' if len(bad) > show else ''}. "
                   "Remove or replace them, or train with --on-bad-image skip.")
    if too_small:
        out.append(f"the trim crop {recipe.trim} leaves nothing of {len(too_small)} image(s), e.g. "
                   f"{', '.join(too_small[:show])}. Use smaller margins (--trim), fractions, or --crop none.")
    return out
