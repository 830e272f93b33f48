"""Your own data: one sub-folder per class, everything inferred.

Class sub-folders in `train/` (or at the data folder's root), an optional labelled `val/` (`valid/`, `validation/`)
used as the given split (else a stratified 20% split), and an optional unlabeled `test/` (`testset/`,
`test_images/`). Classes are the folder names; the image size is inferred from the images (median shorter side,
a multiple of 8 in [16, 224]; `--size` overrides it). Submission `id,label` with the test file's path in `test/`.

    fastcls check folder --data ~/my-photos
    fastcls train folder resnet18 --data ~/my-photos
"""

from fastcls.recipe import Recipe


def folder_items(path, recipe):
    """Class sub-folders in train/ or at the root, an optional labelled val/ (or valid/, validation/) with the same
    classes, and an optional unlabeled test/ (or testset/, test_images/): everything is inferred.

    See fastcls.data.read_folder_auto (imported here, not at the top: listing recipes must not import fastai).
    """
    from fastcls.data import read_folder_auto
    return read_folder_auto(path, recipe)

recipe = Recipe(
    name="folder",
    description="any folder-per-class data set (train/, optional val/ and test/); classes, size and split inferred",
    layout="custom",
    items=folder_items,
    split="auto",  # the data's own val/ folder when it has one, else stratified
    size=None,  # inferred from the images
    archs=("resnet18", "simple_cnn"),
    epochs=5,
    bs=32,
    sub_id="id",
)
