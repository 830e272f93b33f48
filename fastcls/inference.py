"""Inference on new images: `predict` a stored run, cv run or ensemble (or an exported bundle) on a folder of images,
and `export` one as a self-contained folder for an offline machine.

Both work from one plan, the *manifest* (`manifest`): the label vocabulary, the recipe's settings (submission
format), each member's fold models (config, normalisation statistics, safetensors weights and their SHA-256), its
post-hoc steps and TTA blend weight, and the ensemble's stored method and weights ('stack': the fitted logistic
regression as plain arrays). A member's views are the mean of its fold models' views (cv runs average their folds
as stored), then its post-hoc steps, then its TTA blend; the members are combined by `fastcls.ensemble.combiners`.
Nothing is unpickled: models are rebuilt from their config (`fastcls.archs.build_model`) and safetensors weights.
"""

__all__ = ["FORMAT_VERSION", "RUNTIMES", "Prediction", "manifest", "load_bundle", "read_inputs", "predict",
           "write_probs", "export", "write_wheel"]

import dataclasses
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from . import data as fdata
from .archs import build_model
from .budget import budget_batch_size
from .config import RunConfig
from .ensemble.combiners import Combiner, fit_combiner
from .ensemble.members import _load_members
from .errors import FastclsError
from .files import file_sha256, read_json, write_atomic, write_json
from .posthoc import PostHoc
from .predict import predict_views, run_tta_beta, tta_blend
from .runfiles import checked_weights
from .runs import RunStore
from .submission import write_submission

FORMAT_VERSION = 1
RUNTIMES = ("torch", "onnx")
MANIFEST = "manifest.json"
VERIFIED = "_verified"  # a net whose checksum this process has just checked (never written to a manifest)
DECODED_BYTES = 1 << 30  # models of the same size share their decoded, resized images up to this many bytes


# -- the plan: from the store or from a bundle -----------------------------------------------------------------------
def _net(run, path: Optional[Path] = None) -> dict:
    """One trained model of a stored run: config, normalisation statistics, weights file and its checksum."""
    weights = checked_weights(run.path, run.meta.get("weights_sha256"))  # before anything is written
    cfg = run.config
    stats = run.meta.get("normalize_stats") if "normalize_stats" in run.meta else \
        RunConfig.from_dict(cfg, lenient=True).norm_stats
    return {"id": run.id, "config": cfg, "stats": stats, "weights": str(weights),
            "sha256": run.meta.get("weights_sha256"), "tta": int(cfg.get("tta") or 0),
            "tta_views": list(cfg.get("tta_views") or []), VERIFIED: True}


def _member(store: RunStore, run, beta) -> dict:
    """A run as an ensemble member (or the whole prediction): its fold models, post-hoc steps and TTA blend."""
    if run.kind == "ensemble":
        raise FastclsError(f"Run {run.id} is an ensemble; an ensemble of ensembles cannot predict new images yet. "
                           "Ensemble the member runs themselves.")
    if run.kind == "cv":
        nets = [_net(store.load(r)) for r in run.config.get("fold_runs") or []]
        if not nets:
            raise FastclsError(f"cv run {run.id} lists no fold runs in its config.")
    else:
        nets = [_net(run)]
    return {"id": run.id, "name": run.name, "kind": run.kind, "beta": beta, "posthoc": run.meta.get("posthoc"),
            "nets": nets}


def _stack_arrays(store: RunStore, run) -> dict:
    """The stacking model an ensemble was stored with, refitted on its members' stored validation probabilities
    exactly as `fastcls.ensemble.ensemble` fitted it on all rows, as plain arrays (no pickle)."""
    cfg = run.config
    members, _, metric, y, _, _ = _load_members(store, cfg["members"])
    probs = [m.probs(b) for m, b in zip(members, cfg["tta_beta"])]
    model = fit_combiner("stack", probs, y, metric, seed=cfg.get("seed", 0)).model
    if isinstance(model, (int, np.integer)):
        return {"only_class": np.array([int(model)])}
    scaler, lr = model[0], model[-1]
    return {"mean": scaler.mean_, "scale": scaler.scale_, "coef": lr.coef_, "intercept": lr.intercept_,
            "classes": lr.classes_}


def manifest(store: RunStore, ref: str) -> tuple[dict, dict]:
    """The prediction plan of stored run `ref` (a run, cv run or ensemble) and its arrays (the stacking model).

    Returns:
        (manifest dict, arrays dict); weights paths point into the store.
    """
    run = store.load(ref)
    arrays = {}
    if run.kind == "ensemble":
        cfg = run.config
        runs = [store.load(r) for r in cfg["members"]]
        members = [_member(store, r, b) for r, b in zip(runs, cfg["tta_beta"])]
        combine = {"method": cfg["method"], "weights": cfg.get("weights")}
        if cfg["method"] == "stack":
            arrays = {f"stack_{k}": v for k, v in _stack_arrays(store, run).items()}
        recipe_cfg = runs[0].config
    else:
        members, combine, recipe_cfg = [_member(store, run, run_tta_beta(run.meta))], None, run.config
    return {"format": FORMAT_VERSION, "id": run.id, "name": run.name, "kind": run.kind, "vocab": list(run.vocab),
            "recipe": recipe_cfg, "members": members, "combine": combine}, arrays


def load_bundle(folder) -> tuple[dict, dict]:
    """The manifest and arrays of an exported folder (`export`); weights paths resolved inside it.

    Raises:
        FastclsError: no manifest, or one written by a newer fastcls (a format this version does not know).
    """
    folder = Path(folder)
    man = read_json(folder / MANIFEST)
    if not isinstance(man, dict):
        raise FastclsError(f"{folder} is not an exported fastcls bundle: no readable {MANIFEST} in it.")
    version = man.get("format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FastclsError(f"Bundle {folder} has format version {version!r}, newer than this fastcls reads "
                           f"({FORMAT_VERSION}). Install the fastcls that exported it (or newer).")
    for m in man["members"]:
        for n in m["nets"]:
            n["weights"] = str(folder / n["weights"])
            n.pop(VERIFIED, None)  # whatever the file says, its copies are checked when read
            if n.get("onnx"):
                n["onnx"]["file"] = str(folder / n["onnx"]["file"])
    arrays = {}
    if (folder / "arrays.npz").is_file():
        with np.load(folder / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    return man, arrays


def _plan(source, ref: Optional[str]) -> tuple[dict, dict]:
    """A plan from an exported bundle (`ref`, or `source` when `ref` is None, a folder holding a manifest), else from
    run `ref` of the store `source` (a `RunStore` or its folder)."""
    for folder in (ref, source) if ref is not None else (source,):
        if isinstance(folder, (str, Path)) and (Path(folder) / MANIFEST).is_file():
            return load_bundle(folder)
    if ref is None:
        raise FastclsError(f"{source} is not an exported bundle (no {MANIFEST} in it); give a run to predict with.")
    if not isinstance(source, RunStore):
        if not (Path(source) / "index.sqlite").exists() and not Path(source).is_dir():
            raise FastclsError(f"{ref} is not an exported bundle (no {MANIFEST}) and there is no run store at "
                               f"{source}: pass --runs-dir, or the folder `fastcls export` wrote.")
        source = RunStore(source)
    return manifest(source, ref)


# -- inputs ----------------------------------------------------------------------------------------------------------
def read_inputs(recipe, data=None) -> fdata.Items:
    """The images to predict as `Items` with only a test table (`id`, `x`; arrays for array layouts).

    `data`: the recipe's data folder (its test layout), a folder of images (ids: paths relative to it), or a CSV of
    image paths (the recipe's `file_col`, else a column `path`/`file`/`x`, else the first; relative to the CSV's
    folder; ids: the paths as written). None: the recipe's own data (the run's --data).
    """
    path = None if data is None else Path(data).expanduser()
    if path is not None and path.suffix.lower() == ".csv" and path.is_file():
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        col = next((c for c in (recipe.file_col, "path", "file", "x") if c in df), df.columns[0])
        ids = df[col].tolist()
        xs = [str(p if Path(p).is_absolute() else path.parent / p) for p in ids]
        return fdata.Items(pd.DataFrame(columns=["id", "x", "label"]), pd.DataFrame({"id": ids, "x": xs}))
    if path is not None and not path.exists():
        raise FastclsError(f"--data {path} does not exist: give the recipe's data folder, a folder of images or a "
                           "CSV of image paths.")
    if path is None or (recipe.layout != "digits" and ((path / (recipe.test_dir or "\0")).is_dir() or
                                                      (recipe.npz_test and (path / recipe.npz_test).is_file()))):
        try:
            items = fdata.read_layout(recipe, fdata.resolve_data_path(recipe, path))
        except FastclsError:
            if path is None:
                raise
            items = None
        if items is not None and items.test is not None and len(items.test):
            return dataclasses.replace(items, train=items.train.iloc[:0])
    if path is None or not path.is_dir():
        raise FastclsError(f"No test images found in {path or 'the recipe data'} (recipe {recipe.name!r}).")
    files = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in fdata.IMAGE_EXTS and
             not p.name.startswith(".") and p.is_file()]
    if not files:
        raise FastclsError(f"No images in {path} (looked for {', '.join(sorted(fdata.IMAGE_EXTS))}, recursively).")
    return fdata.Items(pd.DataFrame(columns=["id", "x", "label"]),
                       pd.DataFrame({"id": [str(p.relative_to(path)) for p in files], "x": [str(p) for p in files]}))


def _check_inputs(items: fdata.Items, on_bad: str) -> fdata.Items:
    """Every image decoded once (training's check and verdict cache): 'fail' names the bad files, 'skip' keeps their
    rows (run on a blank image, then given the others' prior by `predict`) and lists them in `items.bad`."""
    if on_bad not in ("fail", "skip"):
        raise FastclsError(f"--on-bad-image must be 'fail' or 'skip', got {on_bad!r}.")
    if items.arrays:
        return items
    bad = dict(fdata.scan_images(list(items.test["x"]), fdata.cache_home()))
    if not bad:
        return items
    listed = [{"split": "test", "id": str(r.id), "path": str(r.x), "reason": bad[r.x]}
              for r in items.test.itertuples() if r.x in bad]
    lines = "\n".join(f"  {b['path']}: {b['reason']}" for b in listed[:20])
    if on_bad == "fail":
        raise FastclsError(f"{len(listed)} of {len(items.test)} images cannot be read; nothing was written:\n{lines}\n"
                           "Fix or delete them, or pass --on-bad-image skip to give them the other images' prior.")
    print(f"fastcls: warning: {len(listed)} unreadable image(s) get the other images' prior (their mean "
          f"probabilities):\n{lines}", file=sys.stderr)
    return dataclasses.replace(items, bad=listed, blank=frozenset(b["path"] for b in listed))


# -- running the models ----------------------------------------------------------------------------------------------
def _built_on_meta(build):
    """`build()` on torch's meta device (shapes only, no weight initialisation), or None when the arch's constructor
    needs real tensors (then it is built normally)."""
    import torch
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # e.g. `.tolist()` / `.item()` on a meta tensor in a model's __init__
        return None


def _load_model(net: dict, n_classes: int, verify: bool = True):
    """The net's model rebuilt from its config and safetensors weights (checksum verified when recorded)."""
    from safetensors.torch import load_file
    weights = Path(net["weights"])
    if not weights.is_file():
        raise FastclsError(f"Weights file {weights} (run {net['id']}) is missing; nothing was written.")
    if verify and net.get("sha256") and not net.get(VERIFIED) and file_sha256(weights) != net["sha256"]:
        raise FastclsError(f"Weights file {weights} (run {net['id']}) does not match the checksum recorded when it "
                           "was stored: it was altered or damaged. Nothing was written; export the run again.")
    cfg = RunConfig.from_dict(net["config"], lenient=True)
    r = cfg.recipe
    build = partial(build_model, cfg.arch, n_classes, ps=r.ps, pretrained=False, drop_path=r.drop_path)
    try:
        state, model = load_file(str(weights)), _built_on_meta(build)
        if model is not None:  # every tensor comes from the file: no random initialisation to pay for
            model.load_state_dict(state, assign=True)
            model = None if any(t.is_meta for t in chain(model.parameters(), model.buffers())) else model
        if model is None:
            model = build()
            model.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as e:
        raise FastclsError(f"Weights file {weights} (run {net['id']}) does not fit {cfg.arch}: "
                           f"{str(e).splitlines()[0]}") from None
    return cfg, model.eval()


def _image_getter(items: fdata.Items):
    """(number of test items, image(i) -> the RGB PIL image of test item i), as training reads them."""
    from .imageio import row_image
    xs = items.test["x"].tolist()
    srcs = items.test["src"].tolist() if "src" in items.test else [None] * len(xs)
    return len(xs), lambda i: row_image(xs[i], items.arrays, srcs[i], items.blank)


def _batch_size(bs: Optional[int], recipe) -> int:
    """The batch size given, else the run's capped by the memory budget (`fastcls.budget.budget_batch_size`)."""
    return bs or budget_batch_size(recipe.bs, recipe.size)


def _onnx_views(net: dict, items: fdata.Items, bs: Optional[int], tick) -> np.ndarray:
    """(1, N, C) probabilities of one model with onnxruntime (`fastcls.onnx_runtime`): the plain view only."""
    from .onnx_runtime import net_views
    bs = _batch_size(bs, RunConfig.from_dict(net["config"], lenient=True).recipe)
    return net_views(net, *_image_getter(items), bs, tick)


def _torch_plain(net: dict, cfg: RunConfig, model, items: fdata.Items, bs: Optional[int], device, tick,
                 decoded: Optional[dict] = None):
    """(N, C) probabilities of the plain view with torch: the images through `fastcls.imageio.batches` (the item
    transforms' pixels, without fastai's per-item dispatch and copies), the run's batch transforms as on its valid set
    (fastai's, so the values are the stored ones bit for bit), the model in inference mode, with mixed precision and
    channels-last on a GPU as in training (`fastcls.hardware.resolve_accel`). `decoded`: uint8 batches kept per
    (size, crop, trim, bs) for the next model of an ensemble (up to `DECODED_BYTES`)."""
    import torch
    from fastai.data.transforms import IntToFloatTensor
    from fastai.vision.core import TensorImage
    from fasttransform import Pipeline
    from .hardware import resolve_accel
    from .imageio import batches
    r, dev = cfg.recipe, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    acc = resolve_accel(dev.type == "cuda")
    fmt = torch.channels_last if acc["channels_last"] else torch.contiguous_format
    model = model.to(dev, memory_format=fmt)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16 if acc["amp"] == "bf16" else torch.float16,
                         enabled=bool(acc["amp"]))
    stats = tuple(net["stats"]) if net.get("stats") is not None else None
    tfms = Pipeline([IntToFloatTensor(), *fdata.batch_tfms(r, stats)], split_idx=1)
    key = (r.size, r.crop, tuple(r.trim), _batch_size(bs, r))
    keep = decoded is not None and len(items.test) * 3 * r.size ** 2 <= DECODED_BYTES
    source = (decoded.get(key) if keep else None) or batches(*_image_getter(items), key[3], *key[:3])
    out, kept = [], []
    with torch.inference_mode(), amp:
        for b in source:
            if keep:
                kept.append(b)
            x = tfms(TensorImage(torch.from_numpy(b).to(dev))).as_subclass(torch.Tensor)
            out.append(model(x.contiguous(memory_format=fmt)).float().softmax(1).cpu())
            if tick is not None:
                tick(len(b))
    if keep:
        decoded[key] = kept
    return torch.cat(out).numpy()


def _net_views(net: dict, items: fdata.Items, vocab: list, bs: Optional[int], device, tta: bool,
               runtime: str = "torch", tick=None, decoded: Optional[dict] = None):
    """(views, N, C) probabilities of one model on the items: the run's item pipeline, normalisation and TTA, with
    torch or onnxruntime (`_onnx_views`); `tick(k)` after each batch of k images. The plain view runs in a plain
    loop (`_torch_plain`), the random TTA views through fastai's pipeline with the run's training transforms."""
    if runtime == "onnx":
        return _onnx_views(net, items, bs, tick)
    cfg, model = _load_model(net, len(vocab))
    plain = _torch_plain(net, cfg, model, items, bs, device, tick, decoded)[None]
    names = tuple(net.get("tta_views") or ())
    if not tta or not (net["tta"] or names):
        return plain
    from fastai.callback.core import Callback
    from fastai.data.block import DataBlock
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.vision.data import ImageBlock
    from .hardware import accelerate
    r = cfg.recipe
    stats = tuple(net["stats"]) if net.get("stats") is not None else None
    n = len(items.test)
    block = DataBlock(blocks=(ImageBlock,), get_x=fdata.ImageGetter(items.arrays, items.blank),
                      splitter=lambda rows: ([0], list(range(n))), item_tfms=fdata.item_tfms(r),
                      batch_tfms=fdata.batch_tfms(r, stats))
    dls = block.dataloaders(items.test.reset_index(drop=True), bs=_batch_size(bs, r), num_workers=0, device=device)

    class Tick(Callback):
        order = 99

        def after_batch(self):
            if tick is not None:
                tick(len(self.learn.xb[0]))
    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=[Tick()])
    accelerate(learn, None, None, False)
    return np.concatenate([plain, predict_views(learn, dls.valid, net["tta"], names, plain=False)[0]])


def _member_probs(member: dict, items, vocab, bs, device, tta: bool, runtime: str = "torch", tick=None,
                  decoded: Optional[dict] = None):
    """A member's (views, blended probabilities): fold models' views averaged, post-hoc steps, TTA blend."""
    views = None
    for net in member["nets"]:
        v = _net_views(net, items, vocab, bs, device, tta, runtime, tick, decoded).astype(np.float64)
        views = v if views is None else views[:min(len(views), len(v))] + v[:min(len(views), len(v))]
    views = (views / len(member["nets"])).astype(np.float32)
    post = PostHoc.from_dict(member.get("posthoc"))
    if post.applied:
        views = post.apply(views).astype(np.float32)
    beta = member.get("beta")
    return views, (views[0] if beta is None or len(views) == 1 else tta_blend(views, beta))


def _combiner(combine: dict, arrays: dict, n_classes: int) -> Combiner:
    """The ensemble's stored rule as a `Combiner`; 'stack' rebuilt from its arrays (scaler + logistic regression)."""
    method, w = combine["method"], combine.get("weights")
    comb = Combiner(method, n_classes, weights=None if w is None else np.asarray(w, dtype=np.float64))
    if method == "stack":
        if "stack_only_class" in arrays:
            comb.model = int(arrays["stack_only_class"][0])
            return comb
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        scaler, lr = StandardScaler(), LogisticRegression()
        scaler.mean_, scaler.scale_ = arrays["stack_mean"], arrays["stack_scale"]
        scaler.var_, scaler.n_features_in_ = arrays["stack_scale"] ** 2, len(arrays["stack_mean"])
        lr.coef_, lr.intercept_, lr.classes_ = arrays["stack_coef"], arrays["stack_intercept"], arrays["stack_classes"]
        lr.n_features_in_ = len(arrays["stack_mean"])
        comb.model = make_pipeline(scaler, lr)
    return comb


@dataclass
class Prediction:
    """What `predict` computed: item ids, blended probabilities, each member's views, and the submission written."""

    ids: list
    probs: np.ndarray  # (N, C), columns in `vocab` order
    vocab: list
    members: dict = field(repr=False, default_factory=dict)  # member id -> (views, N, C) after its post-hoc steps
    bad: list = field(default_factory=list)  # unreadable images, given the others' prior (mean probabilities)
    submission: Optional[pd.DataFrame] = field(repr=False, default=None)


def _progress(total: int, show: Optional[bool]):
    """A rich progress bar on stderr over `total` image-views (off when `show` is False, or None and stderr is not a
    terminal): (the Progress, to use as a context, and tick(k) advancing it by k)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    console = Console(stderr=True)
    bar = Progress(TextColumn("predicting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=not (console.is_terminal if show is None else show))
    task = bar.add_task("predict", total=total)
    return bar, lambda k: bar.advance(task, k)


def predict(source: Union[RunStore, str, Path], ref: Optional[str] = None, data=None, out=None, probs_out=None,
            bs: Optional[int] = None, device=None, tta: bool = True, on_bad_image: str = "fail",
            runtime: str = "torch", progress: Optional[bool] = None) -> Prediction:
    """Predict new images with a stored run, cv run or ensemble (`source` a `RunStore` or its folder, `ref` the run),
    or an exported bundle folder (`ref` its path, or `source` with no `ref`).

    Args:
        data: the recipe's data folder (its test layout), a folder of images or a CSV of image paths; None: the
            run's own data.
        out: write the recipe's submission CSV here; probs_out: write ids, vocab and probabilities (.npz) here.
        bs: batch size (default: the run's); device: e.g. 'cpu', 'cuda' (default: a GPU when there is one).
        tta: compute each run's TTA views (off: the plain view only).
        on_bad_image: 'fail' or 'skip', as in training.
        runtime: 'torch' (the run's fastai pipeline), or 'onnx' (an exported bundle's ONNX models with onnxruntime,
            numpy and PIL; the plain view of each model, so members with random TTA views need tta=False).
        progress: a progress bar on stderr (None: when stderr is a terminal).

    Returns:
        A `Prediction`. Nothing is written unless every member predicted.
    """
    if runtime not in RUNTIMES:
        raise FastclsError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}.")
    man, arrays = _plan(source, ref)
    if runtime == "onnx":
        _onnx_ready(man, tta)
    vocab = man["vocab"]
    recipe = RunConfig.from_dict(man["recipe"], lenient=True).recipe
    items = _check_inputs(read_inputs(recipe, data if data is not None else man["recipe"].get("data")), on_bad_image)
    per_member, blends = {}, []
    nets = [n for m in man["members"] for n in m["nets"]]
    bar, tick = _progress(len(items.test) * sum(1 + (n["tta"] if tta else 0) for n in nets), progress)
    decoded = {} if len(nets) > 1 else None  # decoded images shared by the models (`_torch_plain`)
    with bar:
        for m in man["members"]:
            per_member[m["id"]], b = _member_probs(m, items, vocab, bs, device, tta, runtime, tick, decoded)
            blends.append(b)
    probs = blends[0] if man["combine"] is None else _combiner(man["combine"], arrays, len(vocab)).apply(blends)
    if items.blank:  # an unreadable image gets the others' prior: the mean of their probabilities
        bad = items.test["x"].isin(items.blank).to_numpy()
        probs = np.array(probs, dtype=np.float32)
        probs[bad] = probs[~bad].mean(0) if (~bad).any() else np.float32(1 / len(vocab))
    ids = [str(i) for i in items.test["id"]]
    sub = None
    if out is not None:
        where = data if data is not None and Path(data).is_dir() else man["recipe"].get("data")
        sub = write_submission(recipe, ids, probs, vocab, out, data=where)
    if probs_out is not None:
        write_probs(probs_out, ids, vocab, probs)
    return Prediction(ids, probs, vocab, per_member, items.bad, sub)


def _onnx_ready(man: dict, tta: bool):
    """Refuse the ONNX runtime before any work: onnxruntime missing, a model without an ONNX file, or random TTA views
    (`_onnx_views`)."""
    from .onnx_runtime import require
    require("onnxruntime")
    for n in (n for m in man["members"] for n in m["nets"]):
        if not n.get("onnx"):
            raise FastclsError(f"Model {n['id']} has no ONNX file: --runtime onnx needs a folder written by `fastcls "
                               "export --onnx`. Nothing was written.")
        if tta and (n["tta"] or n.get("tta_views")):
            what = (f"{n['tta']} random TTA views (its training augmentations)" if n["tta"] else
                    f"the TTA views {','.join(n['tta_views'])}")
            raise FastclsError(f"Run {n['id']} has {what}, which the ONNX runtime does not compute. Pass --no-tta (the "
                               "plain view; the torch runtime with --no-tta gives the same), or predict with --runtime "
                               "torch. Nothing was written.")


def write_probs(path, ids, vocab, probs):
    """ids, vocab and probabilities as one .npz (no pickle), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(p):
        with open(p, "wb") as f:
            np.savez(f, ids=np.array(ids, dtype=str), vocab=np.array(vocab, dtype=str), probs=probs)
    write_atomic(path, write)


# -- export ----------------------------------------------------------------------------------------------------------
def _export_onnx(net: dict, n_classes: int, folder: Path) -> dict:
    """Write the net (its `weights` a path) as `onnx/<id>.onnx` in `folder`: model + softmax, opset `OPSET`, dynamic
    batch axis; checked by onnx's checker and against torch on a random batch. Returns the manifest's `net['onnx']`."""
    import torch
    from .onnx_runtime import OPSET, require
    onnx, ort = require("onnx"), require("onnxruntime")
    cfg, model = _load_model(net, n_classes)
    r = cfg.recipe
    path = folder / "onnx" / f"{net['id']}.onnx"
    path.parent.mkdir(exist_ok=True)
    full = torch.nn.Sequential(model, torch.nn.Softmax(1)).eval()
    x = torch.rand(3, 3, r.size, r.size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice: not actionable for a user
        warnings.simplefilter("ignore")
        torch.onnx.export(full, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["probs"], dynamic_axes={"image": {0: "batch"}, "probs": {0: "batch"}})
    onnx.checker.check_model(str(path))
    with torch.inference_mode():
        want = full(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    if not np.allclose(got, want, atol=1e-5):
        raise FastclsError(f"The ONNX export of run {net['id']} ({cfg.arch}) differs from torch by "
                           f"{np.abs(got - want).max():.2g}; nothing was exported. Export without --onnx.")
    return {"file": f"onnx/{path.name}", "sha256": file_sha256(path), "opset": OPSET, "size": r.size,
            "crop": r.crop, "trim": list(r.trim)}


def write_wheel(folder) -> Path:
    """Build the wheel of this fastcls (`pip wheel --no-deps`, offline: no index, no build isolation) from its source
    checkout into `folder`; the source is copied to a temporary folder first, so nothing is written next to it.

    Raises:
        FastclsError: fastcls is not installed from a source checkout, or the build failed (its last lines).
    """
    src = Path(__file__).resolve().parents[1]
    if not (src / "setup.cfg").is_file() or not (src / "pyproject.toml").is_file():
        raise FastclsError(f"--with-wheel builds the wheel from fastcls's source, but {src} is not a source checkout "
                           "(fastcls was installed from a wheel): copy that wheel into the folder yourself, or export "
                           "without --with-wheel. Nothing was exported.")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("fastcls", "recipes"):
            shutil.copytree(src / name, Path(tmp) / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in ("setup.cfg", "pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
            if (src / name).is_file():
                shutil.copyfile(src / name, Path(tmp) / name)
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(folder), tmp], capture_output=True, text=True)
    wheels = sorted(Path(folder).glob("fastcls-*.whl"))
    if p.returncode or not wheels:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise FastclsError(f"--with-wheel: building the wheel of fastcls from {src} failed (it needs pip, setuptools "
                           f"and wheel installed; offline is fine):\n{tail}\nNothing was exported.")
    return wheels[-1]


def export(store: Union[RunStore, str, Path], ref: str, out, onnx: bool = False, wheel: bool = False) -> Path:
    """Write run `ref` (a run, cv run or ensemble) as a self-contained folder that `predict(folder, data=...)` runs
    with no run store and no training data: manifest.json (format version, vocab, recipe settings, members with
    their configs, statistics, TTA and post-hoc steps, the ensemble's method and weights), weights/*.safetensors
    (checksums verified on the way in and recorded) and arrays.npz (a stacking model).

    `onnx`: also each model as onnx/<id>.onnx (`_export_onnx`) for `predict(folder, runtime='onnx')`. `wheel`: also
    the wheel of this fastcls (`write_wheel`), so the folder alone installs and predicts on an offline machine.

    Raises:
        FastclsError: a weights file missing or altered; `out` exists and is not empty; onnx/onnxruntime missing
            (with `onnx`); the wheel cannot be built (with `wheel`). Nothing is left half-written.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FastclsError(f"--out {out} exists and is not empty; give a new folder.")
    man, arrays = manifest(store if isinstance(store, RunStore) else RunStore(store), ref)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "weights").mkdir(parents=True)
    try:
        for m in man["members"]:
            for n in m["nets"]:
                src = Path(n["weights"])
                if not src.is_file():
                    raise FastclsError(f"Weights file {src} (run {n['id']}) is missing; nothing was exported.")
                dst = tmp / "weights" / f"{n['id']}.safetensors"
                shutil.copyfile(src, dst)
                digest = file_sha256(dst)
                if n.get("sha256") and digest != n["sha256"]:
                    raise FastclsError(f"Weights file {src} (run {n['id']}) does not match the checksum recorded "
                                       "when it was stored: it was altered or damaged. Nothing was exported.")
                if onnx:
                    n["onnx"] = _export_onnx({**n, "weights": str(dst), "sha256": digest}, len(man["vocab"]), tmp)
                n["weights"], n["sha256"] = f"weights/{dst.name}", digest
                n.pop(VERIFIED, None)  # the bundle's reader checks its copy again
        if arrays:
            with open(tmp / "arrays.npz", "wb") as f:
                np.savez(f, **arrays)
        if wheel:
            write_wheel(tmp)
        write_json(tmp / MANIFEST, man)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

