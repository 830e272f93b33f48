"""Data: layout readers (items), the data check, splits and folds, image decoding and crops, the pre-resized
image cache, fastai DataLoaders.

Modules import one way: items <- images <- (check, cache) <- loaders; split stands alone below loaders.
"""

from .cache import cache_home
from .check import DataReport, check_data, check_images, scan_images
from .images import (CenterSquare, ImageGetter, TrimCrop, infer_size, item_tfms, load_image,
                     resolve_recipe, to_rgb)
from .items import (IMAGE_EXTS, LAYOUTS, Items, item_notes, item_problems, layout, read_folder_auto, read_items,
                    read_layout, resolve_data_path)
from .loaders import NormalizeInplace, batch_tfms, dataset_stats, default_workers, dls, test_dl
from .split import assign_folds, assign_split, sample_items

__all__ = ["CenterSquare", "DataReport", "IMAGE_EXTS", "ImageGetter", "Items", "LAYOUTS", "NormalizeInplace",
           "TrimCrop", "assign_folds", "assign_split", "batch_tfms", "cache_home", "check_data", "check_images",
           "dataset_stats", "default_workers", "dls", "infer_size", "item_notes", "item_problems",
           "item_tfms", "layout", "load_image", "read_folder_auto", "read_items", "read_layout",
           "resolve_data_path", "resolve_recipe", "sample_items", "scan_images", "test_dl", "to_rgb"]
