"""Images: decoding (`load_image`, `to_rgb`, from `fastcls.imageio`), crops on the original (`TrimCrop`,
`CenterSquare`), the row -> image getter, the item transforms, and the image settings a recipe leaves to the data or
the command line."""

__all__ = ["to_rgb", "load_image", "TrimCrop", "CenterSquare", "ImageGetter", "item_tfms", "infer_size",
           "resolve_recipe"]

from typing import Optional

import numpy as np
from fastai.vision.augment import Resize, ResizeMethod
from fastai.vision.core import PILImage
from fasttransform import Transform
from PIL import Image

from ..errors import FastclsError
from ..imageio import center_box, load_image, row_image, to_rgb, trim_box  # noqa: F401 (re-exported)
from ..recipe import Recipe
from .items import Items


class TrimCrop(Transform):
    """Cut a border off the original image before resizing: (top, bottom, left, right) in pixels or fractions."""

    order = 0  # before Resize (order 1): crops are defined on the original image

    def __init__(self, top=0, bottom=0, left=0, right=0):
        self.box = (top, bottom, left, right)

    def box_for(self, w: int, h: int) -> Optional[tuple]:
        """The (left, upper, right, lower) crop box on a w x h original, or None when the margins leave nothing."""
        return trim_box(self.box, w, h)

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
        return center_box(w, h)

    def encodes(self, img: PILImage):
        return img.crop(self.box_for(*img.size))


class ImageGetter:
    """Row of an `Items` table -> RGB PILImage, from a file or from row `x` of the in-memory array `src`."""

    def __init__(self, arrays: Optional[dict] = None, blank: frozenset = frozenset()):
        self.arrays, self.blank = arrays or {}, blank

    def __call__(self, row) -> PILImage:
        return PILImage(row_image(row["x"], self.arrays, row.get("src"), self.blank))


def item_tfms(recipe: Recipe) -> list:
    """Crop on the original image, then resize to the recipe's size (squish keeps the whole crop)."""
    tfms = []
    if recipe.crop == "trim":
        tfms.append(TrimCrop(*recipe.trim))
    elif recipe.crop == "center":
        tfms.append(CenterSquare())
    tfms.append(Resize(recipe.size, method=ResizeMethod.Squish))
    return tfms


# -- settings the recipe leaves to the data or the command line ------------------------------------------------------
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


