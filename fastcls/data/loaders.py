"""From a data folder to fastai DataLoaders: layout readers, reproducible splits, crops, one DataBlock.

Every layout is read into the same `Items` table (one row per image: `id`, `x`, `label`, optional `group`),
so one DataBlock serves folder-per-class data, CSV tables and numpy arrays alike.
"""

__all__ = ["Items", "LAYOUTS", "layout", "read_items", "assign_split", "assign_folds", "sample_items", "TrimCrop",
           "CenterSquare", "ImageGetter", "NormalizeInplace", "item_tfms", "batch_tfms", "dls", "default_workers", "test_dl",
           "IMAGE_EXTS", "read_folder_auto", "item_problems", "item_notes", "DataReport", "check_data",
           "resolve_recipe", "infer_size", "parse_trim", "load_image", "to_rgb", "scan_images", "check_images",
           "cache_home"]

import dataclasses
import os
import sqlite3
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from fastai.callback.data import WeightedDL  # noqa: F401  (registers DataBlock.weighted_dataloaders, used by dls)
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor
from fastai.vision.augment import Hue, Resize, ResizeMethod, Saturation, aug_transforms
from fastai.vision.core import PILImage, TensorImage
from fastai.vision.data import ImageBlock, imagenet_stats
from fastai.data.transforms import Normalize
from fasttransform import Transform
from PIL import Image, ImageOps
from sklearn.model_selection import (GroupShuffleSplit, KFold, StratifiedGroupKFold, StratifiedKFold,
                                     train_test_split)

from .cache import PresizedDL, pre_resized
from ..errors import FastclsError
from ..hardware import reuse_freed_memory
from ..recipe import Recipe

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Items:
    """The labelled training items and the optional unlabeled test items of one data set.

    `train` has columns `id` (unique, stable: written to the run store), `x` (a file path, or a row index into
    `arrays['train']`), `label` (str) and optionally `group` (e.g. a person) and `is_valid` (a given split).
    `test` has `id` and `x` (and `label` only when the true test labels are known, for scoring). Array layouts
    add a `src` column naming the array (`'train'` or `'test'`) that `x` indexes.
    """

    train: pd.DataFrame
    test: Optional[pd.DataFrame] = None
    arrays: dict = field(default_factory=dict)  # 'train' / 'test' -> uint8 array (N, H, W[, C])
    root: Optional[Path] = None
    bad: list = field(default_factory=list)  # unreadable images left out by check_images: {split, id, path, reason}
    blank: frozenset = frozenset()  # paths of unreadable test images, predicted from a blank image (rows kept)
    checked: Optional[str] = None  # the --on-bad-image policy check_images applied to these items (None: not yet)

    @property
    def vocab(self) -> list:
        return sorted(self.train["label"].unique().tolist())


# -- layouts ---------------------------------------------------------------------------------------------------------
LAYOUTS: dict[str, Callable[[Path, Recipe], Items]] = {}

LAYOUT_HELP = {
    "folder": "{train_dir}/<class>/<image> for training and {test_dir}/<image> for the unlabeled test set",
    "csv": "{csv} with columns {file_col},{label_col}, images in {image_dir}/",
    "npz": "{npz_train} with arrays 'images' (N x H x W uint8), 'labels' and 'classes', test images in {npz_test}",
    "digits": "none: scikit-learn's bundled 8x8 digits",
    "custom": "as the recipe's items function reads it",
}


def layout(name: str):
    """Register a layout reader `fn(path, recipe) -> Items` under `name`."""
    def deco(fn):
        LAYOUTS[name] = fn
        return fn
    return deco


def _layout_help(recipe: Recipe) -> str:
    """The expected layout in words; a custom layout is described by the first paragraph of its items function."""
    if recipe.layout == "custom" and recipe.items is not None and recipe.items.__doc__:
        return " ".join(recipe.items.__doc__.strip().split("\n\n")[0].split())
    text = LAYOUT_HELP.get(recipe.layout, recipe.layout).format(**recipe.to_dict())
    if recipe.layout == "csv" and recipe.valid_csv:
        text += f", and {recipe.valid_csv} (same columns) for the given validation split"
    return text


def _layout_error(recipe: Recipe, path: Path, what: str) -> FastclsError:
    expected = _layout_help(recipe)
    return FastclsError(f"Data folder {path} does not match the {recipe.layout!r} layout recipe {recipe.name!r} "
                        f"expects: {what}. Expected layout: {expected}. Pass the right folder with --data.")


def _is_image(p: Path) -> bool:
    # hidden files (macOS '._x.jpg' forks, editor backups) carry image suffixes but are not images
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _test_from_dir(path: Path, recipe: Recipe) -> Optional[pd.DataFrame]:
    if not recipe.test_dir or not (path / recipe.test_dir).is_dir():
        return None
    files = [p for p in sorted((path / recipe.test_dir).rglob("*")) if _is_image(p)]
    return pd.DataFrame({"id": [str(p.relative_to(path / recipe.test_dir)) for p in files], "x": [str(p) for p in files]})


def _class_rows(root: Path, skip=()) -> list[tuple]:
    """(id relative to root, path, class) for every image in the class sub-folders of `root`."""
    rows = []
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))
                          and d.resolve() not in skip):
        rows += [(str(p.relative_to(root)), str(p), cls_dir.name) for p in sorted(cls_dir.rglob("*")) if _is_image(p)]
    return rows


@layout("folder")
def read_folder(path: Path, recipe: Recipe) -> Items:
    """One sub-folder per class under `train_dir` (and `valid_dir`, a given split); an optional `test_dir`."""
    root = path / recipe.train_dir if recipe.train_dir else path
    if not root.is_dir():
        raise _layout_error(recipe, path, f"no folder {root}")
    # class folders at the data root itself must not take the test or valid folder for a class
    skip = {(path / d).resolve() for d in (recipe.test_dir, recipe.valid_dir) if d}
    rows = _class_rows(root, skip)
    if not rows:
        raise _layout_error(recipe, path, f"no images in class sub-folders of {root}")
    train = pd.DataFrame(rows, columns=["id", "x", "label"])
    if recipe.valid_dir:
        vroot = path / recipe.valid_dir
        valid = pd.DataFrame(_class_rows(vroot) if vroot.is_dir() else [], columns=["id", "x", "label"])
        if not len(valid):
            raise _layout_error(recipe, path, f"no images in class sub-folders of the validation folder {vroot}")
        valid["id"] = [f"{recipe.valid_dir}/{i}" for i in valid["id"]]  # cat/1.jpg may be in train and in valid
        train = pd.concat([train.assign(is_valid=False), valid.assign(is_valid=True)], ignore_index=True)
    return Items(train, _test_from_dir(path, recipe), root=path)


def read_folder_auto(path: Path, recipe: Recipe) -> Items:
    """Class sub-folders in train/ or at the root, an optional labelled val/ (or valid/, validation/) with the same
    classes, and an optional unlabeled test/ (or testset/, test_images/): everything is inferred.

    Used by the `folder` recipe (layout 'custom'): a given validation folder becomes the split, else a stratified one.
    """
    if not path.is_dir():
        raise _layout_error(recipe, path, "it is not a folder")
    sub = {d.name.lower(): d.name for d in path.iterdir() if d.is_dir()}
    pick = lambda *names: next((sub[n] for n in names if n in sub), None)  # noqa: E731
    train_dir = pick("train", "training") or ""
    return read_folder(path, recipe.override(train_dir=train_dir, valid_dir=pick("val", "valid", "validation"),
                                             test_dir=pick("test", "testset", "test_images")))


def _read_csv(file: Path, cols, recipe: Recipe, path: Path) -> pd.DataFrame:
    if not file.is_file():
        raise _layout_error(recipe, path, f"no file {file}")
    df = pd.read_csv(file, dtype=str, keep_default_na=False)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise _layout_error(recipe, path, f"{file} has no column {', '.join(map(repr, missing))} (it has "
                                          f"{', '.join(map(repr, df.columns))})")
    return df


def _csv_files(df: pd.DataFrame, col: str, folder: Path, recipe: Recipe, table: Path) -> list[str]:
    """Image paths for a file column, refusing names that would leave the image folder."""
    out, base = [], folder.resolve()
    for i, name in enumerate(df[col]):
        name = name + recipe.file_suffix if recipe.file_suffix and not Path(name).suffix else name
        p = (folder / name).resolve()
        if Path(name).is_absolute() or base not in p.parents:
            raise FastclsError(f"{table}, row {i + 2}: file name {name!r} points outside the image folder {folder}. "
                               "File names must be relative paths inside it.")
        out.append(str(p))
    return out


def _labelled_csv(table: Path, folder: Path, recipe: Recipe, path: Path) -> pd.DataFrame:
    df = _read_csv(table, [recipe.file_col, recipe.label_col], recipe, path)
    out = pd.DataFrame({"id": df[recipe.file_col], "x": _csv_files(df, recipe.file_col, folder, recipe, table),
                        "label": df[recipe.label_col].astype(str)})
    if recipe.group_col and recipe.group_col in df:
        out["group"] = df[recipe.group_col].values
    return out


@layout("csv")
def read_csv_layout(path: Path, recipe: Recipe) -> Items:
    """A table of (file, label) with the images in `image_dir` (and `valid_csv`, a given split); test images from
    `test_csv` or `test_dir`."""
    train = _labelled_csv(path / recipe.csv, path / recipe.image_dir, recipe, path)
    if recipe.valid_csv:
        vdir = recipe.valid_dir or recipe.image_dir
        valid = _labelled_csv(path / recipe.valid_csv, path / vdir, recipe, path)
        # train and valid folders may reuse file names: ids name the folder too
        train["id"] = [f"{recipe.image_dir}/{i}" for i in train["id"]]
        valid["id"] = [f"{vdir}/{i}" for i in valid["id"]]
        train = pd.concat([train.assign(is_valid=False), valid.assign(is_valid=True)], ignore_index=True)
    test = None
    if recipe.test_csv:
        col = recipe.test_file_col or recipe.file_col
        tdf = _read_csv(path / recipe.test_csv, [col], recipe, path)
        tdir = path / (recipe.test_dir or recipe.image_dir)
        test = pd.DataFrame({"id": tdf[col], "x": _csv_files(tdf, col, tdir, recipe, path / recipe.test_csv)})
    else:
        test = _test_from_dir(path, recipe)
    return Items(train, test, root=path)


def _load_npz(file: Path, recipe: Recipe, path: Path, keys) -> dict:
    if not file.is_file():
        raise _layout_error(recipe, path, f"no file {file}")
    with np.load(file, allow_pickle=False) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise _layout_error(recipe, path, f"{file} has no array {', '.join(map(repr, missing))}")
        return {k: z[k] for k in z.files}


@layout("npz")
def read_npz(path: Path, recipe: Recipe) -> Items:
    """Arrays in `npz_train` ('images', 'labels' as indices into 'classes' or as names) and `npz_test`."""
    z = _load_npz(path / recipe.npz_train, recipe, path, ["images", "labels"])
    labels = z["labels"]
    n = len(z["images"])
    if len(labels) != n:
        raise _layout_error(recipe, path, f"{recipe.npz_train} has {n} images but {len(labels)} labels")
    if "classes" in z and np.issubdtype(labels.dtype, np.integer):
        bad = np.flatnonzero((labels < 0) | (labels >= len(z["classes"])))
        if len(bad):
            raise _layout_error(recipe, path, f"{recipe.npz_train}: {len(bad)} label(s) are not indices into its "
                                              f"{len(z['classes'])} classes, e.g. item {bad[0]} has {labels[bad[0]]}")
        labels = np.asarray(z["classes"])[labels]
    train = pd.DataFrame({"id": [f"train-{i}" for i in range(n)], "x": np.arange(n), "label": labels.astype(str),
                          "src": "train"})
    arrays, test = {"train": z["images"]}, None
    if recipe.npz_test and (path / recipe.npz_test).is_file():
        t = _load_npz(path / recipe.npz_test, recipe, path, ["images"])
        arrays["test"] = t["images"]
        test = pd.DataFrame({"id": [str(i) for i in range(len(t["images"]))], "x": np.arange(len(t["images"])),
                             "src": "test"})
        if recipe.test_solution and (path / recipe.test_solution).is_file():
            test["label"] = _npz_solution(path / recipe.test_solution, z.get("classes"), len(test), recipe, path)
    return Items(train, test, arrays, root=path)


def _npz_solution(file: Path, classes, n_test: int, recipe: Recipe, path: Path) -> np.ndarray:
    """True test labels (as names) from a solution npz, for scoring only; indices map through the train classes."""
    y = _load_npz(file, recipe, path, ["labels"])["labels"]
    if len(y) != n_test:
        raise _layout_error(recipe, path, f"{file} has {len(y)} labels for {n_test} test images")
    if np.issubdtype(y.dtype, np.integer) and classes is not None:
        if y.min() < 0 or y.max() >= len(classes):
            raise _layout_error(recipe, path, f"{file} has label index {y.max() if y.max() >= len(classes) else y.min()}"
                                              f" outside the {len(classes)} classes of {recipe.npz_train}")
        y = np.asarray(classes)[y]
    return y.astype(str)


@layout("digits")
def read_digits(path: Optional[Path], recipe: Recipe) -> Items:
    """scikit-learn's bundled 8x8 digits as uint8 images; the last 297 are the labelled 'test' set."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    labels = d.target.astype(str)
    n_train = 1500
    train = pd.DataFrame({"id": [f"digit-{i:04d}" for i in range(n_train)], "x": np.arange(n_train),
                          "label": labels[:n_train], "src": "train"})
    test = pd.DataFrame({"id": [f"digit-{i:04d}" for i in range(n_train, len(images))],
                         "x": np.arange(len(images) - n_train), "label": labels[n_train:], "src": "test"})
    return Items(train, test, {"train": images[:n_train], "test": images[n_train:]}, root=None)


@layout("custom")
def read_custom(path: Path, recipe: Recipe) -> Items:
    if recipe.items is None:
        raise FastclsError(f"Recipe {recipe.name!r} has layout 'custom' but no items function.")
    return recipe.items(path, recipe)


def resolve_data_path(recipe: Recipe, data=None) -> Optional[Path]:
    """The data folder to read: --data, else the recipe's default; a clear error when neither exists."""
    if recipe.layout == "digits":
        return None
    raw = data if data is not None else recipe.data
    if raw is None:
        raise FastclsError(f"Recipe {recipe.name!r} has no default data folder. Pass one with --data PATH "
                           f"(expected layout: {_layout_help(recipe)}).")
    path = Path(raw).expanduser()
    if not path.exists():
        raise FastclsError(f"Data folder {path} does not exist (recipe {recipe.name!r}). Pass the folder with --data PATH.")
    return path


def _read_layout(recipe: Recipe, path: Optional[Path]) -> Items:
    if recipe.layout not in LAYOUTS:
        raise FastclsError(f"Recipe {recipe.name!r} uses unknown layout {recipe.layout!r}; known: {', '.join(LAYOUTS)}.")
    return LAYOUTS[recipe.layout](path, recipe)


def item_problems(items: Items, recipe: Recipe, limit: int = 8) -> list[str]:
    """What would break training on these items, with the rows (cheap checks; `check_data` also decodes every image).

    Duplicate ids, empty labels, labels outside the recipe's `classes`, fewer than two classes, image files listed
    but missing. CSV rows are numbered as in a spreadsheet (the header is row 1).
    """
    train, problems = items.train.reset_index(drop=True), []
    csv = recipe.layout == "csv"

    def rows(idx) -> str:
        idx = list(idx)
        shown = ", ".join(f"row {i + 2}" if csv else repr(str(train["id"].iloc[i])) for i in idx[:limit])
        return (f"{recipe.csv} " if csv else "items ") + shown + (f" and {len(idx) - limit} more" if len(idx) > limit
                                                                  else "")
    ids = train["id"].astype(str)
    dups = ids[ids.duplicated(keep=False)]
    if len(dups):
        groups = list(dups.groupby(dups, sort=False).groups.items())
        shown = "; ".join(f"{v!r} appears {len(ix)} times ({rows(ix)})" for v, ix in groups[:limit])
        problems.append(f"duplicate item ids: {shown}{' ...' if len(groups) > limit else ''}. Every training item "
                        "must appear once.")
    labels = train["label"].astype(str)
    empty = labels.str.strip() == ""
    if empty.any():
        problems.append(f"{int(empty.sum())} training item(s) have an empty label ({rows(np.flatnonzero(empty))}).")
    if recipe.classes:
        bad = ~labels.isin([str(c) for c in recipe.classes]) & ~empty
        if bad.any():
            names = sorted(labels[bad].unique())
            problems.append(f"{int(bad.sum())} training item(s) have a label the recipe does not declare: "
                            f"{', '.join(map(repr, names[:limit]))}{' ...' if len(names) > limit else ''} "
                            f"({rows(np.flatnonzero(bad))}, e.g. item {train['id'][bad].iloc[0]!r}). Declared classes: "
                            f"{', '.join(map(str, recipe.classes))}. Fix the labels, or the recipe's classes.")
    if labels[~empty].nunique() < 2:
        problems.append(f"only {labels[~empty].nunique()} class found; need at least 2.")
    for part, df in (("training", train), ("test", items.test)):
        if df is None or items.arrays or not len(df):
            continue
        missing = [str(x) for x in df["x"] if not os.path.isfile(x)]
        if missing:
            where = f" ({rows(np.flatnonzero(~df['x'].map(os.path.isfile)))})" if part == "training" else ""
            problems.append(f"{len(missing)} {part} image file(s) are listed but do not exist{where}: "
                            f"{', '.join(missing[:limit])}{' ...' if len(missing) > limit else ''}.")
    return problems


def item_notes(items: Items, recipe: Recipe, limit: int = 8) -> list[str]:
    """Not errors, but worth a look: image files in a csv layout's image folder that no table lists."""
    if recipe.layout != "csv" or items.root is None or not (items.root / recipe.image_dir).is_dir():
        return []
    listed = set(items.train["x"].astype(str))
    if items.test is not None:
        listed |= set(items.test["x"].astype(str))
    folder = (items.root / recipe.image_dir).resolve()
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and str(p) not in listed and p.is_file())
    if not extra:
        return []
    return [f"{len(extra)} image file(s) in {folder} are listed in no table and are not used: "
            f"{', '.join(extra[:limit])}{' ...' if len(extra) > limit else ''}"]


def _attach_solution(items: Items, recipe: Recipe, path: Optional[Path]) -> None:
    """True test labels from a CSV solution (in the submission's format), for scoring only; all ids must match."""
    sol = recipe.test_solution
    if not sol or not sol.endswith(".csv") or path is None or items.test is None or "label" in items.test:
        return
    file = path / sol
    if not file.is_file():
        return
    df = pd.read_csv(file, dtype=str, keep_default_na=False)
    if recipe.sub_id_col not in df or recipe.sub_label_col not in df:
        return
    from ..submission import submission_ids
    truth = dict(zip(df[recipe.sub_id_col], df[recipe.sub_label_col]))
    keys = submission_ids(recipe, items.test["id"])
    if all(k in truth for k in keys):
        labels = [truth[k] for k in keys]
        if recipe.sub_label == "index":
            classes = [str(c) for c in recipe.classes or sorted(items.train["label"].unique())]
            labels = [classes[int(v)] for v in labels]
        items.test = items.test.assign(label=labels)


def read_items(recipe: Recipe, data=None) -> Items:
    """Read the recipe's training and test items from `data` (or the recipe's default data folder).

    Raises `FastclsError` naming what would break training (see `item_problems`); true test labels from the recipe's
    `test_solution` CSV are attached to `items.test` for scoring.
    """
    path = resolve_data_path(recipe, data)
    items = _read_layout(recipe, path)
    problems = item_problems(items, recipe)
    if problems:
        where = f"data {path}" if path else "its data"
        raise FastclsError(f"Recipe {recipe.name!r}, {where}: {len(problems)} problem(s), nothing was trained:\n"
                           + "\n".join(f"  - {p}" for p in problems + item_notes(items, recipe))
                           + f"\n`fastcls check {recipe.name}{f' --data {path}' if path else ''}` lists every problem.")
    for note in item_notes(items, recipe):
        print(f"fastcls: note: {note}", file=sys.stderr)
    _attach_solution(items, recipe, path)
    return items


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
        items = _read_layout(recipe, path)
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


# -- settings the recipe leaves to the data --------------------------------------------------------------------------
def infer_size(items: Items, n: int = 32, seed: int = 0) -> int:
    """An image size from the data: the median shorter side of up to `n` training images, as a multiple of 8 in
    [16, 224]."""
    rows = items.train.sample(min(n, len(items.train)), random_state=seed)
    sides = []
    for _, r in rows.iterrows():
        if items.arrays:
            h, w = np.asarray(items.arrays[r["src"]]).shape[1:3]
        else:
            try:
                with Image.open(r["x"]) as im:
                    w, h = im.size
            except OSError:  # an unreadable file says nothing about the size (`fastcls check` reports it)
                continue
        sides.append(min(w, h))
    if not sides:
        raise FastclsError(f"No readable image among {len(rows)} sampled training images to infer the image size from. "
                           "Run `fastcls check` on the data folder, or pass --size.")
    return int(min(224, max(16, 8 * round(float(np.median(sides)) / 8))))


def resolve_recipe(recipe: Recipe, items: Items) -> Recipe:
    """The recipe with what it leaves to the data filled in (size None: inferred from the images)."""
    return recipe.override(size=infer_size(items)) if recipe.size is None else recipe


def parse_trim(text: str) -> tuple:
    """'400,100,50,50' (pixels) or '0.2,0.05,0.05,0.05' (fractions of the original) -> (top, bottom, left, right)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = tuple(int(p) if p.lstrip("+").isdigit() else float(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4 or any(v < 0 for v in vals):
        raise FastclsError(f"--trim takes 4 margins >= 0 as top,bottom,left,right in pixels (e.g. 400,100,50,50) or as "
                           f"fractions of the original image (e.g. 0.2,0.05,0.05,0.05); got {text!r}.")
    return vals


# -- splits ----------------------------------------------------------------------------------------------------------
def assign_split(train: pd.DataFrame, recipe: Recipe, seed: int) -> pd.DataFrame:
    """A copy of `train` with a boolean `is_valid` column, reproducible for a given seed."""
    df = train.copy()
    if recipe.split == "auto":
        recipe = recipe.override(split="given" if "is_valid" in df else "stratified")
    if recipe.split == "given":
        if "is_valid" not in df:
            raise FastclsError(f"Recipe {recipe.name!r} uses the given split but its items have no 'is_valid' column.")
        df["is_valid"] = df["is_valid"].astype(bool)
        return df
    n = len(df)
    idx = np.arange(n)
    if recipe.split == "group":
        if "group" not in df:
            raise FastclsError(f"Recipe {recipe.name!r} splits by group but its items have no group column.")
        n_groups = df["group"].nunique()
        k = max(2, round(1 / recipe.valid_pct))
        if n_groups < k:
            raise FastclsError(f"Recipe {recipe.name!r}: only {n_groups} groups, too few for a {recipe.valid_pct:.0%} "
                               "grouped validation split.")
        try:
            sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            _, valid = next(sgkf.split(idx, df["label"], df["group"]))
        except ValueError:
            _, valid = next(GroupShuffleSplit(1, test_size=recipe.valid_pct, random_state=seed).split(idx, groups=df["group"]))
    else:
        counts = df["label"].value_counts()
        stratify = df["label"] if recipe.split == "stratified" and counts.min() >= 2 else None
        n_valid = max(int(round(n * recipe.valid_pct)), counts.size if stratify is not None else 1)
        _, valid = train_test_split(idx, test_size=n_valid, random_state=seed, stratify=stratify)
    df["is_valid"] = False
    df.loc[df.index[np.sort(valid)], "is_valid"] = True
    return df


def assign_folds(train: pd.DataFrame, recipe: Recipe, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each row of `train`: stratified by label, grouped when the recipe splits by group.

    Depends only on the rows (labels, groups), `k` and `seed`, never on the arch, so every arch's folds agree and
    their out-of-fold predictions can be ensembled or stacked. A recipe with a given split is folded over all rows.
    """
    if k < 2:
        raise FastclsError(f"--folds must be at least 2, got {k}.")
    if len(train) < k:
        raise FastclsError(f"Recipe {recipe.name!r}: {len(train)} training items, too few for {k} folds.")
    idx, y = np.arange(len(train)), train["label"].astype(str).to_numpy()
    with warnings.catch_warnings():  # classes rarer than k: sklearn warns and spreads them as it can
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        if recipe.split == "group":
            if "group" not in train:
                raise FastclsError(f"Recipe {recipe.name!r} splits by group but its items have no group column.")
            n_groups = train["group"].nunique()
            if n_groups < k:
                raise FastclsError(f"Recipe {recipe.name!r}: its items make only {n_groups} groups "
                                   f"({recipe.group_col or 'group'}), fewer than --folds {k}; no group may cross "
                                   f"folds. Use --folds {n_groups} or fewer.")
            splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y, train["group"])
        elif pd.Series(y).value_counts().min() >= 2:
            splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, y)
        else:  # a class with one item cannot be stratified
            splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(idx)
        fold = np.full(len(train), -1, dtype=np.int64)
        for i, (_, held) in enumerate(splits):
            fold[held] = i
    return fold


def sample_items(train: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """A stratified subset of `n` training items (every class kept where n allows), for quick checks; all of them
    when `n` is None (no --sample)."""
    if n is None or n >= len(train):
        return train
    counts = train["label"].value_counts()
    strat = train["label"] if counts.min() >= 2 and n >= 2 * counts.size else None
    keep, _ = train_test_split(np.arange(len(train)), train_size=n, random_state=seed, stratify=strat)
    return train.iloc[np.sort(keep)].reset_index(drop=True)


# -- transforms ------------------------------------------------------------------------------------------------------
class TrimCrop(Transform):
    """Cut a border off the original image before resizing: (top, bottom, left, right) in pixels or fractions."""

    order = 0  # before Resize (order 1): crops are defined on the original image

    def __init__(self, top=0, bottom=0, left=0, right=0):
        self.box = (top, bottom, left, right)

    def box_for(self, w: int, h: int) -> Optional[tuple]:
        """The (left, upper, right, lower) crop box on a w x h original, or None when the margins leave nothing."""
        t, b, l, r = (v * (h if i < 2 else w) if isinstance(v, float) and v < 1 else v for i, v in enumerate(self.box))
        box = (int(l), int(t), int(w - r), int(h - b))
        return None if box[2] <= box[0] or box[3] <= box[1] else box

    def encodes(self, img: PILImage):
        box = self.box_for(*img.size)
        if box is None:
            raise FastclsError(f"Trim crop {self.box} leaves nothing of a {img.size[0]}x{img.size[1]} image; use "
                               "smaller margins or --crop none.")
        return img.crop(box)


class CenterSquare(Transform):
    """The central square of the original image (side = its shorter side)."""

    order = 0

    def box_for(self, w: int, h: int) -> tuple:
        """The (left, upper, right, lower) crop box on a w x h original."""
        s = min(w, h)
        l, t = (w - s) // 2, (h - s) // 2
        return l, t, l + s, t + s

    def encodes(self, img: PILImage):
        return img.crop(self.box_for(*img.size))


class ImageGetter:
    """Row of an `Items` table -> RGB PILImage, from a file or from row `x` of the in-memory array `src`."""

    def __init__(self, arrays: Optional[dict] = None, blank: frozenset = frozenset()):
        self.arrays, self.blank = arrays or {}, blank

    def __call__(self, row) -> PILImage:
        if self.arrays:
            return PILImage(Image.fromarray(np.asarray(self.arrays[row["src"]][int(row["x"])])).convert("RGB"))
        if row["x"] in self.blank:
            return PILImage(Image.new("RGB", (32, 32), (128, 128, 128)))
        return PILImage(load_image(row["x"]))


def item_tfms(recipe: Recipe) -> list:
    """Crop on the original image, then resize to the recipe's size (squish keeps the whole crop)."""
    tfms = []
    if recipe.crop == "trim":
        tfms.append(TrimCrop(*recipe.trim))
    elif recipe.crop == "center":
        tfms.append(CenterSquare())
    tfms.append(Resize(recipe.size, method=ResizeMethod.Squish))
    return tfms


class NormalizeInplace(Normalize):
    """fastai's Normalize, in place: the batch it gets is always a fresh float tensor (made by IntToFloatTensor or
    the augmentations), and on CPU each new 64x3x224x224 float tensor costs ~40 ms of page faults (measured)."""

    def encodes(self, x: TensorImage):
        return x.sub_(self.mean).div_(self.std)


def batch_tfms(recipe: Recipe, stats=None) -> list:
    """GPU-friendly batch augmentation (train only) and normalisation."""
    tfms = []
    if recipe.aug:
        tfms += aug_transforms(do_flip=recipe.flip, max_rotate=recipe.max_rotate, max_zoom=recipe.max_zoom,
                               max_lighting=recipe.max_lighting, max_warp=0.0)
        if recipe.color_jitter:  # torchvision's ColorJitter saturation/hue, as fastai batch transforms
            tfms += [Saturation(max_lighting=recipe.color_jitter), Hue(max_hue=recipe.color_jitter / 2)]
    if recipe.normalize == "imagenet":
        tfms.append(NormalizeInplace.from_stats(*imagenet_stats))
    elif recipe.normalize == "dataset" and stats is not None:
        tfms.append(NormalizeInplace.from_stats(*stats))
    return tfms


def dataset_stats(items: Items, df: pd.DataFrame, n: int = 512, seed: int = 0):
    """Per-channel mean and std (0..1 scale) of up to `n` training images, for recipes normalising by their own data."""
    rng = np.random.default_rng(seed)
    get = ImageGetter(items.arrays)
    rows = df.iloc[rng.permutation(len(df))[:n]]
    px = np.concatenate([np.asarray(get(r), dtype=np.float32).reshape(-1, 3) / 255 for _, r in rows.iterrows()])
    return px.mean(0).tolist(), px.std(0).tolist()


def dls(recipe: Recipe, items: Items, seed: int = 42, sample: Optional[int] = None, num_workers: Optional[int] = None,
        stats=None, fold: Optional[tuple] = None):
    """fastai DataLoaders for the recipe's items, split reproducibly by `seed`; `sample` takes a stratified subset.

    The vocab is the recipe's `classes` when it declares them (their order), else the sorted labels. With
    `normalize='dataset'` the train split's mean/std are used, or `stats` (e.g. a stored run's) when given.
    Images are cropped and resized once where `fastcls.cache.pre_resized` says so (`out.cached`: "memory",
    "disk+memory", "disk" or None); `num_workers` None means `default_workers()`. `fold=(k, K)` validates on fold
    k of `assign_folds(..., K, seed)` instead of the recipe's split.
    """
    recipe = resolve_recipe(recipe, items)
    train = sample_items(items.train, sample, seed)
    if fold is None:
        df = assign_split(train, recipe, seed).reset_index(drop=True)
    else:
        df = train.reset_index(drop=True).assign(is_valid=assign_folds(train, recipe, fold[1], seed) == fold[0])
    if recipe.normalize == "dataset":
        stats = stats if stats is not None else dataset_stats(items, df[~df["is_valid"]])
    else:
        stats = None
    vocab = [str(c) for c in recipe.classes] if recipe.classes else sorted(df["label"].unique().tolist())
    get_x, tfms, cached = pre_resized(recipe, items, [df, items.test], ImageGetter(items.arrays, items.blank),
                                      item_tfms(recipe))
    # pre-resized images come as uint8 tensors already: no PIL round trip per item
    img_block = TransformBlock(batch_tfms=IntToFloatTensor) if cached and "memory" in cached else ImageBlock
    block = DataBlock(blocks=(img_block, CategoryBlock(vocab=vocab, sort=False)), get_x=get_x,
                      get_y=ColReader("label"), splitter=ColSplitter("is_valid"), item_tfms=tfms,
                      batch_tfms=batch_tfms(recipe, stats))
    from fastai.torch_core import set_seed
    set_seed(seed)
    workers = default_workers() if num_workers is None else num_workers
    if not _cuda():
        reuse_freed_memory()  # CPU batches: reuse freed heap memory instead of page-faulting fresh pages in
    kw = dict(bs=recipe.bs, num_workers=workers, device="cpu" if not _cuda() else None)
    wgts = _sample_weights(recipe, df)
    if wgts is not None:  # fastai's WeightedDL draws the training batches by weight; valid stays plain and in order
        out = block.weighted_dataloaders(df, wgts, **kw)
    else:
        out = block.dataloaders(df, dl_type=PresizedDL if cached and "memory" in cached else None, **kw)
    out.items, out.stats, out.cached = items, stats, cached
    return out


def _sample_weights(recipe: Recipe, df: pd.DataFrame) -> Optional[np.ndarray]:
    """Per-row sampling weights for the imbalance plan's oversampler (valid rows 0: fastai drops them), or None."""
    from ..imbalance import oversample_weights, parse_imbalance
    if "oversample" not in parse_imbalance(recipe.imbalance):
        return None
    train = ~df["is_valid"].to_numpy(bool)
    wgts = np.zeros(len(df))
    wgts[train] = oversample_weights(df.loc[train, "label"].to_numpy())
    return wgts


def default_workers() -> int:
    """DataLoader worker processes: 0 on CPU (measured: with 2 cores the model's threads need them), else cores - 1."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, n - 1) if _cuda() and n > 2 else 0


def test_dl(dls_, items: Items):
    """A DataLoader over the test items with the validation pipeline (no labels)."""
    if items.test is None or not len(items.test):
        return None
    return dls_.test_dl(items.test, with_labels=False)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# -- bad images: one report before training ----------------------------------------------------------------------------
def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: 16-bit and float grayscale scaled (not clipped), transparency over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and a.max() > 255):
            a = a / 65535.0  # 16-bit samples: PIL's own convert('RGB') would clip them to white
        elif mode == "F" and a.max() > 1.0:
            a = a / 255.0
        else:
            a = a / (1.0 if mode == "F" else 255.0)
        return Image.fromarray(np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (Adobe-inverted CMYK JPEGs are handled by PIL), YCbCr, LAB, HSV


def load_image(path, draft: Optional[tuple] = None) -> Image.Image:
    """An RGB image from a file, upright (EXIF orientation applied), converted with `to_rgb`.

    Images over PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) are refused with an error.
    `draft=(w, h)` lets JPEGs decode at a reduced scale (fast checks).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if draft is not None:
                img.draft("RGB", draft)
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))


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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
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


def cache_home() -> Path:
    """fastcls's cache folder (image-check verdicts): $FASTCLS_CACHE, else ~/.cache/fastcls."""
    return Path(os.environ.get("FASTCLS_CACHE") or Path.home() / ".cache" / "fastcls").expanduser()


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
