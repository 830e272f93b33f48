"""fastcls performance benchmarks: one command runs them all, prints a table, writes bench/results/perf.json.

    python bench/run_all.py                      # everything (about 15-25 min on the 2-core CPU)
    python bench/run_all.py --only cache --reps 5

Sections:
  overhead  images/s of fastcls training (resnet18, 64 px, batch 64, in-memory data) against a hand-written PyTorch
            loop (same model, optimizer, one-cycle schedule, batches already normalised in memory) and plain fastai
            `vision_learner`; variants interleaved within each repetition so load changes hit all of them alike.
            Also fastcls with 1 and 2 DataLoader workers, and with channels-last.
  cache     the simpsons photos at 224 px: a run's start (building the DataLoaders) and one data epoch (decode,
            crop, resize, collate, normalise; with and without the recipe's batch augmentation): no cache, a cold
            cache, the warm disk cache read item by item, and the default (warm disk cache, images kept in memory).
  arrays    one data epoch over quickdraw (in-memory arrays) at 64 px: the per-item PIL path against the arrays
            cropped and resized once up front, each batch sliced out in one go (`PresizedArrays`, `PresizedDL`).
  gather    the sweep fast-path and ensemble figures other benchmarks wrote to bench/results/{sweep,ensemble}.json.

Every timed figure is min / median / max over --reps repetitions. No test asserts any of these times.
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmark this checkout's fastcls, not an installed one
RESULTS = ROOT / "bench" / "results"
SHARED = ROOT.parent / "shared" / "data"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fastai.callback.core import Callback  # noqa: E402


def spread(xs) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "all": list(xs)}


def fmt(s: dict, unit: str = "", digits: int = 1) -> str:
    return f"{s['min']:.{digits}f} / {s['median']:.{digits}f} / {s['max']:.{digits}f}{unit}"


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import fastai
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "fastai": fastai.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_avg_start": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


# -- 1. training overhead ---------------------------------------------------------------------------------------------
def stamp() -> tuple:
    """(wall, CPU) seconds now. CPU time is this process's: it counts the work done, and is much less disturbed than
    wall time by other jobs on a shared machine; DataLoader worker processes are not in it."""
    return time.perf_counter(), time.process_time()


class StepClock(Callback):
    """Time stamps after every training step (data loading of the next batch falls between two stamps)."""

    order = 100

    def __init__(self):
        self.stamps = []

    def after_batch(self):
        if self.training:
            self.stamps.append(stamp())


def per_step(stamps) -> tuple:
    """(wall, CPU) seconds per step over all steps but the first (warm-up: allocations, oneDNN primitive caches)."""
    return tuple((stamps[-1][i] - stamps[0][i]) / (len(stamps) - 1) for i in (0, 1))


def overhead_data(steps: int, bs: int, n_valid: int = 64):
    """An in-memory (array) data set with exactly `steps` training batches and a small given validation split."""
    from fastcls.data import Items, read_items
    from fastcls.recipe import Recipe
    qd = SHARED / "quickdraw-longtail"
    if qd.exists():
        items = read_items(Recipe(name="qd", layout="npz"), qd)
    else:  # a user's machine without the shared data
        from fastcls.recipe import get_recipe
        items = read_items(get_recipe("digits"))
    n = steps * bs + n_valid
    rng = np.random.default_rng(0)
    src = items.train.iloc[rng.permutation(len(items.train))[:n]].reset_index(drop=True)
    if len(src) < n:
        raise SystemExit(f"need {n} items for {steps} steps of {bs}; got {len(src)}")
    src["is_valid"] = np.arange(n) >= steps * bs
    return Items(src, None, items.arrays, items.root), "quickdraw-longtail" if qd.exists() else "digits"


def overhead(args) -> dict:
    from fastai.vision.learner import vision_learner
    from fastcls.archs import build_model
    from fastcls.data import dls
    from fastcls.recipe import Recipe
    from fastcls.config import RunConfig
    from fastcls.train import learner, train

    items, source = overhead_data(args.steps, args.bs)
    recipe = Recipe(name="overhead", layout="npz", split="given", size=args.size, bs=args.bs, aug=False,
                    pretrained=False, epochs=1, freeze_epochs=0, lr=2e-3, ps=0.5, tta=0)
    n_cls = items.train["label"].nunique()

    def run_fastcls(workers=0, **accel):
        d = dls(recipe, items, seed=0, num_workers=workers)
        cfg = RunConfig(recipe, args.arch, seed=0, **accel)
        learn = learner(d, cfg)
        clock = StepClock()
        learn.add_cb(clock)
        train(learn, cfg, progress="none")
        return per_step(clock.stamps)

    def run_fastai():
        d = dls(recipe, items, seed=0, num_workers=0)
        learn = vision_learner(d, args.arch, pretrained=False, n_out=n_cls)
        clock = StepClock()
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, recipe.lr, cbs=[clock])
        return per_step(clock.stamps)

    # the hand-written loop's data: the same images through the same resize and normalisation, once, into memory
    d0 = dls(recipe, items, seed=0, num_workers=0)
    xs, ys = zip(*[(x, y) for x, y in d0.train.new(shuffle=False, drop_last=False)])
    X, Y = torch.cat(xs).as_subclass(torch.Tensor).contiguous(), torch.cat(ys).as_subclass(torch.Tensor)

    def run_plain():
        torch.manual_seed(0)
        model = build_model(args.arch, n_cls, ps=recipe.ps)
        model.train()
        # fastai's defaults: Adam(mom 0.9, sqr_mom 0.99, eps 1e-5), true weight decay 0.01, one-cycle schedule
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=args.steps, pct_start=0.25)
        loss_fn = torch.nn.CrossEntropyLoss()
        perm = torch.randperm(len(X))
        stamps = []
        for i in range(args.steps):
            idx = perm[i * args.bs:(i + 1) * args.bs]
            xb, yb = X[idx], Y[idx]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            stamps.append(stamp())
        return per_step(stamps)

    variants = {"plain PyTorch loop": run_plain, "fastcls": run_fastcls, "plain fastai vision_learner": run_fastai}
    if not args.quick:
        variants.update({"fastcls, 1 worker": lambda: run_fastcls(workers=1),
                         "fastcls, 2 workers": lambda: run_fastcls(workers=2),
                         "fastcls --channels-last": lambda: run_fastcls(channels_last=True)})
    times = {k: [] for k in variants}
    names = list(variants)
    for rep in range(args.reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:  # rotate the order: no variant always first
            wall, cpu = variants[k]()
            times[k].append((wall, cpu))
            print(f"  overhead rep {rep + 1}/{args.reps}: {k:30s} {wall:.3f} s/step wall, {cpu:.3f} s CPU", flush=True)
    base = times["plain PyTorch loop"]
    out = {"data": source, "arch": args.arch, "size": args.size, "bs": args.bs, "steps": args.steps, "variants": {}}
    for k, ts in times.items():
        out["variants"][k] = {"s_per_step": spread([w for w, _ in ts]), "cpu_s_per_step": spread([c for _, c in ts]),
                              "images_per_s": spread([args.bs / w for w, _ in ts]),
                              "ratio_to_plain_loop": spread([w / b[0] for (w, _), b in zip(ts, base)]),
                              "cpu_ratio_to_plain_loop": spread([c / b[1] for (_, c), b in zip(ts, base)])}
    return out


# -- 2. image cache ---------------------------------------------------------------------------------------------------
def cache(args) -> dict:
    import fastcls.data.cache
    from fastcls.data import dls, read_items
    from fastcls.recipe import Recipe
    data = SHARED / "simpsons"
    if not data.exists():
        return {"skipped": f"{data} is absent"}
    os.environ["FASTCLS_CACHE"] = tempfile.mkdtemp(prefix="fastcls-bench-cache-")  # a truly cold cache to start
    base = Recipe(name="simpsons-bench", layout="folder", train_dir="train/simpsons_dataset",
                  test_dir="testset/testset",
                  size=224, bs=64, split="random")
    items = read_items(base, data)
    budget = fastcls.data.cache.MEMORY_BUDGET

    def run(recipe, in_memory=True) -> tuple:
        """(seconds to build the DataLoaders: a run's start, seconds for one pass over the training batches)."""
        fastcls.data.cache.MEMORY_BUDGET = budget if in_memory else 0
        t = time.perf_counter()
        d = dls(recipe, items, seed=0, num_workers=0)
        t1 = time.perf_counter()
        n = sum(len(x) for x, _ in d.train)
        t2 = time.perf_counter()
        fastcls.data.cache.MEMORY_BUDGET = budget
        assert n == len(d.train_ds) // recipe.bs * recipe.bs
        return t1 - t, t2 - t1, d.cached

    variants = {"no cache (decode every epoch)": dict(cache=False),
                "disk cache, read item by item (warm)": dict(cache=True, in_memory=False),
                "disk cache + in memory (warm, the default)": dict(cache=True)}
    out = {"data": "simpsons", "size": 224, "n_train_images_per_epoch": None, "n_images": None, "cases": {}}
    for aug in (False, True):
        r = base.override(aug=aug)
        cold = None
        if not aug:  # the first run decodes every train and test image and fills the cache (aug is not in the key)
            cold = run(r.override(cache=True))
        res = {k: [] for k in variants}
        for rep in range(args.reps):
            names = list(variants)
            for k in names[rep % 3:] + names[:rep % 3]:
                v = dict(variants[k])
                mem = v.pop("in_memory", True)
                res[k].append(run(r.override(**v), in_memory=mem))
            print(f"  cache rep {rep + 1}/{args.reps} aug={aug}: " +
                  ", ".join(f"{k.split(' (')[0]} {v[-1][0]:.2f}+{v[-1][1]:.2f} s ({v[-1][2]})" for k, v in res.items()),
                  flush=True)
        base_epoch = [e for _, e, _ in res["no cache (decode every epoch)"]]
        case = {"cold run (fills the cache)": None if cold is None else {"start_s": cold[0], "epoch_s": cold[1]}}
        for k, v in res.items():
            case[k] = {"kind": v[0][2], "start_s": spread([b for b, _, _ in v]),
                       "epoch_s": spread([e for _, e, _ in v]),
                       "epoch_speedup": spread([a / e for a, (_, e, _) in zip(base_epoch, v)])}
        out["cases"]["batch augmentation " + ("on" if aug else "off")] = case
    d = dls(base.override(cache=False), items, seed=0, num_workers=0)
    out["n_train_images_per_epoch"] = len(d.train_ds) // base.bs * base.bs
    out["n_images"] = len(items.train) + len(items.test)
    return out


def arrays(args) -> dict:
    from fastcls.data import dls
    from fastcls.recipe import Recipe
    items, source = overhead_data(20, 64)
    r = Recipe(name="arrays", layout="npz", split="given", size=args.size, bs=64, aug=False)
    d = {k: dls(r.override(cache=c), items, seed=0, num_workers=0)
         for k, c in (("per item", False), ("presized", None))}
    assert d["per item"].cached is None and d["presized"].cached == "memory"
    t0 = time.perf_counter()
    dls(r, items, seed=0, num_workers=0)
    build = time.perf_counter() - t0
    runs = {k: [] for k in d}
    for rep in range(args.reps):
        for k in (list(d) if rep % 2 == 0 else list(d)[::-1]):
            t = time.perf_counter()
            n = sum(len(x) for x, _ in d[k].train)
            runs[k].append(n / (time.perf_counter() - t))
        print(f"  arrays rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in runs.items()))
    return {"data": source, "size": args.size, "images": n, "dls_build_s_with_presize": build,
            "images_per_s": {k: spread(v) for k, v in runs.items()},
            "speedup": spread([a / b for a, b in zip(runs["presized"], runs["per item"])])}


# -- 3. figures from the other benchmarks -----------------------------------------------------------------------------
def gather() -> dict:
    found = {}
    for name in ("sweep", "ensemble"):
        p = RESULTS / f"{name}.json"
        if p.is_file():
            try:
                found[name] = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                found[name] = {"unreadable": str(e)}
    return found


_FIGURE = re.compile(r"seconds|_s$|ratio|speedup|faster|best|accuracy|f1|loss|error|gain|score|goal", re.I)


def _flat(d, prefix=""):
    """Nested JSON -> (key path, value) rows for figures of unknown shape: scalars and short lists of scalars; per-row
    tables (lists of objects) are left to their own benchmark's output."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list):
        if len(d) <= 12 and all(not isinstance(v, (dict, list)) for v in d):
            yield prefix, ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in d)
        elif all(isinstance(v, dict) and "method" in v for v in d):  # one result per method (the ensemble's)
            for v in d:
                yield from _flat({k: x for k, x in v.items() if k != "method"}, f"{prefix}[{v['method']}]")
    else:
        yield prefix, f"{d:.4g}" if isinstance(d, float) else str(d)


# -- table ------------------------------------------------------------------------------------------------------------
def table(res: dict) -> str:
    m = res["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; torch {m['torch']} "
             f"({m['torch_threads']} threads), fastai {m['fastai']}, python {m['python']}; load average at start "
             f"{m['load_avg_start'][0]:.1f}, at end {m.get('load_avg_end', [float('nan')])[0]:.1f}; {m['date']}",
             f"command: {res['command']}", f"figures: min / median / max over {res['reps']} repetitions", "",
             "| benchmark | variant | figure (min / median / max) |", "|---|---|---|"]
    ov = res.get("overhead")
    if ov:
        what = f"training, {ov['arch']} {ov['size']} px, bs {ov['bs']}, {ov['steps']} steps, {ov['data']} in memory"
        for k, v in ov["variants"].items():
            cpu = "(workers' CPU not counted)" if "worker" in k else f"{fmt(v['cpu_ratio_to_plain_loop'], 'x', 2)}"
            lines.append(f"| {what} | {k} | {fmt(v['images_per_s'], ' img/s')}; time per step "
                         f"{fmt(v['ratio_to_plain_loop'], 'x', 2)} the plain loop's, CPU time per step {cpu} |")
    ca = res.get("cache")
    if ca and "cases" in ca:
        for case, v in ca["cases"].items():
            what = (f"simpsons photos at 224 px, {case}: run start (DataLoaders built; {ca['n_images']} train + test "
                    f"images) + one epoch ({ca['n_train_images_per_epoch']} images)")
            if v["cold run (fills the cache)"]:
                c = v["cold run (fills the cache)"]
                lines.append(f"| {what} | cold run, fills the cache | start {c['start_s']:.2f} s, epoch "
                             f"{c['epoch_s']:.2f} s (one run) |")
            for k, f in v.items():
                if k.startswith("cold"):
                    continue
                speed = "" if k.startswith("no cache") else f"; epoch {fmt(f['epoch_speedup'], 'x', 1)} faster"
                lines.append(f"| {what} | {k} | start {fmt(f['start_s'], ' s', 2)}, epoch {fmt(f['epoch_s'], ' s', 2)}"
                             f"{speed} |")
    elif ca:
        lines.append(f"| image cache | - | skipped: {ca['skipped']} |")
    ar = res.get("arrays")
    if ar:
        what = f"data epoch, {ar['data']} arrays in memory, {ar['size']} px ({ar['images']} images)"
        lines.append(f"| {what} | per item (PIL, every epoch) | {fmt(ar['images_per_s']['per item'], ' img/s', 0)} |")
        lines.append(f"| {what} | presized once, batches sliced (PresizedDL) | "
                     f"{fmt(ar['images_per_s']['presized'], ' img/s', 0)}; "
                     f"speedup {fmt(ar['speedup'], 'x', 1)} |")
    for name, d in res.get("gathered", {}).items():
        for k, v in _flat(d):
            if _FIGURE.search(k.rsplit(".", 1)[-1]) and ".features." not in k:  # the figures, not the set-up details
                lines.append(f"| {name} (bench/results/{name}.json; its settings there) | {k} | {v} |")
    if "gathered" in res and not res["gathered"]:
        lines.append("| sweep, ensemble | - | bench/results/sweep.json and ensemble.json not present yet |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="overhead,cache,arrays,gather", help="comma-separated sections to run")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every timed figure (>= 3)")
    p.add_argument("--steps", type=int, default=6, help="training steps per repetition (overhead)")
    p.add_argument("--bs", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--quick", action="store_true", help="overhead: only the three main variants")
    p.add_argument("--out", default=str(RESULTS / "perf.json"))
    p.add_argument("--show", metavar="JSON", help="print the table of an earlier run's JSON (re-gathering the other "
                                                  "benchmarks' figures) and exit")
    args = p.parse_args(argv)
    if args.show:
        res = json.loads(Path(args.show).read_text())
        res["gathered"] = gather()
        print(table(res))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.only.split(","))
    res = {"command": "python bench/run_all.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "reps": args.reps, "machine": machine()}
    t0 = time.time()
    if "overhead" in sections:
        res["overhead"] = overhead(args)
    if "cache" in sections:
        res["cache"] = cache(args)
    if "arrays" in sections:
        res["arrays"] = arrays(args)
    if "gather" in sections:
        res["gathered"] = gather()
    res["machine"]["load_avg_end"] = os.getloadavg()
    res["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print()
    print(table(res))
    print(f"\nwrote {args.out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
