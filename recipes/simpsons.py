"""Kaggle "journey to springfield": Simpsons characters, one folder per character, macro-F1.

Layout: `train/simpsons_dataset/<character>/*.jpg`, unlabeled `testset/testset/*.jpg`, `sample_submission.csv`
(`Id,Expected`, e.g. `img0.jpg,bart_simpson`). The seed's schedule: 3 frozen epochs on the head, then unfrozen
training with early stopping on macro-F1 (patience 5); augmentation on.
"""

from fastcls.recipe import Recipe

recipe = Recipe(
    name="simpsons",
    description="Simpsons characters (Kaggle journey-to-springfield layout), macro-F1; submission Id,Expected",
    train_dir="train/simpsons_dataset",
    test_dir="testset/testset",
    test_solution="test_solution.csv",  # the true test labels where known (scoring only), in the submission's format
    metric="macro_f1",
    archs=("resnet18", "efficientnet_b2"),
    freeze_epochs=3,
    epochs=30,  # an upper bound: early stopping ends the unfrozen stage
    patience=5,
    bs=32,
    sub_id_col="Id",
    sub_label_col="Expected",
    sub_id="name",
    sub_template="sample_submission.csv",
)
