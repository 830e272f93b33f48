"""Face-mask status x gender x age band (18 classes), one folder per person; macro-F1, split by person.

Layout: `train/train.csv` (`id`, `gender`, `race`, `age`, `path`) and one folder per person
`train/images/<id>_<gender>_<race>_<age>/` holding `mask1`..`mask5`, `incorrect_mask` and `normal` (any image
extension); test: `eval/info.csv` (`ImageID`, `ans`) with the images in `eval/images/`. The submission is
`eval/info.csv` with `ans` filled with the class index, in the seed's order: mask (wear, incorrect, not worn) x
gender (male, female) x age (<30, 30-59, >=60), i.e. index = 6 * mask + 3 * gender + age. The validation split keeps
each person's 7 images together (grouped by `id`) and is stratified by class.
"""

from pathlib import Path

from fastcls.errors import FastclsError
from fastcls.recipe import Recipe

MASK = (("wear", ("mask1", "mask2", "mask3", "mask4", "mask5")), ("incorrect", ("incorrect_mask",)),
        ("not_wear", ("normal",)))
GENDER = ("male", "female")
AGE = ("0-29", "30-59", "60+")
CLASSES = tuple(f"{m}_{g}_{a}" for m, _ in MASK for g in GENDER for a in AGE)  # the seed's class index order


def age_band(age: int) -> str:
    return AGE[0] if age < 30 else AGE[1] if age < 60 else AGE[2]


def read_masks(path: Path, recipe: Recipe) -> "Items":  # noqa: F821 (fastcls.data.Items)
    """train/train.csv (id, gender, race, age, path) with per-person folders train/images/<path>/ holding mask1..mask5,
    incorrect_mask and normal (any image extension); test images listed in eval/info.csv (ImageID, ans) in
    eval/images/.

    Items: id `<path>/<image file>`, label from the file name and the person's gender and age, group = person id.
    """
    import pandas as pd
    from fastcls.data import IMAGE_EXTS, Items  # imported here: listing recipes must not pay for importing fastai
    table = path / "train" / "train.csv"
    if not table.is_file():
        raise FastclsError(f"Data folder {path} does not match the masks layout: no file {table}. Expected "
                           "train/train.csv, train/images/<person folder>/, eval/info.csv and eval/images/.")
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    missing = [c for c in ("id", "gender", "age", "path") if c not in df]
    if missing:
        raise FastclsError(f"{table} has no column {', '.join(map(repr, missing))} (it has {', '.join(df.columns)}).")
    stem_mask = {stem: m for m, stems in MASK for stem in stems}
    rows = []
    for i, r in df.iterrows():
        where = f"{table}, row {i + 2}"
        gender = r["gender"].strip().lower()
        if gender not in GENDER:
            raise FastclsError(f"{where}: gender {r['gender']!r} is not one of {', '.join(GENDER)}.")
        try:
            age = int(float(r["age"]))
        except ValueError:
            raise FastclsError(f"{where}: age {r['age']!r} is not a number.") from None
        folder = path / "train" / "images" / r["path"]
        if not folder.is_dir():
            raise FastclsError(f"{where}: person folder {folder} does not exist.")
        found = {p.stem: p for p in sorted(folder.iterdir())
                 if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.stem in stem_mask}
        lacking = [s for s in stem_mask if s not in found]
        if lacking:
            raise FastclsError(f"{where}: person folder {folder} has no image {', '.join(lacking)} (any extension).")
        for stem, p in found.items():
            rows.append((f"{r['path']}/{p.name}", str(p), f"{stem_mask[stem]}_{gender}_{age_band(age)}", r["id"]))
    if not rows:
        raise FastclsError(f"{table} lists no person.")
    train = pd.DataFrame(rows, columns=["id", "x", "label", "group"])
    test = None
    info = path / "eval" / "info.csv"
    if info.is_file():
        tdf = pd.read_csv(info, dtype=str, keep_default_na=False)
        if "ImageID" not in tdf:
            raise FastclsError(f"{info} has no column 'ImageID' (it has {', '.join(tdf.columns)}).")
        test = pd.DataFrame({"id": tdf["ImageID"], "x": [str(path / "eval" / "images" / n) for n in tdf["ImageID"]]})
    return Items(train, test, root=path)


recipe = Recipe(
    name="masks",
    description="mask x gender x age band (18 classes), per-person folders, split by person, macro-F1; fills info.csv",
    layout="custom",
    items=read_masks,
    classes=CLASSES,
    split="group",  # no person in both train and valid; stratified by class
    size=300,
    crop="center",
    max_rotate=0.0,
    max_zoom=1.0,
    color_jitter=0.1,  # saturation / hue jitter
    metric="macro_f1",
    archs=("efficientnet_b3_fc", "resnet50"),
    epochs=5,
    lr=1e-3,
    ps=0.7,  # the seed's dropout before the classifier
    bs=32,
    tta=2,
    sub_id_col="ImageID",
    sub_label_col="ans",
    sub_label="index",
    sub_id="id",
    sub_template="eval/info.csv",
)
