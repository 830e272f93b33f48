"""From a data folder to fastai DataLoaders: layout readers, reproducible splits, crops, one DataBlock.

Every layout is read into the same `Items` table (one row per image: `id`, `x`, `label`, optional `group`),
so one DataBlock serves folder-per-class data, CSV tables and numpy arrays alike.
"""

__all__ = ["Items", "LAYOUTS", "layout", "read_items", "assign_split", "sample_items", "TrimCrop", "CenterSquare",
           "ImageGetter", "item_tfms", "batch_tfms", "dls", "test_dl", "IMAGE_EXTS"]

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.transforms import ColReader, ColSplitter, IndexSplitter
from fastai.vision.augment import Resize, ResizeMethod, aug_transforms
from fastai.vision.core import PILImage
from fastai.vision.data import ImageBlock, imagenet_stats
from fastai.data.transforms import Normalize
from fasttransform import Transform
from PIL import Image
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split

from .errors import FastclsError
from .recipe import Recipe

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


def _layout_error(recipe: Recipe, path: Path, what: str) -> FastclsError:
    expected = LAYOUT_HELP.get(recipe.layout, recipe.layout).format(**recipe.to_dict())
    return FastclsError(f"Data folder {path} does not match the {recipe.layout!r} layout recipe {recipe.name!r} "
                        f"expects: {what}. Expected layout: {expected}. Pass the right folder with --data.")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _test_from_dir(path: Path, recipe: Recipe) -> Optional[pd.DataFrame]:
    if not recipe.test_dir or not (path / recipe.test_dir).is_dir():
        return None
    files = [p for p in sorted((path / recipe.test_dir).rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
    return pd.DataFrame({"id": [str(p.relative_to(path / recipe.test_dir)) for p in files], "x": [str(p) for p in files]})


@layout("folder")
def read_folder(path: Path, recipe: Recipe) -> Items:
    """One sub-folder per class under `train_dir`; an optional flat or nested `test_dir` of unlabeled images."""
    root = path / recipe.train_dir if recipe.train_dir else path
    if not root.is_dir():
        raise _layout_error(recipe, path, f"no folder {root}")
    rows = []
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir()):
        for p in sorted(cls_dir.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                rows.append((str(p.relative_to(root)), str(p), cls_dir.name))
    if not rows:
        raise _layout_error(recipe, path, f"no images in class sub-folders of {root}")
    return Items(pd.DataFrame(rows, columns=["id", "x", "label"]), _test_from_dir(path, recipe), root=path)


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


@layout("csv")
def read_csv_layout(path: Path, recipe: Recipe) -> Items:
    """A table of (file, label) with the images in `image_dir`; test images from `test_csv` or `test_dir`."""
    table = path / recipe.csv
    df = _read_csv(table, [recipe.file_col, recipe.label_col], recipe, path)
    img_dir = path / recipe.image_dir
    train = pd.DataFrame({"id": df[recipe.file_col], "x": _csv_files(df, recipe.file_col, img_dir, recipe, table),
                          "label": df[recipe.label_col].astype(str)})
    if recipe.group_col and recipe.group_col in df:
        train["group"] = df[recipe.group_col].values
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
    if "classes" in z and np.issubdtype(labels.dtype, np.integer):
        labels = np.asarray(z["classes"])[labels]
    n = len(z["images"])
    train = pd.DataFrame({"id": [f"train-{i}" for i in range(n)], "x": np.arange(n), "label": labels.astype(str),
                          "src": "train"})
    arrays, test = {"train": z["images"]}, None
    if recipe.npz_test and (path / recipe.npz_test).is_file():
        t = _load_npz(path / recipe.npz_test, recipe, path, ["images"])
        arrays["test"] = t["images"]
        test = pd.DataFrame({"id": [str(i) for i in range(len(t["images"]))], "x": np.arange(len(t["images"])),
                             "src": "test"})
    return Items(train, test, arrays, root=path)


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
                           f"(expected layout: {LAYOUT_HELP[recipe.layout].format(**recipe.to_dict())}).")
    path = Path(raw).expanduser()
    if not path.exists():
        raise FastclsError(f"Data folder {path} does not exist (recipe {recipe.name!r}). Pass the folder with --data PATH.")
    return path


def read_items(recipe: Recipe, data=None) -> Items:
    """Read the recipe's training and test items from `data` (or the recipe's default data folder)."""
    if recipe.layout not in LAYOUTS:
        raise FastclsError(f"Recipe {recipe.name!r} uses unknown layout {recipe.layout!r}; known: {', '.join(LAYOUTS)}.")
    path = resolve_data_path(recipe, data)
    items = LAYOUTS[recipe.layout](path, recipe)
    dup = items.train["id"][items.train["id"].duplicated()]
    if len(dup):
        raise FastclsError(f"Recipe {recipe.name!r}, data {path}: duplicate item ids, e.g. {dup.iloc[0]!r} "
                           f"({len(dup)} duplicates). Every training item must appear once.")
    if items.train["label"].nunique() < 2:
        raise _layout_error(recipe, path, f"only {items.train['label'].nunique()} class found; need at least 2")
    return items


# -- splits ----------------------------------------------------------------------------------------------------------
def assign_split(train: pd.DataFrame, recipe: Recipe, seed: int) -> pd.DataFrame:
    """A copy of `train` with a boolean `is_valid` column, reproducible for a given seed."""
    df = train.copy()
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


def sample_items(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """A stratified subset of `n` training items (every class kept where n allows), for quick checks."""
    if n >= len(train):
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

    def encodes(self, img: PILImage):
        w, h = img.size
        t, b, l, r = (v * (h if i < 2 else w) if isinstance(v, float) and v < 1 else v for i, v in enumerate(self.box))
        box = (int(l), int(t), int(w - r), int(h - b))
        if box[2] <= box[0] or box[3] <= box[1]:
            raise FastclsError(f"Trim crop {self.box} leaves nothing of a {w}x{h} image; use smaller margins or --crop none.")
        return img.crop(box)


class CenterSquare(Transform):
    """The central square of the original image (side = its shorter side)."""

    order = 0

    def encodes(self, img: PILImage):
        w, h = img.size
        s = min(w, h)
        l, t = (w - s) // 2, (h - s) // 2
        return img.crop((l, t, l + s, t + s))


class ImageGetter:
    """Row of an `Items` table -> RGB PILImage, from a file or from row `x` of the in-memory array `src`."""

    def __init__(self, arrays: Optional[dict] = None):
        self.arrays = arrays or {}

    def __call__(self, row) -> PILImage:
        if self.arrays:
            return PILImage(Image.fromarray(np.asarray(self.arrays[row["src"]][int(row["x"])])).convert("RGB"))
        return PILImage.create(row["x"])


def item_tfms(recipe: Recipe) -> list:
    """Crop on the original image, then resize to the recipe's size (squish keeps the whole crop)."""
    tfms = []
    if recipe.crop == "trim":
        tfms.append(TrimCrop(*recipe.trim))
    elif recipe.crop == "center":
        tfms.append(CenterSquare())
    tfms.append(Resize(recipe.size, method=ResizeMethod.Squish))
    return tfms


def batch_tfms(recipe: Recipe, stats=None) -> list:
    """GPU-friendly batch augmentation (train only) and normalisation."""
    tfms = []
    if recipe.aug:
        tfms += aug_transforms(do_flip=recipe.flip, max_rotate=recipe.max_rotate, max_zoom=recipe.max_zoom,
                               max_lighting=recipe.max_lighting, max_warp=0.0)
    if recipe.normalize == "imagenet":
        tfms.append(Normalize.from_stats(*imagenet_stats))
    elif recipe.normalize == "dataset" and stats is not None:
        tfms.append(Normalize.from_stats(*stats))
    return tfms


def dataset_stats(items: Items, df: pd.DataFrame, n: int = 512, seed: int = 0):
    """Per-channel mean and std (0..1 scale) of up to `n` training images, for recipes normalising by their own data."""
    rng = np.random.default_rng(seed)
    get = ImageGetter(items.arrays)
    rows = df.iloc[rng.permutation(len(df))[:n]]
    px = np.concatenate([np.asarray(get(r), dtype=np.float32).reshape(-1, 3) / 255 for _, r in rows.iterrows()])
    return px.mean(0).tolist(), px.std(0).tolist()


def dls(recipe: Recipe, items: Items, seed: int = 42, sample: Optional[int] = None, num_workers: int = 0):
    """fastai DataLoaders for the recipe's items, split reproducibly by `seed`; `sample` takes a stratified subset."""
    train = items.train if sample is None else sample_items(items.train, sample, seed)
    df = assign_split(train, recipe, seed).reset_index(drop=True)
    stats = dataset_stats(items, df[~df["is_valid"]]) if recipe.normalize == "dataset" else None
    vocab = sorted(df["label"].unique().tolist())
    block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=vocab)), get_x=ImageGetter(items.arrays),
                      get_y=ColReader("label"), splitter=ColSplitter("is_valid"), item_tfms=item_tfms(recipe),
                      batch_tfms=batch_tfms(recipe, stats))
    from fastai.torch_core import set_seed
    set_seed(seed)
    out = block.dataloaders(df, bs=recipe.bs, num_workers=num_workers, device="cpu" if not _cuda() else None)
    out.items, out.stats = items, stats
    return out


def test_dl(dls_, items: Items):
    """A DataLoader over the test items with the validation pipeline (no labels)."""
    if items.test is None or not len(items.test):
        return None
    return dls_.test_dl(items.test, with_labels=False)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
