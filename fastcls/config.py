"""RunConfig: everything that defines one run. Built from options, stored as a dict, read back: the only way."""

__all__ = ["RunConfig"]

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

from .errors import FastclsError
from .recipe import Recipe, aug_overrides, crop_overrides, get_recipe, parse_sets, size_overrides


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one run: the (overridden) recipe plus the run's own choices."""

    recipe: Recipe
    arch: str
    data: Optional[str] = None
    seed: int = 42
    weights: Optional[str] = None
    sample: Optional[int] = None
    name: Optional[str] = None
    on_bad_image: str = "fail"  # 'fail': refuse to train on unreadable images; 'skip': leave them out
    # -- hardware (fastcls.hardware): None = auto (on with a GPU, off on CPU); workers None = data.default_workers()
    amp: Optional[bool] = None
    channels_last: Optional[bool] = None
    compile: Union[bool, str] = False
    workers: Optional[int] = None
    # -- k-fold (fastcls.cv): validate on fold `fold` of `folds` (fastcls.data.assign_folds) instead of the split
    fold: Optional[int] = None
    folds: Optional[int] = None

    def __post_init__(self):
        if self.sample is not None and self.sample < 2:
            raise FastclsError(f"--sample must be at least 2, got {self.sample}.")
        if self.on_bad_image not in ("fail", "skip"):
            raise FastclsError(f"--on-bad-image must be 'fail' or 'skip', got {self.on_bad_image!r}.")
        if self.fold is not None and self.folds is None:
            raise FastclsError("--fold K needs --folds N (the number of folds K belongs to).")
        if self.weights and not self.recipe.allow_pretrained:
            raise FastclsError(f"Recipe {self.recipe.name!r} trains from scratch only (allow_pretrained=False: its "
                               f"rules forbid pretrained weights), so --weights {self.weights} cannot be used.")
        if self.recipe.normalize == "dataset" and self.pretrained_body:
            stats = self.norm_stats_of_model
            raise FastclsError(f"Recipe {self.recipe.name!r} normalises with the data set's own statistics, but "
                               f"{self.arch}'s body is pretrained: it expects the statistics it was trained with"
                               + (f" (mean {list(stats[0])}, std {list(stats[1])})" if stats else "") +
                               ". Normalise with the model's (--normalize model, or normalize='model' in the recipe) "
                               "or train from scratch (--no-pretrained).")

    @property
    def pretrained_body(self) -> bool:
        """Whether the body starts from pretrained weights (`--pretrained` on an arch that has them, or `--weights`)."""
        from .archs import get_arch
        return bool(self.weights) or (self.recipe.pretrained and get_arch(self.arch).timm_name is not None)

    @property
    def keep_bn_stats(self) -> bool:
        """Whether the body's batch-norm statistics stay as loaded (`Recipe.bn_stats`: 'keep'; 'auto' for a pretrained
        body), in training and on the sweeps' fast path, or follow the training data ('reestimate')."""
        return self.recipe.bn_stats == "keep" or (self.recipe.bn_stats == "auto" and self.pretrained_body)

    @property
    def norm_stats_of_model(self) -> Optional[tuple]:
        """The (mean, std) the arch's pretrained weights expect (its timm `pretrained_cfg`), or None."""
        from .archs import arch_stats
        return arch_stats(self.arch, True)

    @property
    def norm_stats(self) -> Optional[tuple]:
        """The (mean, std) the run's loaders normalise with, or None ('none'; 'dataset': the loader computes them).

        `normalize='model'` (the default) is the pretrained body's own statistics, ImageNet's from scratch;
        'imagenet' is ImageNet's always.
        """
        from fastai.vision.data import imagenet_stats
        n = self.recipe.normalize
        if n in ("none", "dataset"):
            return None
        if n == "model" and self.pretrained_body and self.norm_stats_of_model is not None:
            return tuple(list(map(float, v)) for v in self.norm_stats_of_model)
        return tuple(list(v) for v in imagenet_stats)

    def to_dict(self) -> dict:
        d = self.recipe.to_dict()
        d["recipe"] = d.pop("name")
        d.update(arch=self.arch, data=self.data, seed=self.seed, weights=self.weights, sample=self.sample,
                 run_name=self.name, on_bad_image=self.on_bad_image, amp=self.amp, channels_last=self.channels_last,
                 compile=self.compile, workers=self.workers, norm_stats=self.norm_stats)
        if self.folds:
            d.update(fold=self.fold, folds=self.folds)
        return d

    @classmethod
    def from_options(cls, recipe: str, arch: Optional[str] = None, *, recipes=(), data=None, seed: int = 42, weights=None,
                     sample: Optional[int] = None, name: Optional[str] = None, on_bad_image: str = "fail",
                     amp: Optional[bool] = None, channels_last: Optional[bool] = None, compile: Union[bool, str] = False,
                     workers: Optional[int] = None, fold: Optional[int] = None, folds: Optional[int] = None,
                     crop: Optional[str] = None, trim: Optional[str] = None, sets=None, aug: Optional[str] = None,
                     **overrides) -> "RunConfig":
        """A validated config from command-line style options: what `fastcls train` and the sweeps build.

        Args:
            recipe: a recipe name (see `fastcls.recipe.find_recipes`); `recipes` are extra recipe folders.
            arch: an architecture name (curated entry or any timm model); checked here. None: the recipe's first.
            size: an int, or several ((128, 224) or '128,224'): progressive resizing, the last the final size.
            crop, trim: `--crop` / `--trim` as typed (`--trim` alone implies the trim crop; see `crop_overrides`).
            sets: `--set field=value` strings, any recipe setting (`fastcls.recipe.parse_sets`); a named option
                given too must agree with it.
            aug: `--aug light|default|strong|none` (`fastcls.recipe.AUG_PRESETS`).
            overrides: recipe settings (`size`, `ps`, `epochs`, `imbalance`, ...); None means "the recipe's".
            The rest are the run's own settings (see the class).

        Returns:
            The `RunConfig`; every bad value is refused here, before any data is read.
        """
        from .archs import get_arch
        from .imbalance import parse_imbalance
        r = get_recipe(recipe, recipes or ())
        if isinstance(aug, bool):  # the Recipe field itself (aug on/off), not a preset name
            overrides, aug = {**overrides, "aug": aug}, None
        if isinstance(overrides.get("size"), (str, tuple, list)):  # --size 128,224: progressive resizing
            overrides = {**overrides, **size_overrides(overrides["size"])}
        named = {k: v for k, v in overrides.items() if v is not None}
        named.update(parse_sets(r, [f"{k}={v}" for k, v in named.items()  # e.g. tta_views="flip,crop5" as typed
                                    if isinstance(v, str) and isinstance(getattr(r, k, None), tuple)]))
        set_values = parse_sets(r, sets)
        for k in set(named) & set(set_values):
            if named[k] != set_values[k]:
                raise FastclsError(f"--set {k}={set_values[k]} disagrees with the named option giving {k}={named[k]!r}; "
                                   "give the setting once.")
        # a preset (--aug) < --set < the named options; the explicit settings win over the preset's
        r = r.override(**{**aug_overrides(aug), **set_values, **named}, **crop_overrides(crop, trim))
        arch = arch or r.archs[0]  # --set archs=... may have changed the first
        get_arch(arch)
        if overrides.get("imbalance") is not None or "imbalance" in set_values:
            r = r.override(imbalance=",".join(parse_imbalance(r.imbalance)))
        return cls(r, arch, str(data) if data else None, seed, str(weights) if weights else None, sample, name,
                   on_bad_image, amp=amp, channels_last=channels_last, compile=compile, workers=workers, fold=fold,
                   folds=folds)

    @classmethod
    def from_dict(cls, d: dict, recipes=(), lenient: bool = False) -> "RunConfig":
        """The config a stored run was trained with (its config.json): the one way a stored config is read back.

        Every stored recipe setting overrides the registered recipe of the config's name (a bare `Recipe` when that
        file is gone), so a run reads back as trained even after its recipe file changed.

        Args:
            d: the stored dict (`to_dict`).
            recipes: extra recipe folders, to find the run's recipe by name.
            lenient: for reading a stored run's settings only (reports, submissions): a recipe that is gone is
                rebuilt from the stored settings even when it had a custom items function (which only training
                needs); otherwise that is an error telling where to find the recipe (resuming, students).

        Returns:
            The `RunConfig`; `data` is the run's --data (None: the recipe's own folder).
        """
        d = dict(d)
        run = {k: d.pop(k, None) for k in ("arch", "data", "seed", "weights", "sample", "run_name", "on_bad_image",
                                           "amp", "channels_last", "compile", "workers", "fold", "folds")}
        name = d.pop("recipe")
        fields = {f.name for f in dataclasses.fields(Recipe)} - {"name"}
        values = {k: v for k, v in d.items() if k in fields}
        try:
            base = get_recipe(name, recipes)
        except FastclsError:  # a recipe file that is gone: rebuild it from the stored settings
            if values.get("items") and not lenient:
                raise FastclsError(f"Recipe {name!r} (with a custom items function) is not found; pass its folder "
                                   "with --recipes DIR.") from None
            base = Recipe(name=name)
        values.pop("items", None)  # stored by name only; the recipe file provides the function
        if "split_seed" not in values:  # stored before the split had its own seed: the run's seed split it
            values["split_seed"] = run["seed"] if run["seed"] is not None else 42
        recipe = base.override(**{k: v for k, v in values.items() if v != base.to_dict().get(k)})
        return cls(recipe, run["arch"], run["data"], run["seed"] if run["seed"] is not None else 42, run["weights"],
                   run["sample"], run["run_name"], run["on_bad_image"] or "fail", amp=run["amp"],
                   channels_last=run["channels_last"], compile=run["compile"] or False, workers=run["workers"],
                   fold=run["fold"], folds=run["folds"])
