"""A 5-value head-dropout sweep of the frozen stage: the cached-feature fast path against 5 full frozen runs.

Both sweeps train the same arch, data, image size, split, seed, frozen epochs, lr and batch size; each stores its
plain + TTA probabilities of the validation and test images. The full path is fastai's frozen stage (`fit_run` with
a weights file, so the body is frozen) on the images; the fast path runs the frozen body once per image and view,
caches the pooled features, and trains only the head on them. Prints both metric tables, the time ratio, and the time
of a second fast sweep (other ps values) that reuses the cache; writes `bench/results/sweep.json`.

No pretrained weights can be downloaded here, so the frozen body is a randomly initialised one, saved as a weights
file (what `--weights FILE` takes): the absolute metric is low, but both paths see the same body.

    python bench/bench_sweep.py                       # the README figure: imagenette-mini, resnet18, 64 px
    python bench/bench_sweep.py --data digits --arch simple_cnn --size 32
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcls.archs import build_body, get_arch  # noqa: E402
from fastcls.data import read_items  # noqa: E402
from fastcls.recipe import Recipe, get_recipe  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.experiments.sweep import plan_sweep, run_sweep  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402

IMAGENETTE = ROOT.parent / "shared" / "data" / "imagenette-mini"


def recipe_for(args) -> Recipe:
    common = dict(size=args.size, pretrained=False, epochs=0, freeze_epochs=args.epochs, lr=args.lr, bs=args.bs,
                  tta=args.tta)
    if args.data == "digits":
        return get_recipe("digits").override(**common)
    if not IMAGENETTE.is_dir():
        sys.exit(f"{IMAGENETTE} is absent; run with --data digits")
    # 600 train photos (10 classes), 20% held out for validation; the 200 'val' photos are the (unlabelled) test set
    return Recipe(name="imagenette-mini", layout="folder", data=str(IMAGENETTE), train_dir="train", test_dir="val",
                  flip=True, metric="accuracy", **common)


def random_weights_file(arch: str, folder: Path) -> Path:
    """A randomly initialised checkpoint of `arch` (with its classifier, like a downloaded one), as safetensors."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    spec = get_arch(arch)
    model = timm.create_model(spec.timm_name, pretrained=False) if spec.timm_name else build_body(arch)
    path = folder / f"{arch}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def sweep(base, ps, fast, store, items):
    t0 = time.perf_counter()
    res = run_sweep(plan_sweep(base, grid={"ps": ps}, fast=fast), store, progress="none", items=items)
    seconds = time.perf_counter() - t0
    t = res.table
    rows = [{"ps": float(r.ps), "accuracy": float(r.accuracy), "valid_loss": float(r.valid_loss),
             "seconds": float(r.time), "best": r.best == "best"} for r in t.itertuples()]
    return {"seconds": round(seconds, 2), "rows": rows, "features": res.record.get("features", {}),
            "best_ps": next(r["ps"] for r in rows if r["best"])}


def show(name, res):
    print(f"\n{name}: {res['seconds']:.1f} s")
    print(f"{'ps':>6} {'accuracy':>9} {'valid_loss':>11} {'time s':>8}")
    for r in res["rows"]:
        print(f"{r['ps']:>6g} {r['accuracy']:>9.4f} {r['valid_loss']:>11.4f} {r['seconds']:>8.1f}"
              + ("   <- best" if r["best"] else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=["imagenette", "digits"], default="imagenette")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="frozen epochs (= cached augmented train views)")
    p.add_argument("--ps", default="0,0.1,0.25,0.5,0.75")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--tta", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ps = tuple(float(v) for v in args.ps.split(","))
    recipe = recipe_for(args)
    items = read_items(recipe)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = random_weights_file(args.arch, tmp)
        base = RunConfig(recipe, args.arch, seed=0, weights=str(weights))
        # the fast path goes first, so it pays this process's warm-up (a conservative ratio)
        fast = sweep(base, ps, True, RunStore(tmp / "fast"), items)
        full = sweep(base, ps, False, RunStore(tmp / "full"), items)
        again = sweep(base, tuple(round(v + 0.05, 2) for v in ps), True, RunStore(tmp / "fast"), items)
    show("fast path (features computed and cached, then 5 heads)", fast)
    show("full path (5 frozen-stage runs on the images)", full)
    show("fast path again, other ps values (features from the cache)", again)
    n_valid = len(items.train) * recipe.valid_pct
    se = max(np.sqrt(r["accuracy"] * (1 - r["accuracy"]) / n_valid) for r in full["rows"])
    best_fast = max(r["accuracy"] for r in fast["rows"])
    best_full = max(r["accuracy"] for r in full["rows"])
    ratio = full["seconds"] / fast["seconds"]
    print(f"\nfull / fast = {full['seconds']:.1f} s / {fast['seconds']:.1f} s = {ratio:.1f}x faster; cached re-sweep "
          f"{again['seconds']:.1f} s ({full['seconds'] / again['seconds']:.1f}x)")
    print(f"best ps: fast {fast['best_ps']:g}, full {full['best_ps']:g}; best accuracy fast {best_fast:.4f}, "
          f"full {best_full:.4f} (binomial standard error of one accuracy on {n_valid:.0f} images: {se:.4f})")
    out = {"data": args.data, "arch": args.arch, "size": args.size, "frozen_epochs": args.epochs, "ps": list(ps),
           "lr": args.lr, "bs": args.bs, "tta": args.tta, "n_train_items": len(items.train),
           "body": "random init saved as a weights file (no pretrained weights offline)",
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "load_avg_at_end": os.getloadavg(), "cuda": torch.cuda.is_available(),
           "fast": fast, "full": full, "fast_cached": again, "ratio": round(ratio, 2),
           "best_accuracy_fast": best_fast, "best_accuracy_full": best_full, "accuracy_standard_error": round(se, 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
