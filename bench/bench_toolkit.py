"""The training toolkit's options on real long-tailed data: each option against the recipe's own settings, at equal
epochs, 3 seeds (mean and range), from scratch, scored on the balanced test set.

Every configuration trains `simple_cnn` from scratch at the same size, epochs, lr and batch size on
`../shared/data/quickdraw-longtail` (train: 1000 down to 10 images per class) and is scored on its balanced test set
(`test_solution.npz`, 500 per class, never used to train or tune). The baseline is the quickdraw recipe as it is
(its imbalance settings included); each other row changes one option. The baseline also stores the `flip` TTA view,
so its "+ flip TTA" row (the fastai blend 0.25 plain + 0.75 flip) costs no training. Finished runs are cached
(`--cache`) like bench_imbalance.py's, so an interrupted bench resumes.

    python bench/bench_toolkit.py                         # the docs/benchmarks.md table
    python bench/bench_toolkit.py --seeds 0 --epochs 2    # a quick look
"""

import argparse
import json
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

# name -> recipe overrides on top of the baseline (the quickdraw recipe at the bench's size and epochs)
CONFIGS = {
    "baseline": {},
    "--mixup 0.4": dict(mixup=0.4),
    "--ema 0.99": dict(ema=0.99),
    "--accum 2": dict(accum=2),
    "--size 20,28": dict(progressive_sizes=(20,)),
    "--imbalance ldam,drw": dict(imbalance="ldam,drw"),
    "--imbalance soft-f1": dict(imbalance="soft-f1", label_smoothing=0.0),
}


def run_one(recipe, arch, items, seed, store) -> dict:
    t0 = time.time()
    m = fit_run(RunConfig(recipe, arch, seed=seed), store, progress="none", items=items).metrics
    return {"seed": seed, "test_macro_f1": m["test_macro_f1"], "test_accuracy": m["test_accuracy"],
            "test_macro_f1_tta": m.get("test_macro_f1_tta"), "test_accuracy_tta": m.get("test_accuracy_tta"),
            "seconds": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "toolkit.json")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fastcls-bench-toolkit.jsonl")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.exists():
        sys.exit(f"{args.data} is absent: this benchmark needs the shared quickdraw-longtail data.")
    base = get_recipe("quickdraw").override(size=args.size, epochs=args.epochs, tta=0, tta_views=("flip",))
    items = read_items(base, args.data)
    rows, cache, t_all = [], load_cache(args.cache), time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        for seed in args.seeds:
            for name in args.configs:
                recipe = base.override(**CONFIGS[name])
                key = cache_key(recipe, args.arch, seed)
                if key not in cache:
                    cache[key] = run_one(recipe, args.arch, items, seed, store)
                    with args.cache.open("a") as f:
                        f.write(json.dumps({"key": key, "result": cache[key]}, default=float) + "\n")
                r = cache[key]
                rows.append(dict(r, config=name))
                if name == "baseline":  # the same run's flip view, blended as `fastcls submit` does
                    rows.append(dict(r, config="baseline + --tta-views flip", test_macro_f1=r["test_macro_f1_tta"],
                                     test_accuracy=r["test_accuracy_tta"], seconds=0.0))
                print(f"{name:24s} seed {seed}  test macro-F1 {r['test_macro_f1']:.4f}  ({r['seconds']:.0f} s)",
                      flush=True)
    df = pd.DataFrame(rows)
    g = df.groupby("config", sort=False)
    table = pd.DataFrame({"test_macro_f1": g["test_macro_f1"].mean(), "f1_min": g["test_macro_f1"].min(),
                          "f1_max": g["test_macro_f1"].max(), "test_accuracy": g["test_accuracy"].mean(),
                          "s_per_run": g["seconds"].mean()})
    table.insert(1, "vs_baseline", table["test_macro_f1"] - table.loc["baseline", "test_macro_f1"])
    pd.set_option("display.width", 200)
    print(f"\n{args.arch} from scratch, {args.size} px, {args.epochs} epochs, lr {base.lr}, bs {base.bs}, seeds "
          f"{args.seeds}; baseline: the quickdraw recipe (imbalance {base.imbalance!r}, label smoothing "
          f"{base.label_smoothing}); test = balanced test_solution (3000 images)")
    print(table.round(4).to_string())
    print(f"this invocation {time.time() - t_all:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {"arch": args.arch, "size": args.size, "epochs": args.epochs, "seeds": args.seeds, "lr": base.lr,
                     "bs": base.bs, "imbalance": base.imbalance, "label_smoothing": base.label_smoothing,
                     "data": str(args.data), "torch_threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine()},
        "summary": _records(table.reset_index()), "runs": _records(df)}, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
