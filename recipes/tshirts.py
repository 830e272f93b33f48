"""T-shirt print / pattern classes from photos of a person wearing the shirt; accuracy.

Layout: `train.csv` (`image`, `class`), the photos in `images/`, and `test.csv` (`image`) for the unlabeled test
photos (also in `images/`). The seed trims the original photo before resizing: 400 px off the top (the face),
100 off the bottom, 50 off each side; `--trim` takes the same margins in pixels or as fractions of the original, and
`--crop center` takes the central square instead (`--crop none`: the whole photo, squished).
"""

from fastcls.recipe import Recipe

recipe = Recipe(
    name="tshirts",
    description="T-shirt print/pattern classes: CSV + image folder, trim crop of the original photo, accuracy",
    layout="csv",
    file_col="image",
    label_col="class",
    test_csv="test.csv",
    test_dir=None,  # test images are in image_dir too
    size=320,
    crop="trim",
    trim=(400, 100, 50, 50),  # top, bottom, left, right in pixels of the original
    archs=("densenet121", "densenet201", "wide_resnet50_2", "resnext50_32x4d", "inception_v4", "inception_resnet_v2"),
    epochs=5,
    lr=1e-3,
    ps=0.25,
    ps_grid=(0.1, 0.2, 0.25, 0.4, 0.6),
    bs=16,
    sub_id_col="image",
    sub_label_col="class",
    sub_id="id",
)
