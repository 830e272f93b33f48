"""Competition metrics on quickdraw-longtail: hill climbing on the competition's metric vs on accuracy (or the
recipe's monitor), calibrated vs not.

Trains `--runs` simple_cnn runs of the `quickdraw` recipe (28 px, `--epochs` epochs, one seed so they share the
validation split, dropout ps 0.1 / 0.25 / 0.5 / ..., its own imbalance handling and monitor) on `../shared/data/quickdraw-longtail`, then ensembles them with `fastcls.ensemble`
optimising each metric in turn, with and without temperature scaling, and scores every ensemble on the balanced test
set (`test_solution.npz`, never used for fitting anything): MAP@3, log loss, accuracy, ECE. The valid split is a
slice of the long-tailed training set, so what is fitted on it is fitted on a distribution unlike the test set's.

    python bench/bench_metrics.py                 # the docs table (3 runs, 3 epochs)
    python bench/bench_metrics.py --epochs 2      # a quick look
    # the table and timings also go to bench/results/metrics.json (--out)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcls.config import RunConfig  # noqa: E402
from fastcls.data import read_items  # noqa: E402
from fastcls.ensemble import ensemble  # noqa: E402
from fastcls.metrics import score  # noqa: E402
from fastcls.posthoc import apply_temperature, fit_temperature  # noqa: E402
from fastcls.predict import run_tta_beta, tta_blend  # noqa: E402
from fastcls.recipe import get_recipe  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.train import fit_run  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "quickdraw-longtail"
PS = (0.1, 0.25, 0.5, 0.0, 0.4)
TEST_METRICS = ("map@3", "log_loss", "accuracy", "balanced_accuracy", "ece")


def test_scores(y, probs) -> dict:
    return {f"test {m}": score(m, y, probs) for m in TEST_METRICS}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "metrics.json", help="JSON file for the "
                    "table (rows as records) and the timings.")
    ap.add_argument("--store", type=Path, default=None, help="Keep the trained runs here and reuse them on a rerun "
                    "(default: a temporary folder).")
    args = ap.parse_args()
    recipe = get_recipe("quickdraw").override(size=28, epochs=args.epochs, tta=2)
    items = read_items(recipe, args.data)
    t0 = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore(args.store or Path(tmp) / "runs")
        ids = []
        for ps in PS[:args.runs]:
            name = f"bench-metrics-ps{ps}-e{args.epochs}"
            ids.append(store.find(name) or fit_run(RunConfig(recipe.override(ps=ps), "simple_cnn", str(args.data),
                                                             seed=0, name=name), store, progress="none",
                                                   items=items).run_id)
        train_s = time.time() - t0
        runs = [store.load(r) for r in ids]
        vocab = list(runs[0].vocab)
        label_of = dict(zip(items.test["id"].astype(str), items.test["label"].astype(str)))
        y_test = np.array([vocab.index(label_of[str(i)]) for i in runs[0].test_ids])
        for i, run in enumerate(runs):  # the members alone, raw and temperature-scaled on valid
            b = run_tta_beta(run.meta)  # the blend the run chose on valid
            valid, test = tta_blend(np.asarray(run.valid_probs), b), tta_blend(np.asarray(run.test_probs), b)
            t = fit_temperature(valid, run.valid_targets)
            rows.append({"what": f"member {i}", "optimised": "-", "calibrated": "no", **test_scores(y_test, test)})
            rows.append({"what": f"member {i}", "optimised": "-", "calibrated": f"T={t:.2f}",
                         **test_scores(y_test, apply_temperature(test, t))})
        for method, metrics in (("mean", [None]), ("hill", [None, "accuracy", "map@3", "log_loss"])):
            for metric in metrics:
                for cal in (False, True):
                    res = ensemble(store, ids, method=method, metric=metric, calibrate=cal, n_boot=0)
                    m = store.load(res.run_id).metrics
                    rows.append({"what": f"{method} ensemble", "optimised": res.metric if method == "hill" else "-",
                                 "calibrated": f"T={m['temperature']:.2f}" if cal else "no",
                                 f"valid {res.metric} (cv)": res.score,
                                 **test_scores(y_test, res.test_probs)})
    df = pd.DataFrame(rows)
    df = df[[c for c in df.columns if not c.startswith("valid")] + [c for c in df.columns if c.startswith("valid")]]
    pd.set_option("display.width", 200)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n{args.runs} runs x {args.epochs} epochs of simple_cnn at 28 px trained (or reused) in {train_s:.0f} s; "
          f"{time.time() - t0:.0f} s in all")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(["python", "bench/bench_metrics.py", *sys.argv[1:]]),
                                    "runs": args.runs, "epochs": args.epochs, "train_s": round(train_s, 1),
                                    "total_s": round(time.time() - t0, 1),
                                    "rows": df.replace({np.nan: None}).to_dict(orient="records")}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
