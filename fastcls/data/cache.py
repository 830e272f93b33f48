"""Pre-resized image cache: decode, crop and resize each original image once, then read the small copy.

fastcls's item pipeline is deterministic (crop on the original, then a squish resize to the working size; the random
flips, rotations and zooms run afterwards on the batch), so the cache stores exactly what that pipeline produces:
one raw uint8 `.npy` per image at the working size. Reading it back gives bit-identical tensors to decoding the
original, at a fraction of the cost (measured on the simpsons photos: 0.07 ms to read a 224 px `.npy` against 2.4 ms
to decode the JPEG plus 1.7 ms to resize it; PNG would take 1.3 ms to read, JPEG-95 0.6 ms but changes pixels by up to
29 levels). No margin for random crops is kept because no random crop runs before the cached stage.

Layout: `<root>/<settings hash>/<aa>/<source hash>-<version hash>.npy` where the settings hash covers the crop and
size, the source hash covers the absolute path, and the version hash covers the file's size and mtime. A changed
source gets a new version hash: its old entry is never read again and is deleted when the new one is written.
Entries are written to a temporary file and renamed into place, so concurrent readers (DataLoader workers, parallel
runs) see either nothing or a whole entry. The root is `images/` under `$FASTCLS_CACHE`, else `~/.cache/fastcls/images`.
"""

__all__ = ["cache_home", "cache_root", "cache_settings", "CachedImageGetter", "PresizedArrays", "PresizedDL",
           "use_cache", "pre_resized", "fill_cache", "CacheStats", "MEMORY_BUDGET"]

import hashlib
import json
import os
import tempfile
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

from ..errors import FastclsError
from ..recipe import Recipe
from .images import ImageGetter, item_tfms, resolve_recipe
from .items import Items

_VERSION = 1  # bump when the stored format or the cached pipeline changes
MEMORY_BUDGET = 1 << 30  # bytes of pre-resized images a run keeps in memory (beyond it: item by item each epoch)


def cache_home() -> Path:
    """fastcls's cache folder (image-check verdicts, pre-resized images): $FASTCLS_CACHE, else ~/.cache/fastcls."""
    return Path(os.environ.get("FASTCLS_CACHE") or Path.home() / ".cache" / "fastcls").expanduser()


def cache_root() -> Path:
    """The image cache folder: `images/` in fastcls's cache home (`$FASTCLS_CACHE`, else `~/.cache/fastcls`)."""
    return cache_home() / "images"


def cache_settings(recipe: Recipe) -> dict:
    """The recipe settings that decide what the cached stage produces (and so belong in the cache key)."""
    return {"v": _VERSION, "crop": recipe.crop, "trim": list(recipe.trim) if recipe.crop == "trim" else None,
            "size": recipe.size, "resize": "squish", "format": "npy-uint8-rgb"}


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
        self._folder_ready = False

    def entry(self, src) -> Path:
        """Where the cached copy of source file `src` (as it is now on disk) lives."""
        src = os.path.abspath(src)
        st = os.stat(src)
        h = _digest(src)
        return self.folder / h[:2] / f"{h}-{_digest(f'{st.st_size}:{st.st_mtime_ns}', 8)}.npy"

    def __call__(self, row) -> PILImage:
        if row["x"] in getattr(self.getter, "blank", ()):  # an unreadable test image stands in as a blank: not cached
            return self.make(row)
        path = self.entry(row["x"])
        try:
            return PILImage(Image.fromarray(np.load(path, allow_pickle=False)))
        except (FileNotFoundError, ValueError, OSError):  # a miss, or an unreadable entry: rebuild it
            pass
        img = self.make(row)
        self._store(path, np.asarray(img))
        return img

    def make(self, row) -> PILImage:
        """The cached stage computed from the original: decode, crop, resize."""
        return _apply(self.getter, self.tfms, row)

    def _store(self, path: Path, arr: np.ndarray):
        self._prepare()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(arr, dtype=np.uint8), allow_pickle=False)
            os.replace(tmp, path)  # atomic: readers see no entry or a whole one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        prefix = path.name.split("-")[0]
        for old in path.parent.glob(f"{prefix}-*.npy"):  # versions of a source that has since changed
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

    Image files go through the disk cache when `use_cache` says so. Then, unless `recipe.cache` is False, all images
    (files or arrays) are cropped and resized once up front and kept in memory (`PresizedArrays`) when they fit in
    `MEMORY_BUDGET`; otherwise each item is made (or read from the disk cache) every epoch.

    Returns:
        `(get_x, item_tfms, kind)`, kind one of "memory", "disk+memory", "disk" or None. With "memory" in it, get_x
        returns uint8 tensors, not PIL images, and `PresizedDL` serves whole batches.
    """
    frames = [df for df in frames if df is not None]
    disk = use_cache(recipe, items)
    if disk:
        getter, tfms = CachedImageGetter(getter, tfms, cache_settings(recipe)), []
    n = sum(len(df) for df in frames)
    if recipe.cache is not False and n * recipe.size ** 2 * 3 <= MEMORY_BUDGET:
        return PresizedArrays(getter, tfms, frames), [], "disk+memory" if disk else "memory"
    return getter, tfms, "disk" if disk else None


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
    get = CachedImageGetter(ImageGetter(), item_tfms(recipe), cache_settings(recipe), root)
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
    disk = sum(p.stat().st_size for p in get.folder.rglob("*.npy"))
    return CacheStats(hits, len(rows) - hits, get.folder, disk, recipe.size)
