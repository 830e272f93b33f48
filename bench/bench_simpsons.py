"""Quality figure: macro-F1 of the `simpsons` recipe's default schedule, from scratch, on ../shared/data/simpsons.

The recipe's schedule (one-cycle, early stopping on macro-F1 with patience 5, augmentation, 4 TTA views, best epoch
kept), except: no pretrained weights (none can be downloaded here, so the 3 frozen epochs do not apply), a smaller
image size (default 96 instead of 224) and at most 12 epochs instead of 30, to keep the run to about 8 CPU-minutes
(31 min wall on the shared 2-core development machine); `--size 224 --epochs 30` is the recipe as is. The test score is against
`test_solution.csv`; the submission is also written in the recipe's format and re-scored from the CSV.

    python bench/bench_simpsons.py [--arch resnet18] [--size 96] [--epochs 12] [--seed 42] [--data PATH]

Prints the figures and writes bench/results/simpsons.json.
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from sklearn.metrics import f1_score

from fastcls.predict import run_tta_beta, tta_blend
from fastcls.recipe import get_recipe
from fastcls.runs import RunStore
from fastcls.submission import write_submission
from fastcls.config import RunConfig
from fastcls.train import fit_run

HERE = Path(__file__).resolve().parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "simpsons"))
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=str(HERE / "results" / "simpsons.json"))
    args = ap.parse_args()
    data = Path(args.data)
    recipe = get_recipe("simpsons").override(size=args.size, epochs=args.epochs, pretrained=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        res = fit_run(RunConfig(recipe, args.arch, str(data), seed=args.seed), RunStore(Path(tmp) / "runs"),
                      progress="line")
        seconds = time.time() - t0
        run = RunStore(Path(tmp) / "runs").load(res.run_id)
        sub = write_submission(recipe, run.test_ids, tta_blend(run.test_probs, run_tta_beta(run.meta)), run.vocab, Path(tmp) / "sub.csv",
                               data=data)
    truth = pd.read_csv(data / "test_solution.csv").set_index("Id")["Expected"]
    from_csv = f1_score(truth.loc[sub["Id"]].values, sub["Expected"].values, average="macro")
    m = res.metrics
    out = {
        "what": "simpsons recipe, default schedule from scratch (no pretrained weights here); test vs test_solution.csv",
        "arch": args.arch, "size": args.size, "seed": args.seed, "pretrained": False,
        "schedule": {"max_epochs": recipe.epochs, "patience": recipe.patience, "lr": recipe.lr, "bs": recipe.bs,
                     "tta_views": recipe.tta, "aug": recipe.aug},
        "epochs_run": len(res.history), "best_epoch": m["best_epoch"], "n_train": m["n_train"], "n_valid": m["n_valid"],
        "valid_macro_f1": round(m["macro_f1"], 4), "valid_accuracy": round(m["accuracy"], 4),
        "test_macro_f1": round(m["test_macro_f1"], 4), "test_macro_f1_tta": round(m["test_macro_f1_tta"], 4),
        "submission_macro_f1": round(float(from_csv), 4),
        "seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
