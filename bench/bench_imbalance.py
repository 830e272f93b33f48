"""Imbalance toolkit quality on real long-tailed data: plain training vs each option vs the quickdraw recipe default.

Every configuration trains the same arch, image size, epochs, lr, batch size and seeds on
`../shared/data/quickdraw-longtail` (train: 1000 down to 10 images per class) and is scored on its balanced test
set (`test_solution.npz`, 500 per class, never used for training or tuning). Post-hoc steps (logit adjustment,
thresholds) are tuned on the validation split only. Prints a table (mean and spread over seeds) and writes
`bench/results/imbalance.json`.

Each finished run is appended to a cache (`--cache`, keyed by the full resolved recipe, arch and seed), so an
interrupted bench resumes and a configuration identical to another (e.g. the recipe default) is trained once.

    python bench/bench_imbalance.py                       # the README table
    python bench/bench_imbalance.py --seeds 0 --epochs 3  # a quick look
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

from fastcls.data import read_items  # noqa: E402
from fastcls.recipe import get_recipe  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402
from fastcls.train import fit_run

DATA = ROOT.parent / "shared" / "data" / "quickdraw-longtail"

# name -> recipe overrides on top of the shared settings; "plain" has every imbalance tool off
CONFIGS = {
    "plain": dict(imbalance="none", label_smoothing=0.0, tune_thresholds=False),
    "weights": dict(imbalance="weights", label_smoothing=0.0, tune_thresholds=False),
    "focal": dict(imbalance="focal", label_smoothing=0.0, tune_thresholds=False),
    "oversample": dict(imbalance="oversample", label_smoothing=0.0, tune_thresholds=False),
    "logit-adjust": dict(imbalance="logit-adjust", label_smoothing=0.0, tune_thresholds=False),
    "tune-thresholds": dict(imbalance="none", label_smoothing=0.0, tune_thresholds=True),
    "label-smoothing 0.1": dict(imbalance="none", label_smoothing=0.1, tune_thresholds=False),
    "oversample +ls": dict(imbalance="oversample", label_smoothing=0.1, tune_thresholds=False),
    "focal,oversample": dict(imbalance="focal,oversample", label_smoothing=0.0, tune_thresholds=False),
    "weights,logit-adjust +ls": dict(imbalance="weights,logit-adjust", label_smoothing=0.1, tune_thresholds=False),
    "oversample,logit-adjust +ls": dict(imbalance="oversample,logit-adjust", label_smoothing=0.1,
                                        tune_thresholds=False),
    "recipe default": dict(),  # the quickdraw recipe's own imbalance, label smoothing and thresholds settings
}


def _normal_key(key: dict) -> str:
    # recipe settings that are None (off) are left out, so a recipe field added later with a None default (e.g.
    # cache_budget) does not orphan the runs cached before it existed
    return json.dumps({**key, "recipe": {k: v for k, v in key["recipe"].items() if v is not None}}, sort_keys=True,
                      default=str)


def cache_key(recipe, arch, seed) -> str:
    # CPU results depend on the thread count (reduction order), so it is part of what a run is
    key = {"recipe": recipe.to_dict(), "arch": arch, "seed": seed, "threads": torch.get_num_threads()}
    return _normal_key(json.loads(json.dumps(key, default=str)))


def load_cache(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_normal_key(json.loads(r["key"])): r["result"] for r in rows}


def run_one(recipe, arch, items, seed, store) -> dict:
    t0 = time.time()
    res = fit_run(RunConfig(recipe, arch, seed=seed), store, progress="none", items=items)
    m = res.metrics
    return {"seed": seed, "test_macro_f1": m["test_macro_f1"], "test_accuracy": m["test_accuracy"],
            "test_macro_f1_raw": m.get("test_macro_f1_raw", m["test_macro_f1"]),
            "valid_macro_f1": m["macro_f1"], "tau": m.get("logit_adjust_tau"), "best_epoch": m["best_epoch"],
            "seconds": time.time() - t0}


def _records(df: pd.DataFrame) -> list:
    """Rows as dicts with None for missing values (strict JSON has no NaN)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in df.to_dict("records")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=None, help="max learning rate (default: the recipe's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), help="subset of: " + ", ".join(CONFIGS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "imbalance.json")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "fastcls-bench-imbalance.jsonl",
                    help="finished runs (JSON lines); delete it to retrain everything")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is reproducible and fair on a "
                                                           "contended machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.exists():
        sys.exit(f"{args.data} is absent: this benchmark needs the shared quickdraw-longtail data.")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")

    base = get_recipe("quickdraw")
    shared = dict(size=args.size, epochs=args.epochs, tta=0)  # tta off: only the plain view is scored
    if args.lr:
        shared["lr"] = args.lr
    items = read_items(base, args.data)
    rows, t_all = [], time.time()
    cache = load_cache(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(Path(tmp) / "runs")
        for seed in args.seeds:  # seed-major: a first full table early, more seeds after
            for name in args.configs:
                recipe = base.override(**shared, **CONFIGS[name])
                key = cache_key(recipe, args.arch, seed)
                cached = key in cache
                if not cached:
                    cache[key] = run_one(recipe, args.arch, items, seed, store)
                    with args.cache.open("a") as f:
                        f.write(json.dumps({"key": key, "result": cache[key]}, default=float) + "\n")
                r = dict(cache[key], config=name, imbalance=recipe.imbalance, label_smoothing=recipe.label_smoothing,
                         tune_thresholds=recipe.tune_thresholds)
                rows.append(r)
                print(f"{name:28s} seed {seed}  test macro-F1 {r['test_macro_f1']:.4f}  test acc "
                      f"{r['test_accuracy']:.4f}  ({r['seconds']:.0f} s{', cached' if cached else ''})", flush=True)
    df = pd.DataFrame(rows)
    g = df.groupby("config", sort=False)
    table = pd.DataFrame({
        "imbalance": g["imbalance"].first(), "ls": g["label_smoothing"].first(),
        "thresholds": g["tune_thresholds"].first(), "test_macro_f1": g["test_macro_f1"].mean(),
        "f1_min": g["test_macro_f1"].min(), "f1_max": g["test_macro_f1"].max(),
        "test_accuracy": g["test_accuracy"].mean(), "valid_macro_f1": g["valid_macro_f1"].mean(),
        "tau": g["tau"].mean(), "s_per_run": g["seconds"].mean()})
    if "plain" in table.index:
        table.insert(4, "vs_plain", table["test_macro_f1"] - table.loc["plain", "test_macro_f1"])
    pd.set_option("display.width", 200)
    lr = shared.get("lr", base.lr)
    print(f"\n{args.arch}, {args.size} px, {args.epochs} epochs, lr {lr}, bs {base.bs}, wd {base.wd}, "
          f"seeds {args.seeds}; test = balanced test_solution (3000 images); valid = 20% stratified split of train")
    print(table.round(4).to_string())
    print(f"this invocation {time.time() - t_all:.0f} s; training time of the runs in the table "
          f"{df['seconds'].sum():.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {"arch": args.arch, "size": args.size, "epochs": args.epochs, "seeds": args.seeds, "lr": lr,
                     "bs": base.bs, "wd": base.wd, "data": str(args.data), "torch_threads": torch.get_num_threads(),
                     "machine": platform.processor() or platform.machine(),
                     "recipe_default": {"imbalance": base.imbalance, "label_smoothing": base.label_smoothing,
                                        "tune_thresholds": base.tune_thresholds}},
        "summary": _records(table.reset_index()), "runs": _records(df),
        "run_seconds": float(df["seconds"].sum())}, indent=1, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
