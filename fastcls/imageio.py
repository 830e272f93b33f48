"""Images without fastai: decoding (`load_image`, `to_rgb`), the crop boxes on the original image, the image of an
item row, and a run's item pipeline as numpy (`preprocess`).

`fastcls.data.images` wraps these in fastai transforms for training; the ONNX predictor (`fastcls.onnx_runtime`)
uses them directly, so both see the same pixels.
"""

__all__ = ["to_rgb", "load_image", "trim_box", "center_box", "row_image", "preprocess", "normalise", "batches"]

from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from .errors import FastclsError


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
    with Image.open(path) as img:  # over twice the limit: PIL raises DecompressionBombError itself
        # Between the limit and twice it PIL only warns. The check is ours, not a warnings filter: filters are global
        # to the process, and `scan_images` decodes in threads, where one thread's catch_warnings undoes another's.
        w, h = img.size
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"Image size ({w * h} pixels) exceeds limit of "
                                               f"{Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack.")
        if draft is not None:
            img.draft("RGB", draft)
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))


def trim_box(margins, w: int, h: int) -> Optional[tuple]:
    """The (left, upper, right, lower) box left by cutting (top, bottom, left, right) margins (pixels, or fractions
    below 1) off a w x h original; None when the margins leave nothing."""
    t, b, l, r = (v * (h if i < 2 else w) if isinstance(v, float) and v < 1 else v for i, v in enumerate(margins))
    box = (int(l), int(t), int(w - r), int(h - b))
    return None if box[2] <= box[0] or box[3] <= box[1] else box


def center_box(w: int, h: int) -> tuple:
    """The (left, upper, right, lower) box of the central square of a w x h original (side: its shorter side)."""
    s = min(w, h)
    l, t = (w - s) // 2, (h - s) // 2
    return l, t, l + s, t + s


def row_image(x, arrays: Optional[dict] = None, src=None, blank: frozenset = frozenset()) -> Image.Image:
    """The RGB image of an item: row `x` of array `arrays[src]`, a blank grey image for an unreadable file listed in
    `blank`, else the file `x`."""
    if arrays:
        return Image.fromarray(np.asarray(arrays[src][int(x)])).convert("RGB")
    if x in blank:
        return Image.new("RGB", (32, 32), (128, 128, 128))
    return load_image(x)


def preprocess(img: Image.Image, size: int, crop: str = "none", trim=(0, 0, 0, 0)) -> np.ndarray:
    """A run's item transforms as numpy: crop on the original, squish-resize (bilinear) to size x size. Returns
    (3, size, size) uint8, the same pixels as `fastcls.data.item_tfms` gives."""
    if crop == "trim":
        box = trim_box(trim, *img.size)
        if box is None:
            raise FastclsError(f"Trim crop {tuple(trim)} leaves nothing of a {img.size[0]}x{img.size[1]} image; use "
                               "smaller margins or --crop none.")
        img = img.crop(box)
    elif crop == "center":
        img = img.crop(center_box(*img.size))
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)


def normalise(x: np.ndarray, stats=None) -> np.ndarray:
    """uint8 images (..., 3, H, W) -> 0..1 float32 normalised by `stats` (mean, std; None: not normalised), the same
    float32 operations as fastai's IntToFloatTensor and `NormalizeInplace` (on the CPU fastai also warps a valid batch
    by the identity when the run has affine augmentations, which moves values by ~1e-7)."""
    x = x.astype(np.float32) / np.float32(255)
    if stats is not None:
        mean, std = (np.asarray(s, dtype=np.float32).reshape(3, 1, 1) for s in stats)
        x = (x - mean) / std
    return x


def batches(n: int, image, bs: int, size: int, crop: str = "none", trim=(0, 0, 0, 0)):
    """The `n` images (`image(i)` -> RGB PIL image) through `preprocess`, as (B, 3, size, size) uint8 batches of up to
    `bs` images, in order."""
    for lo in range(0, n, bs):
        yield np.stack([preprocess(image(i), size, crop, trim) for i in range(lo, min(n, lo + bs))])
