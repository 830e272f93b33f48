"""Architecture registry: name -> body factory (timm, or a small custom CNN), splitter, default size.

A model is `nn.Sequential(body, head)`: the body returns a feature map, the head is fastai's `create_head`
(concat pooling, batch norm, dropout `ps`, linear). The splitter cuts the body into stages with timm's own
`group_matcher`, so `slice(lo, hi)` spreads learning rates over at least 3 parameter groups.
"""

__all__ = ["ArchSpec", "ARCHS", "register_arch", "get_arch", "build_model", "build_body", "make_head", "split_head",
           "check_size", "splitter", "SimpleCNN", "fc_head", "resolve_weights", "weights_dir", "read_weights",
           "match_body", "add_weights", "list_weights", "drop_path_rate"]

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .errors import FastclsError, suggest


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


ARCHS: dict[str, ArchSpec] = {}


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add `spec` to the registry (one entry per arch; tests walk the registry)."""
    ARCHS[spec.name] = spec
    return spec


def get_arch(name: str) -> ArchSpec:
    """The registered arch `name`, or a clear error with close names."""
    if name not in ARCHS:
        raise FastclsError(f"Unknown architecture {name!r}.{suggest(name, ARCHS)} List them with `fastcls archs`.")
    return ARCHS[name]


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


# -- pretrained weights ----------------------------------------------------------------------------------------------
def weights_dir() -> Path:
    """The local weights folder: $FASTCLS_WEIGHTS, else ~/.cache/fastcls/weights."""
    return Path(os.environ.get("FASTCLS_WEIGHTS") or Path.home() / ".cache" / "fastcls" / "weights").expanduser()


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
    d = weights_dir()
    for stem in dict.fromkeys([spec.name, spec.timm_name or spec.name]):
        for ext in (".safetensors", ".pth", ".bin"):
            if (d / f"{stem}{ext}").is_file():
                return d / f"{stem}{ext}"
    if spec.timm_name is None:
        raise FastclsError(_missing_weights_msg(spec, d, "it has no published weights"))
    return "hub"


def _missing_weights_msg(spec: ArchSpec, d: Path, why: str) -> str:
    return (f"No pretrained weights for {spec.name}: {why}, and no local file {d / (spec.name + '.safetensors')} "
            f"(or .pth) was found. Put the file there with `fastcls weights add FILE --arch {spec.name}` (folder set "
            f"by FASTCLS_WEIGHTS), pass --weights FILE, or train from scratch with --no-pretrained.")


def _body(spec: ArchSpec, source, drop_path: float = 0.0) -> nn.Module:
    if spec.factory is not None:
        body = spec.factory()
        if isinstance(source, Path):
            body.load_state_dict(match_body(read_weights(source), body, spec, source))
        return body
    import timm
    kw = dict(num_classes=0, global_pool="")
    if drop_path:
        kw["drop_path_rate"] = drop_path
    if source is None or isinstance(source, Path):
        body = _create(spec.timm_name, False, kw)
        if isinstance(source, Path):  # loaded here, strictly: timm's own file loading ignores missing keys
            body.load_state_dict(match_body(read_weights(source), body, spec, source))
        return body
    offline = not _hub_reachable()
    try:
        with _hub_offline(offline):  # offline: only timm's local cache is tried, instead of ~50 s of retries
            return _create(spec.timm_name, True, kw)
    except Exception as e:  # timm raises many kinds (hub offline, connection, missing file): all mean "not here"
        why = "the model hub is unreachable and timm's cache has no copy" if offline else \
            f"downloading them through timm failed ({type(e).__name__})"
        raise FastclsError(_missing_weights_msg(spec, weights_dir(), why)) from None


def _create(timm_name: str, pretrained: bool, kw: dict) -> nn.Module:
    """timm.create_model; an arch without stochastic depth is built without its `drop_path_rate`."""
    import timm
    try:
        return timm.create_model(timm_name, pretrained=pretrained, **kw)
    except TypeError as e:
        if "drop_path_rate" not in str(e):
            raise
        return timm.create_model(timm_name, pretrained=pretrained, **{k: v for k, v in kw.items()
                                                                       if k != "drop_path_rate"})


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


def read_weights(path) -> dict:
    """A state dict from a safetensors file or a weights-only torch file; never an arbitrary pickle.

    `torch.load(weights_only=True)` refuses a pickle that would build any object but tensors and plain containers
    (a pickle can run code when loaded): such a file is refused with a FastclsError.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise FastclsError(f"Refused to load {path}: it is not a plain weights file ({str(e).splitlines()[0][:200]}). "
                           "Pickled Python objects can run code when loaded, so fastcls only reads tensors. Convert "
                           "it to safetensors in a trusted environment, or use a safetensors file.") from None
    except Exception as e:  # safetensors / torch raise several kinds for a damaged or foreign file
        raise FastclsError(f"Cannot read weights file {path}: {type(e).__name__}: {str(e)[:300]}. Give a .safetensors "
                           "or .pth/.bin file of tensors.") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers around the tensors
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise FastclsError(f"{path} holds no state dict of tensors (found {type(sd).__name__}).")
    return dict(sd)


def match_body(sd: dict, body: nn.Module, spec: ArchSpec, source="weights") -> dict:
    """`sd` renamed to the keys of `body`, or a FastclsError naming the keys that differ.

    Accepts a bare body, a whole timm/torchvision model (its classifier is dropped), a DataParallel `module.`
    prefix, and a fastcls model (`0.` body, `1.` head) such as a stored run's model.safetensors.
    """
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    if sd and all(k.split(".")[0] in ("0", "1") for k in sd):
        sd = {k[2:]: v for k, v in sd.items() if k.startswith("0.")}
    want = body.state_dict()
    clf = (getattr(body, "pretrained_cfg", None) or {}).get("classifier") or ()
    clf = (clf,) if isinstance(clf, str) else tuple(clf)
    sd = {k: v for k, v in sd.items() if k in want or not any(k.startswith(c + ".") for c in clf)}
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    extra = sorted((k for k in sd if k not in want), key=lambda k: k.endswith("num_batches_tracked"))  # weights first
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})" for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or extra or shapes:
        parts = [f"{len(v)} {what}: {', '.join(v[:6])}{', ...' if len(v) > 6 else ''}"
                 for what, v in (("missing", missing), ("unexpected", extra), ("with another shape", shapes)) if v]
        raise FastclsError(f"{source} does not fit {spec.name}: keys {'; '.join(parts)}. Is it the weights file of "
                           f"{spec.name}?")
    for k, v in want.items():
        sd.setdefault(k, v)  # BatchNorm step counters, absent from older files
    return sd


def add_weights(file, arch: str, force: bool = False) -> Path:
    """Check `file` against `arch`'s body and copy it into the weights folder as `<arch>.safetensors`.

    A .pth/.bin file is converted to safetensors; the copy is written atomically, so a failed add leaves no file.

    Returns:
        The path of the stored file, which `--pretrained` then uses offline.
    """
    from safetensors.torch import save_file

    from .files import write_atomic
    spec = get_arch(arch)
    file = Path(file).expanduser()
    if not file.is_file():
        raise FastclsError(f"Weights file {file} does not exist.")
    sd = match_body(read_weights(file), _body(spec, None), spec, file)
    dest = weights_dir() / f"{spec.name}.safetensors"
    if dest.exists() and not force:
        raise FastclsError(f"{dest} already exists; pass --force to replace it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}
    write_atomic(dest, lambda p: save_file(tensors, str(p), metadata={"arch": spec.name, "source": file.name}))
    return dest


def list_weights():
    """The files in the weights folder as a DataFrame: file, arch it serves, format, size."""
    import pandas as pd
    d = weights_dir()
    by_stem = {s: a.name for a in ARCHS.values() for s in (a.name, a.timm_name) if s}
    files = [p for p in sorted(d.glob("*")) if p.suffix in (".safetensors", ".pth", ".bin") and p.is_file()] \
        if d.is_dir() else []
    rows = [{"file": p.name, "arch": by_stem.get(p.stem, ""), "format": p.suffix.lstrip("."),
             "size_mb": round(p.stat().st_size / 2**20, 1)} for p in files]
    return pd.DataFrame(rows, columns=["file", "arch", "format", "size_mb"])


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


def splitter(model: nn.Sequential) -> list:
    """Parameter groups: the body's stages (by timm's group_matcher) cut into `body_groups` chunks, then the head."""
    from timm.models import group_parameters
    body, head = model[0], model[1]
    n_chunks = getattr(model, "body_groups", 2)
    groups = group_parameters(body, body.group_matcher(coarse=True))
    params = dict(body.named_parameters())
    ordered = [[params[n] for n in names] for _, names in sorted(groups.items())]
    ordered = [g for g in ordered if g]
    n = min(n_chunks, len(ordered))
    bounds = [round(i * len(ordered) / n) for i in range(n + 1)]
    chunks = [sum(ordered[bounds[i]:bounds[i + 1]], []) for i in range(n)]
    return chunks + [list(head.parameters())]
