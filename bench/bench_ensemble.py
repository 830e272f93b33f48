"""Benchmark `fastcls.ensemble.ensemble` on large synthetic stored runs: wall time and peak memory per method.

    python bench/bench_ensemble.py                      # 10 runs x 100,000 items x 100 classes, mean and hill
    python bench/bench_ensemble.py --items 20000 --methods mean hill weighted --metric macro_f1

The runs are written into a temporary store first (not timed): softmax logits with a per-item component shared
by all runs (members are correlated, as real ones are), member noise and a target boost that grows with the run
index (accuracies from about 16% to 45%, a hard 100-class problem). Each method then runs in a fresh subprocess
(the ensemble code is single-threaded; BLAS pools are capped at 2 threads), so its peak resident memory
(`ru_maxrss`) belongs to that call alone; the figure reported is the peak minus the resident memory just before the
call, and it includes the memory-mapped probability pages the call reads. A second subprocess repeats the call
under `tracemalloc` for the peak of Python/numpy allocations. Wall time depends on what else the machine runs, so
the CPU time of the call and the 1-minute load average before it are printed too.
Goal: under 10 s and peak memory under 2x the probabilities' size. Figures go to stdout and to
bench/results/ensemble.json.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

_THREADS = {k: "2" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


def make_store(root: Path, runs: int, items: int, classes: int, views: int, metric: str, seed: int = 0):
    """Runs whose softmax logits share a per-item component (so members are correlated, as real ones are) plus
    member noise, with a target boost of varying strength (member accuracies differ)."""
    from fastcls.runs import RunData, RunStore

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, items)
    shared = rng.standard_normal((items, classes), dtype=np.float32)
    ids = [f"item{i:06d}" for i in range(items)]
    store, refs = RunStore(root), []
    for r in range(runs):
        probs = np.empty((views, items, classes), dtype=np.float32)
        for v in range(views):
            z = shared + rng.standard_normal((items, classes), dtype=np.float32)
            z[np.arange(items), y] += 2.0 + 0.15 * r
            z *= 1.5
            z -= z.max(1, keepdims=True)
            np.exp(z, out=z)
            z /= z.sum(1, keepdims=True)
            probs[v] = z
        refs.append(store.save(RunData(config={"recipe": "bench", "arch": f"arch{r}", "metric": metric}, vocab=[
            f"c{c}" for c in range(classes)], valid_probs=probs, valid_targets=y, valid_ids=ids,
            metrics={"metric_name": metric})))
    return refs


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args):
    """One `ensemble()` call in this fresh process; prints its figures as JSON."""
    from fastcls.ensemble import ensemble
    from fastcls.runs import RunStore

    store, refs = RunStore(args.store), args.refs.split(",")
    kw = dict(method=args.method, hill_steps=args.steps, n_boot=args.n_boot, seed=0)
    if args.trace:
        import tracemalloc
        tracemalloc.start()
        ensemble(store, refs, **kw)
        print(json.dumps({"traced_peak": tracemalloc.get_traced_memory()[1]}))
        return
    base, load = _rss_bytes(), os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    res = ensemble(store, refs, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    ens = res.table.iloc[-1]
    best = res.table[res.table.kind == "member"].score.max()
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "load_before": load, "rss_before": base, "rss_peak": peak,
                      "score": float(ens.score), "best_member": float(best), "gain": float(ens.gain),
                      "gain_lo": float(ens.gain_lo), "gain_hi": float(ens.gain_hi), "evaluated": ens.evaluated}))


def run_child(args, method: str, refs, trace: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--store", str(args.store), "--refs", ",".join(refs), "--method",
           method, "--steps", str(args.steps), "--n-boot", str(args.n_boot)] + (["--trace"] if trace else [])
    out = subprocess.run(cmd, env={**os.environ, **_THREADS}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--views", type=int, default=1, help="stored views per run (1 = plain only, >1 adds TTA views)")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--methods", nargs="+", default=["mean", "hill"])
    ap.add_argument("--steps", type=int, default=50, help="hill-climbing steps")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--no-trace", action="store_true", help="skip the tracemalloc repeat of each call")
    ap.add_argument("--out", default=str(HERE / "results" / "ensemble.json"))
    # internal: one measured call in a fresh process
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--refs", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    tmp = Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
    try:
        args.store = tmp / "runs"
        t0 = time.perf_counter()
        refs = make_store(args.store, args.runs, args.items, args.classes, args.views, args.metric)
        setup = time.perf_counter() - t0
        size = args.runs * args.views * args.items * args.classes * 4
        print(f"store: {args.runs} runs x {args.views} view(s) x {args.items:,} items x {args.classes} classes, "
              f"metric {args.metric}; probabilities {size / 2**20:.0f} MiB float32 (written in {setup:.1f} s, "
              f"not timed); {os.cpu_count()} CPUs")
        results = []
        for method in args.methods:
            r = run_child(args, method, refs, trace=False)
            if not args.no_trace:
                r.update(run_child(args, method, refs, trace=True))
            r.update(method=method, rss_delta=r["rss_peak"] - r["rss_before"])
            results.append(r)
        head = (f"{'method':<9} {'wall s':>7} {'CPU s':>6} {'load':>5} {'peak RSS delta MiB':>19} {'x probs':>8} "
                f"{'traced peak MiB':>16} {'x probs':>8} {'evaluated':>9} {'score':>7} {'best member':>11} "
                f"{'gain [95% CI]':>24}")
        print(head)
        print("-" * len(head))
        for r in results:
            traced = r.get("traced_peak")
            print(f"{r['method']:<9} {r['wall_s']:>7.2f} {r['cpu_s']:>6.2f} {r['load_before']:>5.1f} "
                  f"{r['rss_delta'] / 2**20:>19.0f} {r['rss_delta'] / size:>8.2f} "
                  f"{'-' if traced is None else f'{traced / 2**20:.0f}':>16} "
                  f"{'-' if traced is None else f'{traced / size:.2f}':>8} {r['evaluated']:>9} {r['score']:>7.4f} "
                  f"{r['best_member']:>11.4f} {r['gain']:>+8.4f} [{r['gain_lo']:+.4f}, {r['gain_hi']:+.4f}]")
        ok = all(r["wall_s"] < 10 and r["rss_delta"] < 2 * size for r in results)
        ok_cpu = all(r["cpu_s"] < 10 and r["rss_delta"] < 2 * size for r in results)
        print(f"goal (< 10 s and peak memory < 2x probabilities = {2 * size / 2**20:.0f} MiB): "
              f"{'met' if ok else 'NOT met'} on wall time, {'met' if ok_cpu else 'NOT met'} on CPU time")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "config": {k: getattr(args, k) for k in ("runs", "items", "classes", "views", "metric", "steps",
                                                     "n_boot")},
            "probs_bytes": size, "setup_s": setup, "cpus": os.cpu_count(), "goal_met_wall": ok,
            "goal_met_cpu": ok_cpu,
            "results": results}, indent=1))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
