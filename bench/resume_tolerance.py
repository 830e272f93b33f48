"""How close a resumed run comes to an uninterrupted one with the same seed: prints the largest differences.

    python bench/resume_tolerance.py [--epochs 3] [--point after-epoch-0] [--threads 1] [--arch simple_cnn] [--size 16]

Trains the reference run, then the same config interrupted at the fault point (`FASTCLS_FAULT=<point>:interrupt`)
and resumed with `resume_run`, and compares weights, validation and test probabilities, metrics and history.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fastcls.train.checkpoint import RunInterrupted  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.train import fit_run, resume_run  # noqa: E402


def outputs(store, rid):
    r = store.load(rid)
    return {"valid_probs": np.array(r.valid_probs), "test_probs": np.array(r.test_probs),
            "weights": {k: v.numpy() for k, v in load_file(r.weights_path).items()}, "metrics": r.metrics,
            "history": r.history.drop(columns=["time"], errors="ignore")}


def differences(a, b) -> dict:
    """Largest absolute differences between two runs' outputs (0.0 means bitwise equal)."""
    w = max(float(np.abs(a["weights"][k].astype(np.float64) - b["weights"][k]).max(initial=0)) for k in a["weights"])
    num = [c for c in a["history"].columns if a["history"][c].dtype.kind in "fi"]
    return {"weights": w, "valid_probs": float(np.abs(a["valid_probs"] - b["valid_probs"]).max()),
            "test_probs": float(np.abs(a["test_probs"] - b["test_probs"]).max()),
            "metrics": max(abs(a["metrics"][k] - b["metrics"][k]) for k in a["metrics"]
                           if isinstance(a["metrics"][k], (int, float)) and k in b["metrics"]),
            "history": float(np.abs(a["history"][num].to_numpy() - b["history"][num].to_numpy()).max())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--point", default="after-epoch-0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--sample", type=int, default=300)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = RunConfig.from_options("digits", a.arch, seed=3, sample=a.sample, size=a.size, epochs=a.epochs,
                                 freeze_epochs=0, bs=16, tta=1, pretrained=False)
    store = RunStore(tempfile.mkdtemp())
    t0 = time.time()
    ref = fit_run(cfg, store, progress="none").run_id
    t1 = time.time()
    os.environ["FASTCLS_FAULT"] = f"{a.point}:interrupt"
    try:
        fit_run(cfg, store, progress="none")
        raise SystemExit(f"fault point {a.point} was never reached")
    except RunInterrupted as e:
        rid = e.run_id
    del os.environ["FASTCLS_FAULT"]
    resume_run(store, rid, progress="none")
    d = differences(outputs(store, ref), outputs(store, rid))
    print(f"{a.arch} size {a.size}, {a.epochs} epochs, {a.threads} thread(s), interrupted at {a.point}; reference run "
          f"{t1 - t0:.1f} s")
    for k, v in d.items():
        print(f"  max |difference| {k:12s} {v:.3g}")


if __name__ == "__main__":
    main()
