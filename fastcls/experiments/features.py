"""The sweeps' fast path: a frozen body's pooled activations, cached on disk, and heads trained on them.

fastai 0.7 made dropout sweeps cheap with `precompute=True`: the body runs once per image, only the head trains.
Here the body runs once per image and view (a fixed number of augmented views of the training set, the plain and
TTA views of valid and test), the pooled vectors (`AdaptiveConcatPool2d`: max then average) are cached under
`<runs>/cache/features/<key>/` (float16 `.npy` files, memory-mapped when read), and each trial trains the arch's own
head minus its pooling on them. The trained
head is the full model's head (same modules), so a fast run stores full-model weights and the same kinds of
probabilities as a full run.

The body runs in eval mode. A pretrained body is used exactly as loaded, its batch-norm statistics included (what
fastai 0.7's precompute did). A randomly initialised body has no statistics worth keeping: its features would be
off-scale for the head, so its batch-norm statistics are first re-estimated on (up to `BN_IMAGES`) augmented training
images. `Recipe.bn_stats` ('keep' / 'reestimate') overrides either choice. Difference from fastai's frozen stage, by
design: the batch-norm weights stay fixed (fastai's `freeze()` trains them).
"""

__all__ = ["FeatureSet", "FEATURE_BS", "feature_key", "data_fingerprint", "frozen_body", "compute_features",
           "cached_features", "fit_head_run", "reestimate_bn"]

import hashlib
import itertools
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .. import data as fdata
from ..archs import build_body, get_arch, make_head, resolve_weights, split_head
from ..errors import FastclsError
from ..predict import encode_labels, pooled_features, view_count
from ..budget import budget_batch_size, check_disk
from ..files import read_json, remove_stray_files, write_atomic, write_json, write_npy
from ..train import Predictions, RunResult, learner, store_run, train
from ..config import RunConfig

FEATURE_FORMAT = 2  # 1: one float32 .npz per key (read once and converted)
_KEY_VERSION = 1  # what the features are, not how they are stored: format 2 kept the keys of format 1
FEATURE_DTYPE = np.float16  # cached features: half the disk and page cache of float32; heads read them as float32
BN_IMAGES = 512  # training images (at most) that re-estimate the body's batch-norm statistics
FEATURE_BS = 64  # extraction batch size: fixed, so the cache does not depend on the head's training batch size;
# lowered by the memory budget for large images (`feature_bs`)
# recipe settings that only affect the head's training or the report: sweeping them reuses the same features
HEAD_ONLY = frozenset({"description", "metric", "archs", "epochs", "freeze_epochs", "lr", "ps", "ps_grid", "bs", "wd",
                       "layer_decay", "accum", "drw_start", "progressive_sizes",
                       "label_smoothing", "imbalance", "patience", "sub_id_col", "sub_label_col", "sub_id",
                       "sub_template", "cache_budget", "tta_blend"})


@dataclass
class FeatureSet:
    """Pooled body activations of one data set: train (views, N, F), valid and test (1 + tta views, N, F)."""

    key: str
    arch: str
    nf: int  # the body's feature channels (the head's input before pooling)
    vocab: list
    train: np.ndarray
    train_targets: np.ndarray
    valid: np.ndarray
    valid_targets: np.ndarray
    valid_ids: list
    test: Optional[np.ndarray] = None
    test_ids: Optional[list] = None
    test_targets: Optional[np.ndarray] = None
    body_hash: str = ""  # the body as built, before its batch-norm statistics were re-estimated
    bn_stats: Optional[dict] = None  # re-estimated batch-norm buffers: name -> array (restored on a cache hit)
    stats: Optional[list] = None  # the data set's own mean/std when the recipe normalises by it
    seconds: float = 0.0  # time the extraction took when it ran
    from_cache: bool = False


def data_fingerprint(items: fdata.Items) -> str:
    """A hash of the items (ids, labels, sources) and their content: array bytes, or file sizes and times."""
    h = hashlib.sha1()
    for name, df in (("train", items.train), ("test", items.test)):
        if df is None:
            continue
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(df.astype(str), index=False).values.tobytes())
        if not items.arrays:
            for x in df["x"]:
                try:
                    st = os.stat(x)
                    h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())
                except OSError:
                    h.update(b"missing;")
    for name in sorted(items.arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(items.arrays[name]).tobytes())
    return h.hexdigest()


def _weights_id(cfg: RunConfig) -> str:
    """Where the body's weights come from, with the file's size and time when it is a file."""
    src = resolve_weights(get_arch(cfg.arch), cfg.recipe.pretrained, cfg.weights)
    if isinstance(src, Path):
        st = src.stat()
        return f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return "random" if src is None else f"{src}:{get_arch(cfg.arch).timm_name}"


def feature_bs(recipe) -> int:
    """The extraction's batch size: FEATURE_BS, capped by the memory budget (`fastcls.budget.budget_batch_size`)."""
    return budget_batch_size(FEATURE_BS, recipe.size)


def feature_key(cfg: RunConfig, items: fdata.Items, views: int, fingerprint: Optional[str] = None) -> str:
    """The cache key: recipe settings that shape the images, arch, weights, data fingerprint, seed, sample, views.

    `fingerprint` is `data_fingerprint(items)` when the caller already has it.
    """
    recipe = {k: v for k, v in cfg.recipe.to_dict().items() if k not in HEAD_ONLY}
    spec = {"format": _KEY_VERSION, "recipe": recipe, "arch": cfg.arch, "weights": _weights_id(cfg),
            "data": fingerprint or data_fingerprint(items), "seed": cfg.seed, "sample": cfg.sample, "views": views}
    if feature_bs(cfg.recipe) != FEATURE_BS:  # other batches draw other augmentations: another cache
        spec["bs"] = feature_bs(cfg.recipe)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{cfg.recipe.name}-{cfg.arch}-{cfg.recipe.size}px-{digest}"


def frozen_body(cfg: RunConfig) -> tuple[nn.Module, str]:
    """The run's body, built reproducibly from the seed (random init) or its weights, and a hash of its state."""
    from fastai.torch_core import set_seed
    set_seed(cfg.seed)
    body = build_body(cfg.arch, cfg.recipe.pretrained, cfg.weights)
    h = hashlib.sha1()
    for k, v in body.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return body, h.hexdigest()


def reestimate_bn(cfg: RunConfig) -> bool:
    """Whether the fast path re-estimates the frozen body's batch-norm statistics (`Recipe.bn_stats`)."""
    return not cfg.keep_bn_stats


def compute_features(cfg: RunConfig, items: fdata.Items, views: int, body: nn.Module,
                     progress: str = "auto", folder: Optional[Path] = None) -> FeatureSet:
    """Run the frozen `body` over `views` augmented passes of the training items and the plain + TTA views of valid
    and test; returns the pooled activations (float32 in memory; see `cached_features` for the cache).

    With `folder`, the features are written batch by batch as FEATURE_DTYPE into `<folder>/{train,valid,test}.npy`
    (each through a temporary name, renamed when complete) and come back memory-mapped: memory does not grow with
    the items. The cache's `meta.json` is not written here, so until `_save` writes it the folder is a miss."""
    from fastai.torch_core import set_seed
    t0 = time.time()
    recipe = cfg.recipe.override(bs=feature_bs(cfg.recipe))
    d = fdata.dls(recipe, items, seed=cfg.seed, sample=cfg.sample, stats=cfg.norm_stats)
    if progress != "none":
        print(f"Computing {cfg.arch} features: {views} augmented view(s) of {len(d.train_ds)} training images, "
              f"{view_count(recipe)} view(s) of valid and test", flush=True)
    pool, _ = split_head(make_head(cfg.arch, body.num_features, len(d.vocab), 0.0))
    if any(True for _ in pool.parameters()):
        raise FastclsError(f"The head of {cfg.arch} has parameters before its Flatten, so its input cannot be cached "
                           "as pooled features; use the full path (--full).")
    device = d.device if d.device is not None else torch.device("cpu")
    body.to(device)
    set_seed(cfg.seed)
    if reestimate_bn(cfg):  # a random body has no statistics worth keeping; a pretrained one is used as loaded
        with torch.no_grad():
            update_bn(itertools.islice(d.train, max(1, BN_IMAGES // recipe.bs)), body, device=device)
    set_seed(cfg.seed)

    def extract(name, dl, n_aug, names=()):
        if folder is None:
            return pooled_features(body, pool, dl, n_aug, names)
        targets = []  # only the targets: no map of the temporary file is held across its rename
        write_atomic(folder / f"{name}.npy", lambda tmp: targets.append(
            pooled_features(body, pool, dl, n_aug, names, out=tmp, dtype=FEATURE_DTYPE)[1]))
        return np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False), targets[0]
    train_x, train_y = extract("train", d.train, views - 1)
    valid_x, valid_y = extract("valid", d.valid, recipe.tta, recipe.tta_views)
    tdl = fdata.test_dl(d, items)
    test_x = extract("test", tdl, recipe.tta, recipe.tta_views)[0] if tdl is not None else None
    test = items.test if test_x is not None else None
    test_y = encode_labels(test["label"], d.vocab) if test is not None and "label" in test else None
    body.cpu()
    return FeatureSet("", cfg.arch, int(body.num_features), [str(v) for v in d.vocab], train_x, train_y, valid_x,
                      valid_y, d.valid_ds.items["id"].astype(str).tolist(), test_x,
                      test["id"].astype(str).tolist() if test is not None else None, test_y,
                      bn_stats=_bn_buffers(body), stats=d.stats, seconds=time.time() - t0)


def _bn_buffers(body: nn.Module) -> dict:
    """The batch-norm buffers (running mean, var, count) of `body` as arrays, by state-dict name."""
    names = {name for name, m in body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    return {k: v.cpu().numpy() for k, v in body.state_dict().items() if k.rsplit(".", 1)[0] in names}


_ARRAYS = ("train", "train_targets", "valid", "valid_targets", "test", "test_targets")
_FEATURES = ("train", "valid", "test")  # stored as FEATURE_DTYPE; the targets keep their integer type


def _cache_path(cache_dir, key: str) -> Path:
    """The folder of one cached feature set: `<key>/` with one `.npy` per array and `meta.json` (written last)."""
    return Path(cache_dir) / key


def _estimate_bytes(items: fdata.Items, nf: int, views: int, tta: int) -> int:
    """An upper bound of a feature set's size on disk: every item in its most-viewed split, in FEATURE_DTYPE."""
    n = sum(len(df) for df in (items.train, items.test) if df is not None)
    return n * max(views, 1 + tta) * nf * np.dtype(FEATURE_DTYPE).itemsize


def _save(fs: FeatureSet, folder: Path):
    """Write the feature set as `.npy` files (features in FEATURE_DTYPE) then `meta.json`, each atomically: a reader
    sees no `meta.json` (a miss) until every array is in place."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(fs, k) for k in _ARRAYS if getattr(fs, k) is not None}
    shapes = {}
    for k, v in arrays.items():
        shapes[k] = list(v.shape)
        if _written(v, folder / f"{k}.npy"):  # streamed there by compute_features
            continue
        v = np.asarray(v, dtype=FEATURE_DTYPE) if k in _FEATURES else np.asarray(v)
        write_npy(folder / f"{k}.npy", np.ascontiguousarray(v))
    bn = fs.bn_stats or {}
    if bn:
        def write_bn(p):
            with open(p, "wb") as f:  # a file object: np.savez would append .npz to the temporary name
                np.savez(f, **bn)
        write_atomic(folder / "bn.npz", write_bn)
    meta = {"format": FEATURE_FORMAT, "key": fs.key, "arch": fs.arch, "nf": fs.nf, "vocab": fs.vocab,
            "valid_ids": fs.valid_ids, "test_ids": fs.test_ids, "body_hash": fs.body_hash, "stats": fs.stats,
            "seconds": fs.seconds, "dtype": np.dtype(FEATURE_DTYPE).name, "shapes": shapes, "bn": bool(bn)}
    write_json(folder / "meta.json", meta)


def _written(a, path: Path) -> bool:
    """Whether `a` is the FEATURE_DTYPE file `path` itself, memory-mapped (nothing left to write)."""
    return (isinstance(a, np.memmap) and a.dtype == FEATURE_DTYPE and a.filename is not None
            and Path(a.filename).resolve() == path.resolve())


def _load(folder: Path) -> Optional[FeatureSet]:
    """The cached feature set in `folder`, its features memory-mapped (read-only), or None when it is absent,
    incomplete or unreadable (it is then recomputed)."""
    meta = read_json(folder / "meta.json")
    if not isinstance(meta, dict) or meta.get("format") != FEATURE_FORMAT:
        return None
    try:
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in meta["shapes"]}
        if any(list(a.shape) != meta["shapes"][k] for k, a in arrays.items()):
            return None
        bn = {}
        if meta["bn"]:
            with np.load(folder / "bn.npz", allow_pickle=False) as z:
                bn = {k: z[k] for k in z.files}
        return FeatureSet(meta["key"], meta["arch"], meta["nf"], meta["vocab"], arrays["train"],
                          np.asarray(arrays["train_targets"]), arrays["valid"], np.asarray(arrays["valid_targets"]),
                          meta["valid_ids"], arrays.get("test"), meta["test_ids"],
                          None if "test_targets" not in arrays else np.asarray(arrays["test_targets"]),
                          meta["body_hash"], bn, meta.get("stats"), meta["seconds"], True)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile):
        return None


def _load_v1(path: Path) -> Optional[FeatureSet]:
    """A feature set cached by an older fastcls (format 1: one float32 `.npz`), or None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in _ARRAYS if k in z.files}
            bn = {k[3:]: z[k] for k in z.files if k.startswith("bn:")}
        if meta.get("format") != 1:
            return None
        return FeatureSet(meta["key"], meta["arch"], meta["nf"], meta["vocab"], arrays["train"],
                          arrays["train_targets"], arrays["valid"], arrays["valid_targets"], meta["valid_ids"],
                          arrays.get("test"), meta["test_ids"], arrays.get("test_targets"), meta["body_hash"], bn,
                          meta.get("stats"), meta["seconds"], True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError, zipfile.BadZipFile):  # a damaged file: recompute
        return None


def cached_features(cfg: RunConfig, items: fdata.Items, views: int, cache_dir, progress: str = "auto",
                    key: Optional[str] = None):
    """The feature set of `cfg` from `cache_dir` when present, else computed and cached.

    Features are stored as FEATURE_DTYPE (float16) `.npy` files under `<cache_dir>/<key>/` and come back
    memory-mapped, so a sweep's trials share the page cache instead of each holding a copy. A cache written by an
    older fastcls (`<key>.npz`, float32) is converted once and removed. Before computing, the disk the cache will
    need is checked (`fastcls.budget.check_disk`).

    Args:
        cfg: the run's config (recipe, arch, weights, seed, sample decide the key; head settings do not).
        items: the data set's items.
        views: augmented passes over the training items.
        cache_dir: folder of cached feature sets (the sweeps use `<runs>/cache/features`).
        progress: 'none' prints nothing.
        key: `feature_key(cfg, items, views)` when the caller already has it.

    Returns:
        (FeatureSet, body): the features and the frozen body they came from (its weights go into each run).
    """
    key = key or feature_key(cfg, items, views)
    folder = _cache_path(cache_dir, key)
    body, body_hash = frozen_body(cfg)
    fs = _load(folder)
    old = Path(cache_dir) / f"{key}.npz"
    if fs is None and old.is_file():  # an older fastcls's cache: convert it once
        fs = _load_v1(old)
        if fs is not None and fs.body_hash == body_hash:
            _save(fs, folder)
            fs = _load(folder)
        old.unlink(missing_ok=True)
    if fs is None or fs.body_hash != body_hash:  # a body that is not the cached one (e.g. changed init) recomputes
        if folder.is_dir():
            remove_stray_files(folder, live_writers=False)  # an extraction killed half-way: its partial arrays
        check_disk(cache_dir, _estimate_bytes(items, int(body.num_features), views, cfg.recipe.tta),
                   f"the cached features of {cfg.arch} ({views} view(s) of {len(items.train)} images)",
                   "use fewer views or a smaller --sample, or train the full path (--full)")
        (folder / "meta.json").unlink(missing_ok=True)  # a stale cache is a miss while its arrays are replaced
        folder.mkdir(parents=True, exist_ok=True)
        fs = compute_features(cfg, items, views, body, progress, folder=folder)
        fs.key, fs.body_hash = key, body_hash
        _save(fs, folder)
        fs = _load(folder) or fs
    elif fs.bn_stats:
        body.load_state_dict({k: torch.from_numpy(v) for k, v in fs.bn_stats.items()}, strict=False)
    return fs, body


class _FeatureViews:
    """A dataset of (pooled features, target) over one view of cached features; `view` picks which."""

    def __init__(self, feats: np.ndarray, targets: np.ndarray, vocab: list):
        self.feats, self.targets, self._view = feats, torch.from_numpy(np.array(targets)), None
        self.view = 0
        self.vocab = vocab  # read by the Learner's loss set-up (imbalance plan), as on an image dataset
        self.items = pd.DataFrame({"label": [vocab[i] for i in targets]})

    @property
    def view(self) -> int:
        return self._view

    @view.setter
    def view(self, v: int):
        """Read view `v` of the (memory-mapped) features into memory: one view at a time, in its stored dtype."""
        if v != self._view:
            self._view, self.current = v, None  # the old view is released before the new one is read
            self.current = torch.from_numpy(np.array(self.feats[v]))

    def __len__(self):
        return self.feats.shape[1]

    def __getitem__(self, i):
        return self.current[i].float(), self.targets[i]


def _view_cycle():
    from fastai.callback.core import Callback

    class ViewCycle(Callback):
        """Each training epoch reads the next cached augmented view of the training set."""

        def before_epoch(self):
            ds = self.learn.dls.train.dataset
            ds.view = self.learn.epoch % ds.feats.shape[0]
    return ViewCycle()


def _head_probs(rest: nn.Module, feats: np.ndarray, act, device, chunk: int = 8192) -> np.ndarray:
    """Class probabilities (views, N, C) of the trained head (eval mode) on cached features."""
    rest.eval()
    out = []
    with torch.no_grad():
        for v in feats:
            out.append(torch.cat([act(rest(torch.from_numpy(np.asarray(v[i:i + chunk], dtype=np.float32)).to(device)))
                                  .float().cpu() for i in range(0, len(v), chunk)]))
    return torch.stack(out).numpy()


def fit_head_run(cfg: RunConfig, store, fs: FeatureSet, body: nn.Module, progress: str = "auto",
                 sweep: Optional[str] = None) -> RunResult:
    """Train the arch's head (dropout `cfg.recipe.ps`) on cached features for the frozen stage's epochs and store
    the run: full-model weights (body + trained head) and plain + TTA probabilities, like a full run.

    Args:
        cfg: the trial's config; `recipe.freeze_epochs` epochs at `recipe.lr`, one cached train view per epoch.
        store: the run store.
        fs, body: from `cached_features`.
        progress: see `fastcls.train.train`.
        sweep: the sweep id the run belongs to.
    """
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.torch_core import getcallable, set_seed
    t0 = time.time()
    recipe = cfg.recipe
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(cfg.seed)
    head = make_head(cfg.arch, fs.nf, len(fs.vocab), recipe.ps)
    _, rest = split_head(head)
    train_ds = _FeatureViews(fs.train, fs.train_targets, fs.vocab)
    valid_ds = _FeatureViews(fs.valid[:1], fs.valid_targets, fs.vocab)
    set_seed(cfg.seed)  # the loaders draw their shuffling seed when created
    fdls = DataLoaders(DataLoader(train_ds, bs=recipe.bs, shuffle=True, drop_last=len(train_ds) > recipe.bs,
                                  device=device),
                       DataLoader(valid_ds, bs=max(recipe.bs, 256), shuffle=False, device=device))
    learn = learner(fdls, cfg, model=rest)
    history, best_epoch = train(learn, cfg, progress, stages=[("frozen", recipe.freeze_epochs, recipe.lr, False)],
                                cbs=(_view_cycle(),))
    act = getcallable(learn.loss_func, "activation")
    rest.to(device)
    preds = Predictions(fs.vocab, fs.valid_ids, _head_probs(rest, fs.valid, act, device), fs.valid_targets,
                        fs.test_ids, _head_probs(rest, fs.test, act, device) if fs.test is not None else None,
                        fs.test_targets)
    weights = nn.Sequential(body, head.cpu()).state_dict()
    return store_run(cfg, store, preds, history, best_epoch, fs.train.shape[1], weights, time.time() - t0,
                     learn=learn, sweep=sweep, kind="fast", stats=fs.stats,
                     config_extra={"fast": True, "fast_views": int(fs.train.shape[0]), "features": fs.key})
