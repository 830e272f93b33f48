"""Pre-resized image cache: decode, crop and resize each original image once, then read the small copy.

fastcls's item pipeline is deterministic (crop on the original, then a squish resize to the working size; the random
flips, rotations and zooms run afterwards on the batch), so the cache stores exactly what that pipeline produces:
one raw uint8 `.npy` per image at the working size (or, when raw arrays would not fit the cache's disk budget, one
lossless PNG: `cache_format`). Reading it back gives bit-identical tensors to decoding the
original, at a fraction of the cost (measured on the simpsons photos: 0.07 ms to read a 224 px `.npy` against 2.4 ms
to decode the JPEG plus 1.7 ms to resize it; PNG would take 1.3 ms to read, JPEG-95 0.6 ms but changes pixels by up to
29 levels). No margin for random crops is kept because no random crop runs before the cached stage.

Layout: `<root>/<settings hash>/<aa>/<source hash>-<version hash>.npy` (or `.png`) where the settings hash covers the
crop, size and format, the source hash covers the absolute path, and the version hash covers the file's size and
mtime. A changed source gets a new version hash: its old entry is never read again and is deleted when the new one is
written. Entries are written to a temporary file and renamed into place, so concurrent readers (DataLoader workers, parallel
runs) see either nothing or a whole entry. The root is `images/` under `$FASTCLS_CACHE`, else `~/.cache/fastcls/images`.
"""

__all__ = ["cache_home", "cache_root", "cache_settings", "CachedImageGetter", "PresizedArrays", "PresizedDL",
           "use_cache", "pre_resized", "fill_cache", "fill_caches", "CacheStats", "FORMATS", "cache_format", "CachePlan"]

import hashlib
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.data.transforms import Categorize
from fastai.torch_core import TensorCategory
from fastai.vision.core import PILImage, TensorImage
from fasttransform import Transform
from PIL import Image

from ..budget import DISK_MARGIN, free_bytes, human_bytes, memory_budget, parse_bytes
from ..errors import FastclsError
from ..recipe import Recipe, each_size
from .images import ImageGetter, item_tfms, resolve_recipe
from .items import Items

_VERSION = 1  # bump when the stored format or the cached pipeline changes
# stored formats, both lossless: raw arrays (fastest to read) and PNG (smaller; chosen when raw would not fit the
# cache's disk budget, `Recipe.cache_budget`)
FORMATS = {"npy": ("npy-uint8-rgb", ".npy"), "png": ("png-rgb", ".png")}
_NPY_HEADER = 128  # bytes of a .npy header
_PNG_LEVEL = 1  # zlib level of cached PNGs: level 6 is ~10% smaller and several times slower to write


def cache_home() -> Path:
    """fastcls's cache folder (image-check verdicts, pre-resized images): $FASTCLS_CACHE, else ~/.cache/fastcls."""
    return Path(os.environ.get("FASTCLS_CACHE") or Path.home() / ".cache" / "fastcls").expanduser()


def cache_root() -> Path:
    """The image cache folder: `images/` in fastcls's cache home (`$FASTCLS_CACHE`, else `~/.cache/fastcls`)."""
    return cache_home() / "images"


def cache_settings(recipe: Recipe, fmt: str = "npy") -> dict:
    """The recipe settings that decide what the cached stage produces (and so belong in the cache key), and the
    stored format `fmt` (a key of `FORMATS`)."""
    return {"v": _VERSION, "crop": recipe.crop, "trim": list(recipe.trim) if recipe.crop == "trim" else None,
            "size": recipe.size, "resize": "squish", "format": FORMATS[fmt][0]}


def _digest(text: str, n: int = 16) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


class CachedImageGetter:
    """Row of an `Items` table -> the cropped, resized RGB PILImage, read from the cache or made and stored there.

    Args:
        getter: reads the original image of a row (`fastcls.data.ImageGetter`).
        tfms: the deterministic item transforms the cache replaces (crop, then resize), applied to a miss.
        settings: `cache_settings(recipe)`; part of every key.
        root: the cache folder (default `cache_root()`).
    """

    def __init__(self, getter, tfms: list, settings: dict, root: Optional[Path] = None):
        self.getter, self.tfms, self.settings = getter, list(tfms), settings
        self.root = Path(root) if root is not None else cache_root()
        self.folder = self.root / _digest(json.dumps(settings, sort_keys=True))
        self.suffix = next(suffix for name, suffix in FORMATS.values() if name == settings["format"])
        self._folder_ready = False

    def entry(self, src) -> Path:
        """Where the cached copy of source file `src` (as it is now on disk) lives."""
        src = os.path.abspath(src)
        st = os.stat(src)
        h = _digest(src)
        return self.folder / h[:2] / f"{h}-{_digest(f'{st.st_size}:{st.st_mtime_ns}', 8)}{self.suffix}"

    def __call__(self, row) -> PILImage:
        if row["x"] in getattr(self.getter, "blank", ()):  # an unreadable test image stands in as a blank: not cached
            return self.make(row)
        path = self.entry(row["x"])
        try:
            return PILImage(Image.fromarray(self.read(path)))
        except (FileNotFoundError, ValueError, OSError):  # a miss, or an unreadable entry: rebuild it
            pass
        img = self.make(row)
        self._store(path, np.asarray(img))
        return img

    def read(self, path: Path) -> np.ndarray:
        """The (S, S, 3) uint8 array of a cache entry (raises OSError or ValueError when it is missing or damaged)."""
        if self.suffix == ".npy":
            return _read_npy(path)
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "RGB":
                raise ValueError(f"{path} is not an RGB PNG")
            return np.asarray(im)

    def make(self, row) -> PILImage:
        """The cached stage computed from the original: decode, crop, resize."""
        return _apply(self.getter, self.tfms, row)

    def _store(self, path: Path, arr: np.ndarray):
        self._prepare()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=self.suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                _encode(f, arr, self.suffix)
            os.replace(tmp, path)  # atomic: readers see no entry or a whole one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        prefix = path.name.split("-")[0]
        for old in path.parent.glob(f"{prefix}-*{self.suffix}"):  # versions of a source that has since changed
            if old != path:
                old.unlink(missing_ok=True)

    def _prepare(self):
        """Create the settings folder with a readable `settings.json` (once)."""
        if self._folder_ready:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        info = self.folder / "settings.json"
        if not info.exists():
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.settings, f)
            os.replace(tmp, info)
        self._folder_ready = True


# numpy parses an .npy header with ast.literal_eval, and CPython 3.11's AST construction is not thread-safe (it can
# raise "SystemError: AST constructor recursion depth mismatch" when two threads parse at once: python/cpython#106905);
# cache entries are read from several threads, so their headers are parsed one at a time.
_NPY_PARSE = threading.Lock()


def _read_npy(path) -> np.ndarray:
    """A cache entry written by `_encode` (a C-ordered uint8 array), like `np.load(path, allow_pickle=False)`."""
    with open(path, "rb") as f:
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(f))
        if read_header is None:
            raise ValueError(f"{path}: not an .npy file fastcls wrote")
        with _NPY_PARSE:
            shape, fortran, dtype = read_header(f)
        if fortran or dtype != np.uint8:
            raise ValueError(f"{path} is not a C-ordered uint8 array")
        arr = np.empty(shape, dtype=np.uint8)
        got = f.readinto(memoryview(arr).cast("B")) if arr.size else 0
    if got != arr.size:
        raise ValueError(f"{path} is truncated ({got} of {arr.size} bytes)")
    return arr


def _encode(f, arr: np.ndarray, suffix: str):
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if suffix == ".npy":
        np.save(f, arr, allow_pickle=False)
    else:
        Image.fromarray(arr).save(f, format="PNG", compress_level=_PNG_LEVEL)


def _apply(getter, tfms, row) -> PILImage:
    img = getter(row)
    for t in tfms:
        img = t(img)
    return PILImage(img.convert("RGB")) if img.mode != "RGB" else img


class PresizedArrays(Transform):
    """Row -> (3, S, S) uint8 TensorImage: every image cropped and resized once, up front, and kept in memory.

    Serves in-memory arrays (rows keyed by `src`, `x`) and image files (keyed by path; read through the disk cache when
    `getter` is a `CachedImageGetter`). The per-item path (image -> PIL -> crop -> resize -> tensor, every epoch)
    costs ~2 ms per image in fastai's item pipeline on the development CPU; `PresizedDL` slices whole batches out of
    `data` instead, with identical pixels. Rows not seen up front (a later `test_dl` over other items) are made on
    first use. Images are made on a thread pool (Pillow releases the GIL while decoding and resizing).

    Args:
        getter: row -> image (`fastcls.data.ImageGetter`, or a `CachedImageGetter`).
        tfms: the item transforms (crop, resize) to apply once ([] for a `CachedImageGetter`).
        frames: DataFrames of rows to make up front.
    """

    def __init__(self, getter, tfms: list, frames):
        super().__init__()
        self.getter, self.tfms, self.index, self.data = getter, list(tfms), {}, None
        for df in frames:
            self.rows(df)

    def encodes(self, row) -> TensorImage:
        return TensorImage(self.data[self.rows(row.to_frame().T)[0]])

    @staticmethod
    def _keys(df) -> list:
        src = df["src"] if "src" in df else [None] * len(df)
        return [(s, int(x) if s is not None else str(x)) for s, x in zip(src, df["x"])]

    def rows(self, df) -> np.ndarray:
        """Positions in `data` of the rows of `df`; rows not seen yet are made and appended."""
        keys = self._keys(df)
        new = [k for k in dict.fromkeys(keys) if k not in self.index]
        if new:
            def make(key):
                return np.asarray(_apply(self.getter, self.tfms, {"src": key[0], "x": key[1]}))
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
                made = torch.from_numpy(np.stack(list(ex.map(make, new)))).permute(0, 3, 1, 2)
            self.index.update({k: len(self.index) + i for i, k in enumerate(new)})
            self.data = made.contiguous() if self.data is None else torch.cat([self.data, made])
        return np.fromiter((self.index[k] for k in keys), dtype=np.int64, count=len(keys))


class PresizedDL(TfmdDL):
    """A TfmdDL that slices each batch out of `PresizedArrays.data` in one indexing operation.

    fastai's default builds a batch item by item (a pandas row, the getter, the label, type dispatch; ~0.6 ms per
    item here even for pre-resized arrays) and then stacks them; this gives the same batches in the same order.
    Anything else (another dataset layout) falls back to the item-by-item path.
    """

    def create_batches(self, samps):
        plan = self._plan()
        if plan is None:
            yield from super().create_batches(samps)
            return
        data, rows, codes = plan
        for idx in self.chunkify(samps):
            idx = np.fromiter(idx, dtype=np.int64)
            xb = TensorImage(data[rows[idx]])
            yield (xb,) if codes is None else (xb, TensorCategory(codes[idx]))

    def _plan(self):
        """(image tensor, row of each item in it, label codes or None), once per dataset; None if not applicable."""
        ds = self.dataset
        if getattr(self, "_plan_for", None) is ds:
            return self._plan_cache
        plan, tls = None, getattr(ds, "tls", [])
        pre = [f for f in tls[0].tfms.fs if isinstance(f, PresizedArrays)] if tls else []
        if pre and len(tls) in (1, 2) and len(tls[0].tfms.fs) == 1:
            codes = None
            if len(tls) == 2:  # labels: ColReader('label') then Categorize, as fastcls.data.dls builds them
                cat = [f for f in tls[1].tfms.fs if isinstance(f, Categorize)]
                if len(cat) == 1 and "label" in ds.items:
                    mapped = ds.items["label"].astype(str).map(cat[0].vocab.o2i)
                    codes = None if mapped.isna().any() else torch.tensor(mapped.to_numpy(np.int64))
            if len(tls) == 1 or codes is not None:
                rows = pre[0].rows(ds.items)
                plan = (pre[0].data, torch.from_numpy(rows), codes)
        self._plan_for, self._plan_cache = ds, plan
        return plan


def pre_resized(recipe: Recipe, items: Items, frames, getter, tfms: list):
    """The item getter to use, the item transforms still to run, and which pre-resized paths were chosen.

    Image files go through the disk cache when `use_cache` says so, in the format `cache_format` picks (refused
    before anything is written when the cache will not fit on its disk). Then, unless `recipe.cache` is False, all
    images (files or arrays) are cropped and resized once up front and kept in memory (`PresizedArrays`) when they fit
    in the memory budget (`fastcls.budget.memory_budget`, `$FASTCLS_MEMORY_BUDGET`); otherwise each item is made (or
    read from the disk cache) every epoch.

    Returns:
        `(get_x, item_tfms, kind)`, kind one of "memory", "disk+memory", "disk" or None. With "memory" in it, get_x
        returns uint8 tensors, not PIL images, and `PresizedDL` serves whole batches.
    """
    frames = [df for df in frames if df is not None]
    disk = use_cache(recipe, items)
    if disk:
        plan = cache_format(recipe, items, getter=getter, tfms=tfms)
        getter, tfms = CachedImageGetter(getter, tfms, cache_settings(recipe, plan.fmt)), []
    n = sum(len(df) for df in frames)
    if recipe.cache is not False and n * recipe.size ** 2 * 3 <= memory_budget():
        return PresizedArrays(getter, tfms, frames), [], "disk+memory" if disk else "memory"
    return getter, tfms, "disk" if disk else None


@dataclass
class CachePlan:
    """The image cache's format for a recipe and data set, and what filling it still needs on disk."""

    fmt: str  # a key of FORMATS
    folder: Path
    images: int  # train + test images
    missing: int  # images not cached yet in this format
    per_image: float  # estimated bytes per entry
    budget: Optional[int]  # Recipe.cache_budget in bytes (None: the free disk space decides)

    @property
    def need(self) -> int:
        """Estimated bytes still to write."""
        return int(self.missing * self.per_image)


def _sources(items: Items) -> list:
    return [x for df in (items.train, items.test) if df is not None for x in df["x"]]


def _png_bytes(getter, tfms, xs, n_probe: int = 8) -> float:
    """Mean size of a cached PNG, from up to `n_probe` images spread over `xs` made and encoded in memory."""
    import io
    sizes = []
    for x in [xs[i] for i in np.linspace(0, len(xs) - 1, num=min(n_probe, len(xs))).astype(int)]:
        try:
            buf = io.BytesIO()
            _encode(buf, np.asarray(_apply(getter, tfms, {"x": x})), ".png")
            sizes.append(buf.tell())
        except OSError:
            continue
    return float(np.mean(sizes)) if sizes else 0.0


def cache_format(recipe: Recipe, items: Items, root: Optional[Path] = None, getter=None,
                 tfms: Optional[list] = None) -> CachePlan:
    """Pick the image cache's stored format for `recipe` on `items`, within its disk budget, before writing anything.

    Raw arrays (`npy`) when the whole cache fits `recipe.cache_budget` (when set) and what is still missing fits the
    free disk space; else lossless PNG when that fits (its size estimated by encoding a few images); else a
    FastclsError with the numbers (needed, budget, free) and what to do. An existing cache of a format that fits is
    reused as it is.

    Args:
        recipe: crop and working size (already resolved: not None), and the disk budget `cache_budget`.
        items: file-based items (train and test images are cached).
        root: the cache folder (default `cache_root()`).
        getter, tfms: how an image is made (default: `ImageGetter()` and the recipe's item transforms).
    """
    getter = getter if getter is not None else ImageGetter()
    tfms = item_tfms(recipe) if tfms is None else tfms
    xs = _sources(items)
    budget = None if recipe.cache_budget is None else parse_bytes(recipe.cache_budget, "cache_budget")
    free = free_bytes(Path(root) if root is not None else cache_root())
    tried = []
    for fmt in FORMATS:
        get = CachedImageGetter(getter, tfms, cache_settings(recipe, fmt), root)
        per = recipe.size ** 2 * 3 + _NPY_HEADER if fmt == "npy" else _png_bytes(getter, tfms, xs)
        missing = len(xs)
        if (get.folder / "settings.json").is_file():  # partly filled: only its missing entries need space
            missing = sum(1 for x in xs if not os.path.exists(x) or not get.entry(x).exists())
        plan = CachePlan(fmt, get.folder, len(xs), missing, per, budget)
        if (budget is None or len(xs) * per <= budget) and plan.need + DISK_MARGIN <= free:
            return plan
        tried.append(f"{FORMATS[fmt][0]} about {human_bytes(len(xs) * per)} ({human_bytes(plan.need)} still to write)")
    limit = f"a budget of {human_bytes(budget)} (cache_budget) and " if budget is not None else ""
    raise FastclsError(
        f"The image cache of {len(xs)} images at {recipe.size} px will not fit: {'; '.join(tried)}, against "
        f"{limit}{human_bytes(free)} free in {get.root} (fastcls keeps {human_bytes(DISK_MARGIN)} spare). Nothing was "
        "written. Free some disk space, point $FASTCLS_CACHE at a bigger disk, raise --cache-budget, use a smaller "
        "--size, or train without the disk cache (--no-cache).")


def _file_based(items: Items) -> bool:
    return not items.arrays and len(items.train) > 0


def use_cache(recipe: Recipe, items: Items, n_probe: int = 16) -> bool:
    """Whether runs of `recipe` on `items` read through the cache.

    `recipe.cache` True or False decides; None (auto) turns it on when the images are files whose median pixel count
    (over up to `n_probe` headers, no decoding) exceeds twice the working size's, i.e. when decoding and resizing
    cost more than reading the small copy. Arrays held in memory are never cached.
    """
    if not _file_based(items):
        return False
    if recipe.cache is not None:
        return recipe.cache
    if recipe.size is None:  # left to the data
        recipe = resolve_recipe(recipe, items)
    xs = items.train["x"]
    idx = np.linspace(0, len(xs) - 1, num=min(n_probe, len(xs))).astype(int)
    areas = []
    for x in xs.iloc[idx]:
        try:
            with Image.open(x) as im:
                areas.append(im.size[0] * im.size[1])
        except OSError:
            continue
    return bool(areas) and float(np.median(areas)) > 2 * recipe.size ** 2


@dataclass
class CacheStats:
    """What `fill_cache` did: images already cached, newly written, the folder and its size on disk."""

    hits: int
    written: int
    folder: Path
    bytes: int
    size: int  # the working size the images were cached at
    format: str = "npy"  # a key of FORMATS (cache_format's choice)

    @property
    def total(self) -> int:
        return self.hits + self.written


def fill_cache(recipe: Recipe, items: Items, root: Optional[Path] = None, threads: Optional[int] = None) -> CacheStats:
    """Write the cached copy of every training and test image of `items` for `recipe`'s crop and size.

    Args:
        recipe: gives the crop and the working size (inferred from the images when the recipe leaves it to them).
        items: from `fastcls.data.read_items`; must be file-based.
        root: the cache folder (default `cache_root()`).
        threads: decoding threads (Pillow releases the GIL while decoding and resizing); default: the CPU count.

    Returns:
        A `CacheStats`.
    """
    if not _file_based(items):
        raise FastclsError(f"Recipe {recipe.name!r} reads its images from arrays in memory ({recipe.layout!r} layout): "
                           "each run crops and resizes them once in memory, so there is nothing to cache on disk. "
                           "The image cache is for image files.")
    recipe = resolve_recipe(recipe, items)  # a recipe may leave the size to the data
    plan = cache_format(recipe, items, root)  # refuses a cache that will not fit before anything is written
    get = CachedImageGetter(ImageGetter(), item_tfms(recipe), cache_settings(recipe, plan.fmt), root)
    rows = [r for df in (items.train, items.test) if df is not None for r in df[["x"]].to_dict("records")]

    def one(row) -> bool:
        path = get.entry(row["x"])
        if path.exists():
            return True
        try:
            get._store(path, np.asarray(get.make(row)))
        except OSError as e:
            raise FastclsError(f"Cannot cache image {row['x']}: {e}. Check the file, or remove it from the "
                               "data.") from None
        return False

    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as ex:
        hits = sum(ex.map(one, rows))
    disk = sum(p.stat().st_size for p in get.folder.rglob(f"*{get.suffix}"))
    return CacheStats(hits, len(rows) - hits, get.folder, disk, recipe.size, plan.fmt)


def fill_caches(recipe: Recipe, items: Items, root: Optional[Path] = None, threads: Optional[int] = None) -> list:
    """`fill_cache` at each size a run of `recipe` trains at: a progressive recipe (`--size 128,224`) reads its
    images at every size in turn, so each is cached (in training order); one `CacheStats` per size."""
    return [fill_cache(r, items, root, threads) for r in each_size(recipe)]
