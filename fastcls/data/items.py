"""Every layout read into the same `Items` table, and the cheap checks that reading does.

One row per image (`id`, `x`, `label`, optional `group`), so one DataBlock serves folder-per-class data, CSV tables
and numpy arrays alike. Layout readers register in `LAYOUTS` with `@layout(name)`.
"""

__all__ = ["IMAGE_EXTS", "Items", "LAYOUTS", "layout", "read_folder", "read_folder_auto", "read_csv_layout", "read_npz",
           "read_digits", "read_custom", "resolve_data_path", "read_layout", "item_problems", "item_notes",
           "read_items"]

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from ..errors import FastclsError
from ..recipe import Recipe
from ..submission import submission_ids

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
    notes: list = field(default_factory=list)  # what the reader left out on purpose (empty class folders, link loops)

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


def _image_files(folder: Path, notes: list) -> list[Path]:
    """Every image file under `folder`, sorted; linked sub-folders are followed, but a link to a folder already
    read on this walk (a loop: a link back up, or two links to each other) is skipped with a note."""
    files, seen = [], {os.path.realpath(folder)}
    for top, dirs, names in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirs):
            target = os.path.realpath(os.path.join(top, d))
            if target in seen:
                notes.append(f"{Path(top) / d} leads to {target}, which is read already (a loop, or a second way "
                             "to one folder): skipped, its images are read once.")
            else:
                seen.add(target)
                kept.append(d)
        dirs[:] = kept
        files += [p for p in (Path(top) / n for n in names) if _is_image(p)]
    return sorted(files)


def _test_from_dir(path: Path, recipe: Recipe, notes: list) -> Optional[pd.DataFrame]:
    if not recipe.test_dir or not (path / recipe.test_dir).is_dir():
        return None
    files = _image_files(path / recipe.test_dir, notes)
    ids = [str(p.relative_to(path / recipe.test_dir)) for p in files]
    return pd.DataFrame({"id": ids, "x": [str(p) for p in files]})


def _class_rows(root: Path, notes: list, skip=()) -> list[tuple]:
    """(id relative to root, path, class) for every image in the class sub-folders of `root`; a class folder with
    no image is noted (it cannot be learned, so it is not a class of the run)."""
    rows = []
    for cls_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__"))
                          and d.resolve() not in skip):
        if (os.path.realpath(root) + os.sep).startswith(os.path.realpath(cls_dir) + os.sep):  # root/x -> root
            notes.append(f"{cls_dir} links back to {os.path.realpath(cls_dir)} (a loop): not a class folder, skipped.")
            continue
        found = [(str(p.relative_to(root)), str(p), cls_dir.name) for p in _image_files(cls_dir, notes)]
        if not found:
            notes.append(f"class folder {cls_dir} has no images: class {cls_dir.name!r} is left out (a class with no "
                         "images cannot be learned). Add images to it, or delete the folder.")
        rows += found
    return rows


@layout("folder")
def read_folder(path: Path, recipe: Recipe) -> Items:
    """One sub-folder per class under `train_dir` (and `valid_dir`, a given split); an optional `test_dir`."""
    root = path / recipe.train_dir if recipe.train_dir else path
    if not root.is_dir():
        raise _layout_error(recipe, path, f"no folder {root}")
    # class folders at the data root itself must not take the test or valid folder for a class
    skip, notes = {(path / d).resolve() for d in (recipe.test_dir, recipe.valid_dir) if d}, []
    rows = _class_rows(root, notes, skip)
    if not rows:
        raise _layout_error(recipe, path, f"no images in class sub-folders of {root}")
    train = pd.DataFrame(rows, columns=["id", "x", "label"])
    if recipe.valid_dir:
        vroot = path / recipe.valid_dir
        valid = pd.DataFrame(_class_rows(vroot, notes) if vroot.is_dir() else [], columns=["id", "x", "label"])
        if not len(valid):
            raise _layout_error(recipe, path, f"no images in class sub-folders of the validation folder {vroot}")
        valid["id"] = [f"{recipe.valid_dir}/{i}" for i in valid["id"]]  # cat/1.jpg may be in train and in valid
        train = pd.concat([train.assign(is_valid=False), valid.assign(is_valid=True)], ignore_index=True)
    return Items(train, _test_from_dir(path, recipe, notes), root=path, notes=notes)


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
    notes = []
    if test is None:
        test = _test_from_dir(path, recipe, notes)
    return Items(train, test, root=path, notes=notes)


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
            worst = y.max() if y.max() >= len(classes) else y.min()
            raise _layout_error(recipe, path, f"{file} has label index {worst}"
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
    """The recipe's own `items(path, recipe)` function (layout 'custom')."""
    if recipe.items is None:
        raise FastclsError(f"Recipe {recipe.name!r} has layout 'custom' but no items function.")
    return recipe.items(path, recipe)


def _has_layout(recipe: Recipe, path: Path) -> bool:
    """Whether `path` looks like the recipe's layout (its train folder, table or arrays are there)."""
    if recipe.layout == "folder":
        return (path / recipe.train_dir).is_dir() and any((path / recipe.train_dir).iterdir())
    if recipe.layout == "csv":
        return (path / recipe.csv).is_file()
    if recipe.layout == "npz":
        return (path / recipe.npz_train).is_file()
    try:  # custom: its items function decides
        return len(read_layout(recipe, path).train) > 0
    except Exception:
        return False


def resolve_data_path(recipe: Recipe, data=None) -> Optional[Path]:
    """The data folder to read: --data, else the recipe's default, else `$FASTCLS_DATA/<recipe>` when it exists,
    else the current folder when it has the recipe's layout; a clear error naming the places looked."""
    if recipe.layout == "digits":
        return None
    raw = data if data is not None else recipe.data
    if raw is None:
        env = os.environ.get("FASTCLS_DATA")
        looked = []
        if env:
            looked.append(Path(env).expanduser() / recipe.name)
            if looked[-1].is_dir():
                return looked[-1]
        looked.append(Path.cwd())
        if _has_layout(recipe, Path.cwd()):
            return Path.cwd()
        places = (f"$FASTCLS_DATA/{recipe.name} ({looked[0]}: not there)" if env else
                  "$FASTCLS_DATA/<recipe> ($FASTCLS_DATA is not set)")
        raise FastclsError(f"Recipe {recipe.name!r} has no default data folder, and none was found: looked in "
                           f"{places} and the current folder ({Path.cwd()}: not the recipe's layout). Pass one with "
                           f"--data PATH (expected layout: {_layout_help(recipe)}).")
    path = Path(raw).expanduser()
    if not path.exists():
        raise FastclsError(f"Data folder {path} does not exist (recipe {recipe.name!r}). "
                           "Pass the folder with --data PATH.")
    return path


def read_layout(recipe: Recipe, path: Optional[Path]) -> Items:
    """The recipe's layout reader applied to `path`, without the checks `read_items` adds."""
    if recipe.layout not in LAYOUTS:
        raise FastclsError(f"Recipe {recipe.name!r} uses unknown layout {recipe.layout!r}; "
                           f"known: {', '.join(LAYOUTS)}.")
    return LAYOUTS[recipe.layout](path, recipe)


# labels that mean "no label": pandas' missing-value markers (a NaN written out as text), unless a declared class
NA_LABELS = {"nan", "NaN", "NAN", "-nan", "-NaN", "<NA>", "N/A", "n/a", "#N/A", "#NA", "NULL", "null", "NaT"}


def _row_names(train: pd.DataFrame, recipe: Recipe) -> list[str]:
    """Where each training row comes from: 'train.csv row 3' (spreadsheet numbering: the header is row 1; rows of
    a given validation table numbered in their own file), else the item's id."""
    if recipe.layout != "csv":
        return [repr(str(i)) for i in train["id"]]
    valid = train["is_valid"].astype(bool) if recipe.valid_csv and "is_valid" in train else \
        pd.Series(False, index=train.index)
    number = valid.groupby(valid).cumcount() + 2
    return [f"{recipe.valid_csv if v else recipe.csv} row {n}" for v, n in zip(valid, number)]


def item_problems(items: Items, recipe: Recipe, limit: int = 8) -> list[str]:
    """What would break training on these items, with the rows (cheap checks; `check_data` also decodes every image).

    Duplicate ids, one image file listed twice under different paths (`./a.jpg`, `x/../a.jpg`, a linked folder),
    empty or missing-value ('NaN') labels, labels outside the recipe's `classes`, fewer than two classes, image files
    listed but missing. CSV rows are numbered as in a spreadsheet (the header is row 1).
    """
    train, problems = items.train.reset_index(drop=True), []
    csv = recipe.layout == "csv"
    names = _row_names(train, recipe)

    def rows(idx) -> str:
        idx, shown, last = list(idx), [], None
        for i in idx[:limit]:
            file, _, row = names[i].rpartition(" row ") if csv else ("", "", names[i])
            shown.append(f"{file} row {row}" if csv and file != last else f"row {row}" if csv else row)
            last = file
        return ("" if csv else "items ") + ", ".join(shown) + (f" and {len(idx) - limit} more" if len(idx) > limit
                                                               else "")
    ids = train["id"].astype(str)
    dups = ids[ids.duplicated(keep=False)]
    if len(dups):
        groups = list(dups.groupby(dups, sort=False).groups.items())
        shown = "; ".join(f"{v!r} appears {len(ix)} times ({rows(ix)})" for v, ix in groups[:limit])
        problems.append(f"duplicate item ids: {shown}{' ...' if len(groups) > limit else ''}. Every training item "
                        "must appear once.")
    if not items.arrays and len(train):
        real = pd.Series([os.path.realpath(x) for x in train["x"].astype(str)], index=train.index)
        groups = [ix for _, ix in real[real.duplicated(keep=False)].groupby(real, sort=False).groups.items()
                  if ids[ix].nunique() > 1]  # the same id twice: reported above
        if groups:
            one = lambda i: f"{ids[i]!r} ({f'{rows([i])}, ' if csv else ''}label {train['label'][i]!r})"  # noqa: E731
            shown = "; ".join(f"{real[ix[0]]} as {', '.join(map(one, ix))}" for ix in groups[:limit])
            conflict = sum(train["label"][ix].nunique() > 1 for ix in groups)
            problems.append(f"{len(groups)} image file(s) are listed more than once under different paths"
                            f"{f' ({conflict} with different labels)' if conflict else ''}: {shown}"
                            f"{' ...' if len(groups) > limit else ''}. Every image must be listed once, with one "
                            "label: remove the extra rows (or the linked folder).")
    labels = train["label"].astype(str)
    empty = labels.str.strip() == ""
    if empty.any():
        problems.append(f"{int(empty.sum())} training item(s) have an empty label ({rows(np.flatnonzero(empty))}).")
    declared = {str(c) for c in recipe.classes or ()}
    na = (train["label"].isna() | labels.str.strip().isin(NA_LABELS - declared)) & ~empty
    if na.any():
        shown = ", ".join(map(repr, sorted(labels[na].unique())))
        problems.append(f"{int(na.sum())} training item(s) have a missing-value label {shown} "
                        f"({rows(np.flatnonzero(na))}): a missing label is not a class. Fill in the label, or remove "
                        "the row(s).")
        empty |= na
    if recipe.classes:
        bad = ~labels.isin(declared) & ~empty
        if bad.any():
            names_ = sorted(labels[bad].unique())
            problems.append(f"{int(bad.sum())} training item(s) have a label the recipe does not declare: "
                            f"{', '.join(map(repr, names_[:limit]))}{' ...' if len(names_) > limit else ''} "
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
    """Not errors, but worth a look: what the layout reader left out (a class folder with no images, a folder
    linked into itself), and image files in a csv layout's image folder that no table lists."""
    if recipe.layout != "csv" or items.root is None or not (items.root / recipe.image_dir).is_dir():
        return list(items.notes)
    listed = set(items.train["x"].astype(str))
    if items.test is not None:
        listed |= set(items.test["x"].astype(str))
    folder = (items.root / recipe.image_dir).resolve()
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and str(p) not in listed and p.is_file())
    if not extra:
        return list(items.notes)
    return [*items.notes, f"{len(extra)} image file(s) in {folder} are listed in no table and are not used: "
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
    items = read_layout(recipe, path)
    problems = item_problems(items, recipe)
    if problems:
        where = f"data {path}" if path else "its data"
        raise FastclsError(f"Recipe {recipe.name!r}, {where}: {len(problems)} problem(s), nothing was trained:\n"
                           + "\n".join(f"  - {p}" for p in problems + item_notes(items, recipe))
                           + f"\n`fastcls check {recipe.name}{f' --data {path}' if path else ''}` lists every problem.")
    for note in item_notes(items, recipe):  # what the reader left out is a warning; unlisted files a note
        print(f"fastcls: {'warning' if note in items.notes else 'note'}: {note}", file=sys.stderr)
    _attach_solution(items, recipe, path)
    return items
