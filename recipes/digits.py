"""scikit-learn's bundled 8x8 handwritten digits, upscaled: the built-in default data, trains in about a minute."""

from fastcls.recipe import Recipe

recipe = Recipe(
    name="digits",
    description="sklearn's 8x8 digits (1500 train, 297 labelled test), upscaled; the built-in default data",
    layout="digits",
    data="builtin",
    size=32,
    flip=False,  # a mirrored 2 is not a 2
    max_lighting=0.0,
    archs=("resnet18", "simple_cnn"),
    pretrained=False,
    epochs=6,
    freeze_epochs=0,
    lr=3e-3,
    ps=0.25,
    ps_grid=(0.0, 0.1, 0.25, 0.5),
    tta=2,
    sub_id="id",
)
