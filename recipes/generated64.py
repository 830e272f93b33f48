"""64x64 generated RGB images, 100 classes, with the competition's own validation split; accuracy.

Layout: `train.csv` and `val.csv` (`Image`, `Class`), `test.csv` (`Image`), with the images in `train_images/`,
`val_images/` and `test_images/`. The given validation split is used as is; images are normalised with the data
set's own mean/std (computed on the training split, stored in the run's meta.json). Submission `Image,Class`.
"""

from fastcls.recipe import Recipe

recipe = Recipe(
    name="generated64",
    description="64x64 generated images, 100 classes, given train/val split, own normalisation; submission Image,Class",
    layout="csv",
    image_dir="train_images",
    valid_csv="val.csv",
    valid_dir="val_images",
    test_csv="test.csv",
    test_dir="test_images",
    file_col="Image",
    label_col="Class",
    split="given",
    size=64,
    max_lighting=0.1,
    normalize="dataset",
    archs=("seed_cnn64", "resnet18"),
    pretrained=False,  # the seed's CNN has no pretrained weights; it trains from scratch
    freeze_epochs=0,
    epochs=20,
    lr=3e-3,
    bs=128,
    tta=2,
    sub_id_col="Image",
    sub_label_col="Class",
    sub_id="id",
)
