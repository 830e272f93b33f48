"""The ONNX predictor of an exported bundle: one model's views with onnxruntime, numpy and PIL only (neither torch,
fastai nor timm is imported).

`fastcls export --onnx` writes each model as `onnx/<run id>.onnx` (opset 17, dynamic batch axis, softmax included)
and records in the manifest what its item pipeline needs (`net['onnx']`: file, SHA-256, size, crop, trim margins; the
normalisation statistics are `net['stats']`). `net_views` decodes each image as training does (`fastcls.imageio`),
crops, squish-resizes and normalises it in numpy exactly as the fastai pipeline does on the CPU, and runs the model in
batches. `fastcls.inference.predict(..., runtime='onnx')` then applies the same TTA blend, post-hoc steps and
ensemble method as the torch runtime.
"""

__all__ = ["OPSET", "require", "net_views"]

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import FastclsError
from .files import file_sha256
from .imageio import batches, normalise

OPSET = 17
INSTALL = "pip install 'fastcls[onnx]' (or: pip install onnx onnxruntime)"


def require(module: str):
    """Import `module` ('onnx' or 'onnxruntime'), or a FastclsError saying how to install it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FastclsError(f"The ONNX runtime needs the Python package {module!r}, which is not installed: "
                           f"{INSTALL}. Nothing was written.") from None


def _session(net: dict):
    """An onnxruntime session of the net's ONNX file, its checksum verified; CPU threads from OMP_NUM_THREADS."""
    ort = require("onnxruntime")
    spec = net.get("onnx")
    if not spec:
        raise FastclsError(f"Model {net['id']} of this bundle has no ONNX file: export it with `fastcls export "
                           "--onnx`, or predict with --runtime torch.")
    path = Path(spec["file"])
    if not path.is_file():
        raise FastclsError(f"ONNX file {path} (run {net['id']}) is missing; nothing was written.")
    if spec.get("sha256") and file_sha256(path) != spec["sha256"]:
        raise FastclsError(f"ONNX file {path} (run {net['id']}) does not match the checksum recorded at export: it "
                           "was altered or damaged. Nothing was written; export the run again.")
    opts = ort.SessionOptions()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit():
        opts.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def net_views(net: dict, n: int, image: Callable, bs: int = 64, tick: Optional[Callable] = None) -> np.ndarray:
    """(1, n, C) float32 probabilities of one exported model on `n` images (`image(i)` -> RGB PIL image): its plain
    view, in batches of `bs`; `tick(k)` is called after each batch of k images."""
    sess = _session(net)
    spec, stats = net["onnx"], net.get("stats")
    name = sess.get_inputs()[0].name
    out = []
    for b in batches(n, image, bs, spec["size"], spec.get("crop") or "none", spec.get("trim") or (0, 0, 0, 0)):
        x = normalise(b, stats)
        out.append(sess.run(None, {name: x})[0].astype(np.float32))
        if tick is not None:
            tick(len(x))
    return np.concatenate(out)[None]
