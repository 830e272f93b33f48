"""Data: layout readers (items), the data check, splits and folds, image decoding and crops, the pre-resized
image cache, fastai DataLoaders."""

from .loaders import (CenterSquare, DataReport, IMAGE_EXTS, ImageGetter, Items, LAYOUTS, NormalizeInplace, TrimCrop,
                      assign_folds, assign_split, batch_tfms, cache_home, check_data, check_images, default_workers,
                      dls, infer_size, item_notes, item_problems, item_tfms, layout, load_image, parse_trim,
                      read_folder_auto, read_items, resolve_recipe, sample_items, scan_images, test_dl, to_rgb)

__all__ = ["CenterSquare", "DataReport", "IMAGE_EXTS", "ImageGetter", "Items", "LAYOUTS", "NormalizeInplace",
           "TrimCrop", "assign_folds", "assign_split", "batch_tfms", "cache_home", "check_data", "check_images",
           "default_workers", "dls", "infer_size", "item_notes", "item_problems", "item_tfms", "layout",
           "load_image", "parse_trim", "read_folder_auto", "read_items", "resolve_recipe", "sample_items",
           "scan_images", "test_dl", "to_rgb"]
