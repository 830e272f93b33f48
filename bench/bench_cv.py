"""K-fold, noisy student and distillation on real long-tailed data: test macro-F1 of each, on one CPU thread.

On `../shared/data/quickdraw-longtail` (train: 1000 down to 10 images per class; test: balanced, 500 per class,
scored with `test_solution.npz`, never used for training or tuning) with the quickdraw recipe at 28 px, simple_cnn,
`--epochs` epochs, seed 0, one torch thread:

- one run;
- its 5-fold cv run (out-of-fold valid, fold-averaged test probabilities);
- one noisy-student round (`pseudo_label`, threshold 0.9) with that run as teacher;
- a 3-run ensemble (mean; the run plus two more at ps 0.1 and 0.5, same split) and its distilled student
  (`distill --unlabeled`: soft targets on the test items, since the members' validation items are the student's);
- a student distilled from the cv run's out-of-fold probabilities (soft targets on every training item).

Prints the table and writes `bench/results/cv.json`.

    python bench/bench_cv.py              # the README table (about 12 min on a 2-core CPU)
    python bench/bench_cv.py --epochs 2   # a quick look
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

from fastcls.experiments.cv import run_cv  # noqa: E402
from fastcls.data import read_items  # noqa: E402
from fastcls.ensemble import ensemble  # noqa: E402
from fastcls.recipe import get_recipe  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.experiments.student import distill, pseudo_label  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402
from fastcls.train import fit_run

DATA = ROOT.parent / "shared" / "data" / "quickdraw-longtail"


def _row(what: str, run, seconds: float, **extra) -> dict:
    m = run.metrics
    return {"what": what, "run": run.id, "kind": run.kind, "test_macro_f1": m.get("test_macro_f1"),
            "test_macro_f1_tta": m.get("test_macro_f1_tta"), "valid_macro_f1": m.get("macro_f1"),
            "n_valid": len(run.valid_ids), "seconds": round(seconds, 1), **extra}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--runs", type=Path, default=None, help="run store (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cv.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    store = RunStore(args.runs or tmp.name)
    recipe = get_recipe("quickdraw").override(size=28, epochs=args.epochs)
    items = read_items(recipe, DATA)
    cfg = RunConfig(recipe, "simple_cnn", data=str(DATA), seed=0)
    rows = []

    t = time.time()
    one = fit_run(cfg, store, progress="none", items=items)
    rows.append(_row("one run", store.load(one.run_id), time.time() - t))
    print(rows[-1], flush=True)

    t = time.time()
    cv = run_cv(cfg, store, args.folds, progress="none", items=items)
    rows.append(_row(f"{args.folds}-fold cv run (OOF valid)", store.load(cv.run_id), time.time() - t))
    print(rows[-1], flush=True)

    t = time.time()
    pl = pseudo_label(store, [one.run_id], args.threshold, 1, progress="none", items=items)
    info = store.load(pl.run_ids[0]).meta["pseudo"]
    rows.append(_row(f"pseudo-label round 1 (threshold {args.threshold})", store.load(pl.run_ids[0]),
                     time.time() - t, pseudo_labels=info["pseudo"]))
    print(rows[-1], flush=True)

    t = time.time()
    members = [one.run_id]
    for ps in (0.1, 0.5):
        members.append(fit_run(RunConfig(recipe.override(ps=ps), "simple_cnn", data=str(DATA), seed=0), store,
                               progress="none", items=items).run_id)
    ens = ensemble(store, members, "mean", n_boot=0)
    # the ensemble run stores no test score: score its test probabilities like the runs'
    from fastcls.metrics import get_metric
    from fastcls.predict import encode_labels
    test = items.test.set_index(items.test["id"].astype(str))
    y = encode_labels(test.loc[ens.test_ids, "label"], store.load(one.run_id).vocab)
    ens_row = {"what": "3-run ensemble (mean; ps 0.25, 0.1, 0.5)", "run": ens.run_id, "kind": "ensemble",
               "test_macro_f1": get_metric("macro_f1")(y, ens.test_probs), "test_macro_f1_tta": None,
               "valid_macro_f1": None, "n_valid": len(ens.valid_ids), "seconds": round(time.time() - t, 1)}
    rows.append(ens_row)
    print(rows[-1], flush=True)

    t = time.time()
    d = distill(store, [ens.run_id], "simple_cnn", temperature=2.0, alpha=0.5, unlabeled=True, progress="none",
                items=items)
    rows.append(_row("distilled student of the 3-run ensemble (--unlabeled, T=2, alpha=0.5)",
                     store.load(d.run_ids[0]), time.time() - t))
    print(rows[-1], flush=True)

    t = time.time()
    d2 = distill(store, [cv.run_id], "simple_cnn", temperature=2.0, alpha=0.5, progress="none", items=items)
    rows.append(_row("distilled student of the cv run (OOF soft targets, T=2, alpha=0.5)",
                     store.load(d2.run_ids[0]), time.time() - t))
    print(rows[-1], flush=True)

    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(df.drop(columns=["run"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python bench/bench_cv.py" + (f" --epochs {args.epochs}" if args.epochs != 6 else ""),
        "setup": {"data": "quickdraw-longtail", "arch": "simple_cnn", "size": 28, "epochs": args.epochs, "seed": 0,
                  "folds": args.folds, "threshold": args.threshold, "torch_threads": 1,
                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": json.loads(df.to_json(orient="records"))}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
