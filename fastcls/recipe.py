"""Recipes: what a data set is and how to score it, as one frozen dataclass per competition.

A recipe file (`recipes/<name>.py`) defines a module-level `recipe = Recipe(...)`. Recipes are looked up in the
built-in folder shipped with fastcls, then `./recipes` of the current project, then any `--recipes DIR`; a later
folder wins on a name clash, so a user's own `recipes/tshirts.py` replaces the built-in one.
"""

__all__ = ["Recipe", "RecipeEntry", "builtin_recipe_dir", "crop_overrides", "find_recipes", "get_recipe", "load_recipe_file",
           "parse_trim", "AUG_PRESETS", "aug_overrides", "parse_sets", "TTA_VIEW_NAMES", "parse_sizes",
           "size_overrides", "each_size"]

import dataclasses
import importlib.util
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional

from .budget import parse_bytes
from .errors import FastclsError, suggest

Layout = Literal["folder", "csv", "npz", "digits", "custom"]
Crop = Literal["none", "center", "trim"]
# deterministic TTA views by name (fastcls.predict.named_views): how many views each stores
TTA_VIEW_NAMES = {"flip": 1, "crop5": 5, "scale": 2}


@dataclass(frozen=True)
class Recipe:
    """One competition: data layout, split, image pipeline, metric, defaults for training, submission format.

    Override any field for one run with `recipe.override(size=128, ps=0.2)`; unknown keys and wrong types are
    refused with a message that names the field and the expected type.
    """

    name: str
    description: str = ""
    # -- where the data is and how it is laid out (see fastcls.data.LAYOUTS)
    layout: Layout = "folder"
    data: Optional[str] = None  # default data path; None: --data is required; "builtin": ships with the library
    train_dir: str = "train"  # folder: holds one sub-folder per class ("" = the data root itself)
    test_dir: Optional[str] = "test"  # folder / csv: unlabeled test images (None: no test set)
    csv: str = "train.csv"  # csv: table of (file, label)
    test_csv: Optional[str] = None  # csv: table of test files (None: every image in test_dir)
    image_dir: str = "images"  # csv: folder the file column is relative to
    file_col: str = "file"
    label_col: str = "label"
    test_file_col: Optional[str] = None  # csv: file column of test_csv (default: file_col)
    file_suffix: str = ""  # csv: appended to file names that carry no extension
    npz_train: str = "train.npz"
    npz_test: Optional[str] = "test.npz"
    items: Optional[Callable] = None  # custom: fn(path: Path, recipe) -> fastcls.data.Items (its docstring: the layout)
    valid_dir: Optional[str] = None  # folder: labelled valid folder (class sub-folders); csv: valid_csv's image folder
    valid_csv: Optional[str] = None  # csv: table of validation (file, label) rows, i.e. a given split
    classes: Optional[tuple] = None  # the class order (vocab, submission indices); labels outside it are refused
    test_solution: Optional[str] = None  # file with true test labels, for scoring only (never used to train)
    # -- validation split
    split: Literal["stratified", "random", "group", "given", "auto"] = "stratified"  # auto: given if the data has one
    valid_pct: float = 0.2
    group_col: Optional[str] = None
    # -- images
    size: Optional[int] = 224  # None: inferred from the images (fastcls.data.resolve_recipe)
    # progressive resizing (fastcls.train.resize): smaller sizes trained at before `size`, the run's epochs split
    # evenly between (*progressive_sizes, size); validation, TTA and the stored predictions are at `size`
    progressive_sizes: tuple = ()
    crop: Crop = "none"
    trim: tuple = (0, 0, 0, 0)  # top, bottom, left, right: pixels (int) or fractions of the original (float < 1)
    aug: bool = True
    flip: bool = True
    max_rotate: float = 10.0
    max_zoom: float = 1.1
    max_lighting: float = 0.2
    color_jitter: float = 0.0  # saturation and hue jitter (brightness/contrast come from max_lighting)
    # model: the pretrained body's own mean/std (its timm pretrained_cfg), ImageNet's when training from scratch;
    # imagenet: ImageNet's always; dataset: the train split's own (refused with a pretrained body); none: no normalising
    normalize: Literal["model", "imagenet", "dataset", "none"] = "model"
    cache: Optional[bool] = None  # pre-resized image cache (fastcls.cache); None: on for image files > 2x the size
    # disk budget of the image cache, e.g. "20G": raw arrays when they fit, else lossless PNG (None: the free space)
    cache_budget: Optional[str] = None
    # -- model and schedule
    metric: str = "accuracy"
    extra_metrics: tuple = ()  # also scored (valid and test) and stored, e.g. ("macro_f1",)
    monitor: Optional[str] = None  # picks the best epoch, early stops, tunes post-hoc tau (None: metric)
    archs: tuple = ("resnet18",)
    pretrained: bool = True
    allow_pretrained: bool = True  # False: from scratch only (e.g. the competition forbade pretrained weights)
    epochs: int = 3
    freeze_epochs: int = 1
    lr: float = 2e-3
    ps: float = 0.5
    drop_path: float = 0.0  # stochastic depth (timm's drop_path_rate) for archs that have it; others ignore it
    ps_grid: tuple = (0.1, 0.2, 0.4, 0.6)
    # layer-wise LR decay for the unfrozen stage (timm style): one group per body stage, each `layer_decay` times the
    # next one's lr; None: fastai's discriminative LRs, slice(lr / 100, lr) over the arch's groups
    layer_decay: Optional[float] = None
    # the body's batch-norm statistics: 'keep' them as loaded, in training (BatchNorm layers of the body in eval mode;
    # their weights still train) and on the fast path (fastai 0.7's precompute); 'reestimate' lets them follow the
    # training batches (plain fastai) and re-estimates them on the fast path; 'auto': keep for a pretrained body
    bn_stats: Literal["auto", "keep", "reestimate"] = "auto"
    bs: int = 64
    wd: Optional[float] = None
    label_smoothing: float = 0.0
    imbalance: str = "none"  # fastcls.imbalance strategies, comma-combined: "none", "focal,oversample,logit-adjust"
    drw_start: float = 0.8  # imbalance 'drw': the class weights switch on after this fraction of the last stage
    tune_thresholds: bool = False  # per-class offsets fitted on valid for macro-F1, applied to the stored predictions
    calibrate: bool = False  # temperature scaling fitted on valid (log likelihood), applied to the stored predictions
    patience: Optional[int] = None  # early stopping on the monitored metric (None: off)
    tta: int = 4  # augmented views stored next to the plain prediction
    # deterministic TTA views by name, stored after the plain view and before the `tta` random ones: 'flip' (the
    # mirror image), 'crop5' (4 corners + centre, 87.5% of the side, resized back), 'scale' (zoomed in x1.25, out x0.8)
    tta_views: tuple = ()
    # TTA blend (weight of the plain view, fastai's `beta`) of the run's `_tta` scores, `submit` and `predict`; None:
    # the best of 0, 0.25, 0.5, 0.75, 1 on valid (ties: the nearest to fastai's 0.25), recorded as `tta_beta`
    tta_blend: Optional[float] = None
    # -- submission
    sub_id_col: str = "id"
    sub_label_col: str = "label"
    sub_id: Literal["stem", "name", "id"] = "stem"  # how a test item's id is written: file stem, file name, item id
    sub_template: Optional[str] = None  # a CSV whose row order and columns the submission must follow
    sub_label: Literal["name", "index"] = "name"  # write the class name, or its index in `classes` (else the vocab)
    # -- the split's own seed: the validation split, the folds and --sample's subset depend on it, never on the run's
    # --seed (init, augmentation, batch order), so runs differing only in --seed share validation items
    split_seed: int = 42
    # what a row predicts: 'label' (argmax), 'topk' (the `sub_k` most probable, space-separated: MAP@k competitions),
    # 'probs' (one probability column per class, named like the class: log-loss competitions), 'binary' (the
    # probability of the second class, in `classes` order else the vocab's: AUC competitions)
    sub_format: Literal["label", "topk", "probs", "binary"] = "label"
    sub_k: int = 3
    # -- mixing (fastcls.train.mixing: fastai's MixUp / CutMix with Beta(alpha, alpha); 0 = off, one at a time),
    # stopped for the last `mix_off_epoch` epochs of the last stage
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_off_epoch: int = 0
    # -- an exponential moving average of the weights during the last (unfrozen) stage (fastcls.train.ema; None: off)
    ema: Optional[float] = None
    # -- optimizer and lr schedule (fastcls.train.schedules): 'adamw' is fastai's default Adam (decoupled weight
    # decay), 'adam' its L2 variant; momentum: Adam's beta1 / SGD's momentum (None: the optimizer's default)
    opt: Literal["adam", "adamw", "sgd", "lamb", "ranger"] = "adamw"
    momentum: Optional[float] = None
    nesterov: bool = False  # SGD only
    sched: Literal["one-cycle", "cosine", "flat-cos", "step", "exp", "plateau"] = "one-cycle"
    warmup: float = 0.0  # epochs of linear warm-up at the start of each stage (one-cycle: its rising part)
    lr_gamma: Optional[float] = None  # step / plateau: lr factor (default 0.1); exp: per epoch (default 0.95)
    lr_step: int = 10  # step: epochs between two lr cuts
    lr_patience: int = 2  # plateau: epochs without improvement of the monitored metric before a cut
    # gradient accumulation: `bs` is the micro-batch (what memory holds), one optimizer step per `accum` micro-batches,
    # so the effective batch is bs * accum (fastcls.train.schedules.Accumulate)
    accum: int = 1

    def __post_init__(self):
        checks = [("size", self.size is None or self.size > 0, "a positive number of pixels (or None: inferred)"),
                  ("ps", 0 <= self.ps < 1, "in [0, 1)"), ("drop_path", 0 <= self.drop_path < 1, "in [0, 1)"),
                  ("valid_pct", 0 < self.valid_pct < 1, "in (0, 1)"), ("epochs", self.epochs >= 0, ">= 0"),
                  ("freeze_epochs", self.freeze_epochs >= 0, ">= 0"), ("lr", self.lr > 0, "> 0"),
                  ("bs", self.bs > 0, "> 0"), ("tta", self.tta >= 0, ">= 0"),
                  ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
                  ("ps_grid", all(0 <= p < 1 for p in self.ps_grid), "values in [0, 1)"),
                  ("patience", self.patience is None or self.patience > 0, "> 0 (or None)"),
                  ("layer_decay", self.layer_decay is None or 0 < self.layer_decay <= 1, "in (0, 1] (or None)"),
                  ("trim", len(self.trim) == 4 and all(v >= 0 for v in self.trim),
                   "4 margins >= 0 (top, bottom, left, right)"),
                  ("color_jitter", 0 <= self.color_jitter < 1, "in [0, 1)"), ("sub_k", self.sub_k >= 1, ">= 1"),
                  ("classes", self.classes is None or len(set(map(str, self.classes))) == len(self.classes) >= 2,
                   "at least 2 distinct class names (or None: inferred from the data)"),
                  ("split_seed", self.split_seed >= 0, ">= 0"),
                  ("mixup", self.mixup >= 0, ">= 0 (0: off)"), ("cutmix", self.cutmix >= 0, ">= 0 (0: off)"),
                  ("mix_off_epoch", self.mix_off_epoch >= 0, ">= 0"),
                  ("ema", self.ema is None or 0 < self.ema < 1, "a decay in (0, 1), e.g. 0.999 (or None: off)"),
                  ("momentum", self.momentum is None or 0 <= self.momentum < 1, "in [0, 1) (or None)"),
                  ("warmup", self.warmup >= 0, ">= 0 epochs"), ("lr_step", self.lr_step >= 1, ">= 1 epoch"),
                  ("lr_gamma", self.lr_gamma is None or 0 < self.lr_gamma <= 1, "in (0, 1] (or None)"),
                  ("lr_patience", self.lr_patience >= 1, ">= 1 epoch"),
                  ("cache_budget", self.cache_budget is None or _is_size(self.cache_budget),
                   "a size such as '20G' or '500M' (or None: the free disk space)"),
                  ("progressive_sizes", all(isinstance(v, int) and v > 0 for v in self.progressive_sizes),
                   "positive numbers of pixels, e.g. 128,160 (the final one is `size`)"),
                  ("drw_start", 0 <= self.drw_start < 1, "in [0, 1)"),
                  ("accum", self.accum >= 1, ">= 1 micro-batch per step"),
                  ("tta_blend", self.tta_blend is None or 0 <= self.tta_blend <= 1,
                   "in [0, 1], the weight of the plain view (or None: chosen on valid)"),
                  ("tta_views", all(v in TTA_VIEW_NAMES for v in self.tta_views) and
                   len(set(self.tta_views)) == len(self.tta_views),
                   f"distinct names among {', '.join(TTA_VIEW_NAMES)} (e.g. flip,crop5)")]
        for key, ok, want in checks:
            if not ok:
                raise FastclsError(f"Recipe {self.name!r}: setting {key!r} must be {want}, got {getattr(self, key)!r}.")
        if self.pretrained and not self.allow_pretrained:
            raise FastclsError(f"Recipe {self.name!r} trains from scratch only (allow_pretrained=False: its rules "
                               "forbid pretrained weights), so --pretrained cannot be used. Drop --pretrained.")

    def override(self, **changes) -> "Recipe":
        """A copy with `changes` applied, each checked against the field's declared type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        hints = typing.get_type_hints(type(self))
        clean = {}
        for key, value in changes.items():
            if key not in fields:
                raise FastclsError(f"Recipe {self.name!r} has no setting {key!r}.{suggest(key, fields)} "
                                   f"Settings: {', '.join(sorted(fields))}.")
            clean[key] = _coerce(self.name, key, value, hints[key])
        return dataclasses.replace(self, **clean)

    def to_dict(self) -> dict:
        """The recipe's settings as plain JSON-able values (functions by their qualified name)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = f"{v.__module__}.{v.__qualname__}" if callable(v) else (list(v) if isinstance(v, tuple) else v)
        return out

    def id_dict(self) -> dict:
        """`to_dict()` for hashing into ids (cv folds, sweeps): less the settings added after ids were first made,
        while they hold their default (which changes nothing), so a cv or sweep started before still finds its
        runs."""
        return {k: v for k, v in self.to_dict().items() if not (k in _LATER_DEFAULTS and v == _LATER_DEFAULTS[k])}


def _is_size(text) -> bool:
    try:
        parse_bytes(text)
    except FastclsError:
        return False
    return True


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(recipe: str, key: str, value: Any, tp) -> Any:
    """`value` checked (and widened where harmless: int -> float, list -> tuple) against the annotation `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(recipe, key, value, a)
            except FastclsError:
                pass
    elif origin is Literal:
        if value in args:
            return value
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    elif tp is Callable or origin is typing.Callable or str(tp).startswith("typing.Callable"):
        if callable(value):
            return value
    elif isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise FastclsError(f"Recipe {recipe!r}: setting {key!r} must be {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__}).")


@dataclass(frozen=True)
class RecipeEntry:
    """A recipe with the file it came from and whether it is built in or the user's own."""

    recipe: Recipe
    path: Path
    origin: str  # "built-in" or "user"
    shadows: Optional[Path] = None  # the built-in file this user recipe replaces


def builtin_recipe_dir() -> Path:
    """The recipes shipped with fastcls: `fastcls/_recipes` in an installed wheel, the checkout's `recipes/` otherwise."""
    here = Path(__file__).resolve().parent
    for folder in (here / "_recipes", here.parent / "recipes"):
        if folder.is_dir():
            return folder
    spec = importlib.util.find_spec("fastcls._recipes")  # an editable install maps the package elsewhere
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    raise FastclsError(f"The built-in recipes are missing from this fastcls installation ({here}). Reinstall fastcls.")


def load_recipe_file(path) -> Recipe:
    """Execute one recipe file and return its module-level `recipe`."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"fastcls_recipe_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except FastclsError:
        raise
    except Exception as e:
        raise FastclsError(f"Recipe file {path} failed to load: {type(e).__name__}: {e}") from None
    recipe = getattr(mod, "recipe", None)
    if not isinstance(recipe, Recipe):
        raise FastclsError(f"Recipe file {path} defines no `recipe = Recipe(...)`.")
    return recipe


def _recipe_dirs(extra_dirs=()) -> list[tuple[Path, str]]:
    dirs = [(builtin_recipe_dir(), "built-in"), (Path.cwd() / "recipes", "user")]
    dirs += [(Path(d), "user") for d in extra_dirs]
    env = os.environ.get("FASTCLS_RECIPES")
    if env:
        dirs += [(Path(d), "user") for d in env.split(os.pathsep) if d]
    return dirs


def find_recipes(extra_dirs=()) -> dict[str, RecipeEntry]:
    """All recipes by name; a user folder later in the search order replaces a built-in recipe of the same name."""
    found: dict[str, RecipeEntry] = {}
    seen = set()
    for folder, origin in _recipe_dirs(extra_dirs):
        if not folder.is_dir() or folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        for f in sorted(folder.glob("*.py")):
            if f.name.startswith("_"):
                continue
            recipe = load_recipe_file(f)
            old = found.get(recipe.name)
            found[recipe.name] = RecipeEntry(recipe, f, origin, old.path if old else None)
    return found


def get_recipe(name: str, extra_dirs=()) -> Recipe:
    """The recipe called `name`, or a clear error with close names."""
    recipes = find_recipes(extra_dirs)
    if name not in recipes:
        raise FastclsError(f"Unknown recipe {name!r}.{suggest(name, recipes)} Available: {', '.join(sorted(recipes))}. "
                           "List them with `fastcls recipes`.")
    return recipes[name].recipe


def parse_trim(text: str) -> tuple:
    """'400,100,50,50' (pixels) or '0.2,0.05,0.05,0.05' (fractions of the original) -> (top, bottom, left, right)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        vals = tuple(int(p) if p.lstrip("+").isdigit() else float(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 4 or any(v < 0 for v in vals):
        raise FastclsError(f"--trim takes 4 margins >= 0 as top,bottom,left,right in pixels (e.g. 400,100,50,50) or as "
                           f"fractions of the original image (e.g. 0.2,0.05,0.05,0.05); got {text!r}.")
    return vals


def parse_sizes(text) -> tuple:
    """'224' -> (224,); '128,224' (progressive resizing: the last is the final size) -> (128, 224); an int or a
    sequence of ints passes through as a tuple."""
    parts = [text] if isinstance(text, int) else list(text) if isinstance(text, (list, tuple)) else str(text).split(",")
    try:
        vals = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        vals = ()
    if not vals:  # sizes <= 0 are refused with the other recipe values (Recipe's checks name the field)
        raise FastclsError(f"--size takes an image size in pixels (224), or several comma-separated for progressive "
                           f"resizing, the final one last (128,224); got {text!r}.")
    return vals


def size_overrides(size) -> dict:
    """`--size` as given -> the recipe overrides: None -> {} (the recipe's); an int -> {'size': 224}; '128,224' or a
    sequence -> {'size': 224, 'progressive_sizes': (128,)} (progressive resizing: the last is the final size)."""
    if size is None or isinstance(size, int):
        return {} if size is None else {"size": size}
    *smaller, final = parse_sizes(size)
    return {"size": final, "progressive_sizes": tuple(smaller)}


def each_size(recipe: Recipe) -> list:
    """One recipe per distinct image size a run of `recipe` trains at (its `progressive_sizes`, then `size`), each
    at that single size: what `fastcls cache` and `fastcls show-batch` do once per size."""
    sizes = dict.fromkeys((*recipe.progressive_sizes, recipe.size))
    return [recipe.override(size=s, progressive_sizes=()) for s in sizes] if recipe.progressive_sizes else [recipe]


def crop_overrides(crop: Optional[str] = None, trim: Optional[str] = None) -> dict:
    """The recipe overrides for the `--crop` and `--trim` options: `--trim` alone implies `--crop trim`.

    Args:
        crop: 'none', 'center' or 'trim' (checked by `Recipe.override`), or None to keep the recipe's crop.
        trim: margins as `parse_trim` reads them, or None to keep the recipe's margins.

    Returns:
        Only the keys to change (`crop`, `trim`), for `Recipe.override(**...)`; {} when neither option is given.

    Raises:
        FastclsError: `trim` is not 4 margins >= 0.
    """
    out = {}
    if crop or trim:
        out["crop"] = crop or "trim"
    if trim:
        out["trim"] = parse_trim(trim)
    return out


_LATER_DEFAULTS = {"tta_blend": None}  # see Recipe.id_dict

# --aug presets: the augmentation settings each name sets (`default` keeps the recipe's own)
AUG_PRESETS = {
    "none": dict(aug=False),
    "light": dict(aug=True, max_rotate=5.0, max_zoom=1.05, max_lighting=0.1, color_jitter=0.0),
    "default": {},
    "strong": dict(aug=True, max_rotate=20.0, max_zoom=1.3, max_lighting=0.4, color_jitter=0.2),
}


def aug_overrides(aug: Optional[str]) -> dict:
    """The recipe overrides of `--aug NAME` (see `AUG_PRESETS`); {} for None or 'default' (the recipe's own)."""
    if aug is None:
        return {}
    if aug not in AUG_PRESETS:
        raise FastclsError(f"--aug must be one of {', '.join(AUG_PRESETS)}, got {aug!r}.{suggest(aug, AUG_PRESETS)}")
    return dict(AUG_PRESETS[aug])


_NONE_WORDS, _TRUE_WORDS, _FALSE_WORDS = ("none", "null"), ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _parse_text(text: str, tp):
    """`text` (as typed after `--set field=`) read as the annotation `tp`; ValueError when it cannot be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in _NONE_WORDS and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _parse_text(text, a)
            except ValueError:
                pass
        raise ValueError(text)
    if origin is Literal:
        for a in args:
            if str(a) == text.strip():
                return a
        raise ValueError(text)
    if tp is bool:
        word = text.strip().lower()
        if word in _TRUE_WORDS + _FALSE_WORDS:
            return word in _TRUE_WORDS
        raise ValueError(text)
    if tp in (int, float):
        return tp(text)
    if tp is str:
        return text
    if tp is tuple:
        if text.strip().lower() in _NONE_WORDS:  # e.g. --tta-views none: a recipe's default list switched off
            return ()
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return tuple(_scalar(p) for p in parts)
    raise ValueError(text)  # functions (a custom items reader) come from a recipe file only


def _scalar(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_sets(recipe: Recipe, sets) -> dict:
    """`--set field=value` options (repeatable) as recipe overrides, each value read as its field's type.

    Args:
        recipe: the recipe whose fields the names must be.
        sets: strings 'field=value'; tuples are comma-separated (`archs=resnet18,resnet34`), None is `none`.

    Returns:
        {field: value}; `Recipe.override` then checks them like any override.

    Raises:
        FastclsError: no '=', an unknown field (with close names), a value that is not of the field's type, the same
            field twice with different values.
    """
    fields = {f.name: f for f in dataclasses.fields(recipe)}
    hints = typing.get_type_hints(type(recipe))
    out = {}
    for item in sets or ():
        key, sep, text = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise FastclsError(f"--set takes field=value (e.g. --set wd=0.05), got {item!r}.")
        if key not in fields or key == "name":
            raise FastclsError(f"--set {item}: recipe {recipe.name!r} has no setting {key!r}.{suggest(key, fields)} "
                               f"Settings: {', '.join(sorted(set(fields) - {'name'}))}.")
        try:
            value = _parse_text(text, hints[key])
        except ValueError:
            raise FastclsError(f"--set {item}: setting {key!r} must be {_type_name(hints[key])}, got {text!r}.") \
                from None
        if key in out and out[key] != value:
            raise FastclsError(f"--set gives {key!r} twice ({out[key]!r} and {value!r}); give it once.")
        out[key] = value
    return out
