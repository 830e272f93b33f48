"""A 4-trial sweep on this machine: the local executor (one trial after another) against Ray with 2 workers.

Both sweeps are the same full-path dropout sweep (digits, simple_cnn, ps 0, 0.2, 0.4, 0.6), each trial a normal run
with 1 torch thread (Ray gives each 1-CPU trial one thread; the local process is set to one). Every repetition uses a
fresh run store; the Ray instance (2 CPUs, loopback) is started once, and its start-up is reported on its own. The
first Ray sweep also pays for starting the 2 worker processes (importing torch and fastai there); it is reported apart
from the warm ones.

Ray's overhead per trial: each trial run alone (one `map` of one trial, on the workers the sweeps warmed up) through
the executor, minus the training
time the run itself records (`seconds`: reading data, training, predicting, scoring; measured inside the worker); the
same for the local executor. What is left is shipping the trial (its config and the data's item table), scheduling,
sending the run's files back and importing them into the store.

    python bench/bench_ray.py                  # README figures (writes bench/results/ray.json)
    python bench/bench_ray.py --reps 1 --epochs 1
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcls.data import read_items  # noqa: E402
from fastcls.experiments.executors import LocalExecutor, RayExecutor, run_one  # noqa: E402
from fastcls.recipe import get_recipe  # noqa: E402
from fastcls.runs import RunStore  # noqa: E402
from fastcls.experiments.sweep import plan_sweep, run_sweep  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402
from fastcls.train import fit_run


def spread(xs) -> dict:
    return {"min": round(min(xs), 2), "median": round(statistics.median(xs), 2), "max": round(max(xs), 2),
            "all": [round(x, 2) for x in xs]}


def _train(items):
    def fn(trial, store):
        return fit_run(trial.cfg, store, "none", items=items)
    return fn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sample", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray.json"))
    args = ap.parse_args(argv)
    import ray
    torch.set_num_threads(1)
    recipe = get_recipe("digits").override(size=args.size, epochs=args.epochs, freeze_epochs=0, pretrained=False,
                                           tta=1, bs=32)
    base = RunConfig(recipe, "simple_cnn", sample=args.sample)
    items = read_items(recipe)
    plan = plan_sweep(base, ["simple_cnn"], {"ps": (0.0, 0.2, 0.4, 0.6)}, fast=False)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             logging_level="ERROR")
    ray_start = time.perf_counter() - t0
    print(f"ray.init (2 CPUs, loopback): {ray_start:.1f} s", flush=True)
    walls = {"local": [], "ray": []}
    train_s = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, ex in (("ray", RayExecutor(cpus_per_trial=1)), ("local", LocalExecutor())):
                store = RunStore(Path(tmp) / f"{name}-{rep}")
                t0 = time.perf_counter()
                res = run_sweep(plan, store, progress="none", executor=ex, items=items)
                wall = time.perf_counter() - t0
                assert res.trained == 4 and res.record["status"] == "done", res.record
                walls[name].append(wall)
                train_s[name].append(float(store.leaderboard()["seconds"].sum()))
                print(f"rep {rep} {name:5s}: sweep {wall:6.1f} s wall, trials' own time {train_s[name][-1]:6.1f} s",
                      flush=True)
        # overhead per trial: one trial at a time through each executor, minus the run's own recorded time
        over = {"local": [], "ray": []}
        fn = _train(items)
        for name, ex in (("ray", RayExecutor(cpus_per_trial=1)), ("local", LocalExecutor())):
            store = RunStore(Path(tmp) / f"{name}-overhead")
            for t in plan.trials:
                t = replace(t, cfg=replace(t.cfg, name=f"overhead-{t.index}"))
                t0 = time.perf_counter()
                res = run_one(ex, fn, t, store)
                wall = time.perf_counter() - t0
                over[name].append(wall - store.load(res.run_id).row["seconds"])
            print(f"overhead per trial {name:5s}: " + ", ".join(f"{x:.2f}" for x in over[name]) + " s", flush=True)
    ray.shutdown()
    warm = walls["ray"][1:] or walls["ray"]
    ratios = [a / b for a, b in zip(walls["local"][1:] or walls["local"], warm)]
    out = {"trials": 4, "grid": "ps 0,0.2,0.4,0.6", "recipe": "digits", "arch": "simple_cnn", "size": args.size,
           "epochs": args.epochs, "sample": args.sample, "torch_threads_per_trial": 1, "ray_workers": 2,
           "cores": len(os.sched_getaffinity(0)), "load_avg_start": load0, "load_avg_end": os.getloadavg(),
           "ray_init_s": round(ray_start, 2), "local_sweep_s": spread(walls["local"]),
           "ray_sweep_first_s": round(walls["ray"][0], 2), "ray_sweep_warm_s": spread(warm),
           "speedup_local_over_ray_warm": spread(ratios),
           "trial_own_time_sum_s": {k: spread(v) for k, v in train_s.items()},
           "overhead_per_trial_s": {"ray_warm_workers": spread(over["ray"]), "local": spread(over["local"]),
                                    "ray_minus_local_median": round(statistics.median(over["ray"])
                                                                    - statistics.median(over["local"]), 2)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
