"""Growth curves: how each part of fastcls's cost grows with its work (wall time, CPU time, peak memory).

    nice -n 10 python bench/scale.py                          # every part at its default sizes (~25 CPU-minutes)
    python bench/scale.py --parts store sweep --store-sizes 100 1000 10000
    python bench/scale.py --plot-only                         # redraw docs/scale.png from bench/results/scale.json

Parts (each measured at 3 sizes, every measurement in a fresh subprocess whose `wait4` resource usage gives its CPU
time and peak resident memory):
- index: `fastcls check folder` on N Fashion-MNIST PNGs (index the folder, open every image), against a plain loop
  (os.walk + PIL `verify`); the PNGs are materialised once under /tmp/fmnist (`fmnist_folder`, from the Debian
  package `dataset-fashion-mnist`, outside the repository).
- train: `fastcls train folder resnet18` at 32 px, one epoch from scratch, valid + test prediction included.
- features: `fastcls sweep-dropout folder resnet18 --ps 0,0.2,0.4,0.6,0.8` on the fast path (body features
  extracted once, one head epoch per value), with the extraction's own seconds from the sweep record.
- ensemble: `fastcls.ensemble.ensemble` mean and hill over R stored runs of 100,000 items x 100 classes, against
  the same mean in plain numpy (`PLAIN_MEAN_CHILD`: members memory-mapped and added, the mean saved); each
  measurement's member files are read once first, untimed (`_warm`), so every size runs from the page cache.
- store: `fastcls runs`, `fastcls show <run>` and `fastcls sweeps` on a synthetic store of R runs (copies of a few
  saved runs, indexed by `rebuild_index`, one sweep record per 10 runs).
- sweep: a T-trial fast dropout sweep on digits: bookkeeping overhead per trial = (wall - feature extraction - the
  trials' own training seconds) / T.
- cache_read: the image cache's raw `.npy` and lossless PNG formats on the simpsons photos at 3 sizes: bytes, fill
  and read time per image.
Each part also measures its zero-work point (`STARTUP`: the same command on the smallest input it accepts: 10 files,
100 images, 2 runs, 10 stored runs, 1 trial): interpreter start-up, imports and setup. The table reports CPU seconds
above that point too, and the slopes are taken on them, so a slope means the work, not the start-up.
Figures go to stdout, bench/results/scale.json and docs/scale.png (log-log).
"""

import argparse
import gzip
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
_THREADS = {k: "2" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fmnist_folder(n: int, root: Path = Path("/tmp/fmnist")) -> Path:
    """The first `n` Fashion-MNIST images as PNGs in `<root>/n<n>/train/<class>/` (the 60,000 training images, then
    the 10,000 test images: up to 70,000), plus min(n // 6, 10,000) test images in `test/` (made once; the Debian
    package `dataset-fashion-mnist` provides the idx files)."""
    out = root / f"n{n}"
    if (out / "done").is_file():
        return out
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    from PIL import Image
    test, test_labels = _idx(FMNIST / "t10k-images-idx3-ubyte.gz"), _idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    images = np.concatenate([_idx(FMNIST / "train-images-idx3-ubyte.gz"), test])
    labels = np.concatenate([_idx(FMNIST / "train-labels-idx1-ubyte.gz"), test_labels])
    if n > len(images):
        raise SystemExit(f"Fashion-MNIST has {len(images):,} images, not {n:,}")
    shutil.rmtree(out, ignore_errors=True)
    for c in CLASSES:
        (out / "train" / c).mkdir(parents=True)
    (out / "test").mkdir()
    for i in range(n):
        Image.fromarray(images[i]).save(out / "train" / CLASSES[labels[i]] / f"{i:05d}.png")
    for i in range(min(n // 6, len(test))):
        Image.fromarray(test[i]).save(out / "test" / f"t{i:05d}.png")
    (out / "done").touch()
    return out


def measure(cmd: list, env=None) -> dict:
    """Run `cmd` in a fresh process: wall and CPU seconds, peak resident memory (MiB) from its own `wait4` usage,
    and its stdout."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True,
                             env={**os.environ, **_THREADS, "PYTHONPATH": str(ROOT), **(env or {})})
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0), fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round(ru.ru_utime + ru.ru_stime, 3), "sys_s": round(ru.ru_stime, 3),
            "peak_mib": round(ru.ru_maxrss / 1024, 1), "stdout": out}


def fastcls(*args, env=None) -> dict:
    return measure([sys.executable, "-m", "fastcls", *map(str, args)], env=env)


def py(code: str, env=None) -> dict:
    return measure([sys.executable, "-c", code], env=env)


# -- parts: each returns one row per size -------------------------------------------------------------------------

PLAIN_CHECK = """
import os, sys
from PIL import Image
n = 0
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        if f.endswith('.png'):
            with Image.open(os.path.join(d, f)) as im:
                im.verify()
            n += 1
print(n)
"""


def part_index(sizes, tmp: Path) -> list:
    rows = []
    for n in sizes:
        data = fmnist_folder(n)
        cache = tmp / f"check-cache-{n}"  # cold: no cached verdicts
        r = fastcls("check", "folder", "--data", data, env={"FASTCLS_CACHE": str(cache)})
        plain = measure([sys.executable, "-c", PLAIN_CHECK, str(data)])
        rows.append({"size": n, **_fig(r), "plain": _fig(plain)})
        _say("index", rows[-1])
    return rows


PLAIN_TRAIN = """
import sys
from pathlib import Path
from fastai.vision.all import (DataBlock, ImageBlock, CategoryBlock, get_image_files, RandomSplitter, parent_label,
                               Resize, aug_transforms, Normalize, imagenet_stats, vision_learner, resnet18, accuracy)
path = Path(sys.argv[1])
dls = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, splitter=RandomSplitter(0.2, seed=0),
                get_y=parent_label, item_tfms=Resize(32),
                batch_tfms=[*aug_transforms(), Normalize.from_stats(*imagenet_stats)]).dataloaders(
                    path / "train", bs=64, num_workers=0)
learn = vision_learner(dls, resnet18, pretrained=False, metrics=accuracy)
learn.fit_one_cycle(1)
learn.get_preds(dl=dls.test_dl(get_image_files(path / "test")))
print(learn.validate()[1])
"""


def part_train(sizes, tmp: Path, plain_upto: int = 30000, plain_only: bool = False) -> list:
    """fastcls train (one epoch from scratch, valid + test predictions; not with `plain_only`) and, up to
    `plain_upto` images, the same in plain fastai (`PLAIN_TRAIN`: DataBlock from the folder, Resize(32),
    aug_transforms, vision_learner(resnet18, pretrained=False), fit_one_cycle(1), test predictions)."""
    rows = []
    for n in sizes:
        data = fmnist_folder(n)
        r = {} if plain_only else fastcls(
            "train", "folder", "resnet18", "--data", data, "--size", 32, "--epochs", 1, "--freeze-epochs", 0,
            "--bs", 64, "--tta", 0, "--no-pretrained", "--quiet", "--runs-dir", tmp / f"train-{n}",
            env={"FASTCLS_CACHE": str(tmp / "cache")})
        row = {"size": n, **_fig(r)}
        if n <= plain_upto:
            plain = measure([sys.executable, "-c", PLAIN_TRAIN, str(data)])
            row["plain"] = {**_fig(plain), "accuracy": float(plain["stdout"].split()[-1])}
        rows.append(row)
        _say("train", rows[-1])
    return rows


def part_features(sizes, tmp: Path) -> list:
    rows = []
    for n in sizes:
        data, runs = fmnist_folder(n), tmp / f"features-{n}"
        r = fastcls("sweep-dropout", "folder", "resnet18", "--data", data, "--ps", "0,0.2,0.4,0.6,0.8", "--size", 32,
                    "--epochs", 0, "--freeze-epochs", 1, "--bs", 64, "--tta", 0, "--views", 1, "--no-pretrained",
                    "--quiet", "--runs-dir", runs, env={"FASTCLS_CACHE": str(tmp / "cache")})
        rec = json.loads(next((runs / "sweeps").glob("*/sweep.json")).read_text())
        extract = sum(f.get("extract_seconds", 0) for f in rec["features"].values())
        rows.append({"size": n, **_fig(r), "extract_s": extract, "heads_s": round(r["wall_s"] - extract, 2)})
        _say("features", rows[-1])
    return rows


ENSEMBLE_CHILD = """
import json, sys, time
from fastcls.ensemble import ensemble
from fastcls.runs import RunStore
store, refs, method = RunStore(sys.argv[1]), sys.argv[2].split(','), sys.argv[3]
t0 = time.perf_counter()
res = ensemble(store, refs, method=method, n_boot=200, hill_steps=50, seed=0)
print(json.dumps({"score": res.score, "call_s": time.perf_counter() - t0}))
"""

# the same mean in plain numpy: each member's valid probabilities memory-mapped and added, the mean written, scored
PLAIN_MEAN_CHILD = """
import json, sys, time
from pathlib import Path
import numpy as np
root, refs, out = Path(sys.argv[1]), sys.argv[2].split(','), Path(sys.argv[3])
t0 = time.perf_counter()
total = None
for ref in refs:
    p = np.load(root / ref / "valid_probs.npy", mmap_mode="r")[0]
    total = np.array(p) if total is None else np.add(total, p, out=total)
mean = total / np.float32(len(refs))
np.save(out, mean)
y = np.load(root / refs[0] / "valid_targets.npy")
print(json.dumps({"score": float((mean.argmax(1) == y).mean()), "call_s": time.perf_counter() - t0}))
"""
ENSEMBLE_METHODS = ("mean", "hill", "plain")


def part_ensemble(sizes, tmp: Path, items: int, classes: int, methods=ENSEMBLE_METHODS) -> list:
    from bench_ensemble import make_store
    store = tmp / "ensemble-runs"
    t0 = time.perf_counter()
    refs = make_store(store, max(sizes), items, classes, 1, "accuracy")
    print(f"ensemble store: {max(sizes)} runs x {items:,} x {classes} written in {time.perf_counter() - t0:.0f} s "
          "(not timed)", flush=True)
    rows = []
    for n in sizes:
        for method in methods:
            _warm(store / ref for ref in refs[:n])  # before each measurement: other jobs may have evicted them
            child = [PLAIN_MEAN_CHILD, str(store), ",".join(refs[:n]), str(tmp / "plain-mean.npy")] \
                if method == "plain" else [ENSEMBLE_CHILD, str(store), ",".join(refs[:n]), method]
            r = measure([sys.executable, "-c", *child])
            extra = json.loads(r["stdout"].strip().splitlines()[-1])
            rows.append({"size": n, "method": method, **_fig(r), **extra})
            _say(f"ensemble {method}", rows[-1])
    shutil.rmtree(store, ignore_errors=True)
    return rows


def _warm(folders):
    """Read every file of `folders` once, untimed, so that each ensemble size is measured from the page cache: without
    it the 50-member runs (2 GB) read from memory and the 200-member ones (8 GB) partly from disk, a curve of the
    cache's state rather than of the work."""
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass


def make_run_store(root: Path, n: int, templates: int = 10) -> list:
    """A store of `n` finished runs: `templates` saved ones, copied (meta.json rewritten with a new id and name),
    indexed by `rebuild_index`, one sweep record per 10 runs. Returns the run ids."""
    from fastcls.files import read_json, write_json
    from fastcls.runs import RunData, RunStore, new_run_id
    store = RunStore(root)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    base = []
    for t in range(templates):
        p = rng.dirichlet(np.ones(10), (1, 200)).astype(np.float32)
        base.append(store.save(RunData(config={"recipe": "bench", "arch": f"arch{t}", "metric": "accuracy",
                                               "size": 32, "ps": 0.1 * t}, vocab=[f"c{c}" for c in range(10)],
                                       valid_probs=p, valid_targets=y, valid_ids=[f"i{i}" for i in range(200)],
                                       metrics={"metric_name": "accuracy",
                                                "accuracy": float((p[0].argmax(1) == y).mean())},
                                       name=f"template-{t}")))
    ids = list(base)
    sweeps = {}
    for i in range(n - templates):
        rid = f"{new_run_id()[:16]}{i:06x}"
        src = root / base[i % templates]
        shutil.copytree(src, root / rid)
        meta = read_json(root / rid / "meta.json")
        sid = f"sw-{i // 10:08x}"
        meta.update(id=rid, name=f"run-{i:06d}", sweep=sid)
        write_json(root / rid / "meta.json", meta)
        sweeps.setdefault(sid, []).append(rid)
        ids.append(rid)
    (root / "index.sqlite").unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'index.sqlite'}{suffix}").unlink(missing_ok=True)
    for sid, rids in sweeps.items():
        trials = [{"index": k, "name": f"{sid}-{k}", "status": "done", "run_id": r, "values": {"ps": 0.1 * k}}
                  for k, r in enumerate(rids)]
        (root / "sweeps" / sid).mkdir(parents=True)
        write_json(root / "sweeps" / sid / "sweep.json", {
            "id": sid, "recipe": "bench", "mode": "fast", "archs": ["arch0"], "grid": {"ps": [0.1 * k for k in
                                                                                           range(len(rids))]},
            "trials": trials, "status": "done", "best": {"key": "ps=0.0", "metric": 0.1, "run_id": rids[0]},
            "metric": "accuracy", "updated": "2026-01-01T00:00:00", "features": {}})
    return ids


INDEX_CHILD = """
import sys
from fastcls.runs import RunStore
s = RunStore(sys.argv[1])
s.leaderboard()
print(len(s.leaderboard()))
"""


def part_store(sizes, tmp: Path) -> list:
    rows = []
    for n in sizes:
        root = tmp / f"store-{n}"
        t0 = time.perf_counter()
        ids = make_run_store(root, n)
        made = time.perf_counter() - t0
        index = measure([sys.executable, "-c", INDEX_CHILD, str(root)])  # the first open indexes every folder
        assert int(index["stdout"].split()[-1]) == n, index["stdout"]
        row = {"size": n, "made_s": round(made, 1), "index": _fig(index)}
        for name, args in (("runs", ["runs"]), ("show", ["show", ids[n // 2]]), ("sweeps", ["sweeps"])):
            row[name] = _fig(fastcls(*args, "--runs-dir", root))
        rows.append(row)
        _say("store", row)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def part_sweep(sizes, tmp: Path) -> list:
    import sqlite3
    rows = []
    for n in sizes:
        runs = tmp / f"sweep-{n}"
        ps = ",".join(f"{0.8 * k / n:.5f}" for k in range(n))
        r = fastcls("sweep-dropout", "digits", "simple_cnn", "--ps", ps, "--epochs", 0, "--freeze-epochs", 1,
                    "--size", 16, "--bs", 32, "--sample", 200, "--tta", 0, "--views", 1, "--no-pretrained", "--quiet",
                    "--runs-dir", runs)
        rec = json.loads(next((runs / "sweeps").glob("*/sweep.json")).read_text())
        extract = sum(f.get("extract_seconds", 0) for f in rec["features"].values())
        with sqlite3.connect(runs / "index.sqlite") as con:
            trained = con.execute("SELECT SUM(seconds), COUNT(*) FROM runs").fetchone()
        assert trained[1] == n, trained
        overhead = (r["wall_s"] - extract - trained[0]) / n
        rows.append({"size": n, **_fig(r), "extract_s": extract, "trials_s": trained[0],
                     "overhead_per_trial_s": round(overhead, 4)})
        _say("sweep", rows[-1])
        shutil.rmtree(runs, ignore_errors=True)
    return rows


def part_cache_read(sizes, tmp: Path) -> list:
    """The image cache's two formats on the simpsons photos (~300x400 JPEGs): bytes per image, fill time, and read
    time per image (`CachedImageGetter.read`, warm page cache, 3 passes, best)."""
    from fastcls.data import read_items
    from fastcls.data.cache import fill_cache, CachedImageGetter, cache_settings
    from fastcls.data.images import ImageGetter, item_tfms
    from fastcls.recipe import get_recipe
    data = ROOT.parent / "shared" / "data" / "simpsons"
    base = get_recipe("simpsons")
    items = read_items(base, data)
    n = len(items.train) + len(items.test)
    rows = []
    for size in sizes:
        for fmt, budget in (("npy", None), ("png", str(n * (size * size * 3 + 128) - 1))):
            r = base.override(size=size, cache_budget=budget)
            t0 = time.perf_counter()
            st = fill_cache(r, items, root=tmp / "cache-read", threads=1)
            fill = time.perf_counter() - t0
            assert st.format == fmt, st
            get = CachedImageGetter(ImageGetter(), item_tfms(r), cache_settings(r, fmt), tmp / "cache-read")
            paths = sorted(st.folder.rglob(f"*{get.suffix}"))
            best = min(_time_reads(get, paths) for _ in range(3))
            rows.append({"size": size, "format": fmt, "images": n, "bytes_per_image": st.bytes / n,
                         "fill_ms_per_image": 1000 * fill / n, "read_ms_per_image": 1000 * best / len(paths)})
            _say("cache_read", rows[-1])
    return rows


def _time_reads(get, paths) -> float:
    t0 = time.perf_counter()
    for p in paths:
        get.read(p)
    return time.perf_counter() - t0


def merge_rows(old: list, new: list) -> list:
    """`new` rows update the `old` ones of the same size (and method), field by field (a train row measured with
    `--plain-only` adds its plain curve to the stored fastcls one); the others are kept, ordered by size."""
    key = lambda r: (r["size"], r.get("method") or r.get("format") or "")  # noqa: E731
    rows = {key(r): r for r in old}
    rows.update({key(r): {**rows.get(key(r), {}), **r} for r in new})
    return sorted(rows.values(), key=key)


def least(repeats: list) -> list:
    """Row by row, the repeat with the least CPU seconds (nested curves, such as index's `plain`, chosen apart)."""
    def pick(rows):
        best = dict(min(rows, key=lambda r: r.get("cpu_s", 0)))
        for k, v in best.items():
            if isinstance(v, dict) and "cpu_s" in v:
                best[k] = pick([r[k] for r in rows])
        return best
    return [pick(list(rows)) for rows in zip(*repeats)]


def _fig(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "stdout"}


def _say(part: str, row: dict):
    print(part, json.dumps(row), flush=True)


# -- curves, slopes, the plot -------------------------------------------------------------------------------------

STARTUP = {"index": 10, "train": 100, "features": 100, "ensemble": 2, "store": 10, "sweep": 1}


def curves(results: dict) -> list:
    """(part, label, sizes, wall seconds, CPU seconds, peak MiB, start-up CPU seconds or None) for every measured
    curve; the start-up is the same curve's row in `results["startup"]`."""
    out = []
    key = {"index (files)": "index", "train 1 epoch + predict (images)": "train",
           "features + 5-value head sweep (images)": "features", "ensemble 100k x 100 (runs)": "ensemble",
           "run store (runs)": "store", "sweep bookkeeping (trials)": "sweep"}

    def add(part, label, rows, get):
        rows = [r for r in rows if get(r) is not None]
        if rows:
            base = [r for r in results.get("startup", {}).get(key[part], [])
                    if r.get("method") == rows[0].get("method")]
            out.append((part, label, [r["size"] for r in rows], [get(r)["wall_s"] for r in rows],
                        [get(r)["cpu_s"] for r in rows], [get(r)["peak_mib"] for r in rows],
                        get(base[0])["cpu_s"] if base and get(base[0]) else None))
    res = results.get
    add("index (files)", "fastcls check", res("index", []), lambda r: r)
    add("index (files)", "plain PIL verify loop", res("index", []), lambda r: r["plain"])
    add("train 1 epoch + predict (images)", "fastcls train resnet18 32px", res("train", []), lambda r: r)
    add("train 1 epoch + predict (images)", "plain fastai resnet18 32px", res("train", []), lambda r: r.get("plain"))
    add("features + 5-value head sweep (images)", "fastcls sweep-dropout (fast path)", res("features", []),
        lambda r: r)
    for m in ENSEMBLE_METHODS:
        add("ensemble 100k x 100 (runs)", "plain numpy mean (memory-mapped)" if m == "plain" else f"ensemble {m}",
            [r for r in res("ensemble", []) if r["method"] == m], lambda r: r)
    for cmd in ("index", "runs", "show", "sweeps"):
        add("run store (runs)", f"{'first open (index)' if cmd == 'index' else 'fastcls ' + cmd}", res("store", []),
            lambda r, c=cmd: r[c])
    add("sweep bookkeeping (trials)", "fastcls sweep-dropout (tiny heads)", res("sweep", []), lambda r: r)
    return out


def slope(sizes, values, startup=None) -> float:
    """The log-log slope (1: linear) between the two largest sizes of `values` minus `startup` (the zero-work
    point's), so fixed costs do not pull it down; nan when a difference is not positive (the work is lost in the
    noise of the start-up)."""
    if len(sizes) < 2:
        return float("nan")
    a, b = (v - (startup or 0) for v in values[-2:])
    if a <= 0 or b <= 0:
        return float("nan")
    return float(np.log(b / a) / np.log(sizes[-1] / sizes[-2]))


def plot(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = curves(results)
    parts = list(dict.fromkeys(c[0] for c in cs))
    if not parts:
        return
    from matplotlib.ticker import NullFormatter
    fig, axes = plt.subplots(2, len(parts), figsize=(3.2 * len(parts), 6.2), squeeze=False)
    for j, part in enumerate(parts):
        for _, label, sizes, wall, cpu, peak, base in [c for c in cs if c[0] == part]:
            work = [(n, c - (base or 0)) for n, c in zip(sizes, cpu) if c - (base or 0) > 0]
            if work:  # none: the work is lost in the start-up's noise (the table says nan)
                line, = axes[0, j].loglog(*zip(*work), "o-", label=label)
                n1, w1 = work[-1]  # slope 1 through the largest size: a linear curve runs parallel to it
                axes[0, j].loglog([n1 / 10, n1], [w1 / 10, w1], ":", color=line.get_color(), alpha=0.5)
            axes[1, j].loglog(sizes, peak, "s--", label=label)
        for i, what in enumerate(("CPU s above start-up", "peak MiB")):
            ax = axes[i, j]
            ax.set_xlabel(part, fontsize=7)
            ax.set_ylabel(what, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
        axes[0, j].legend(fontsize=5)
    fig.suptitle("fastcls growth curves, log-log: CPU seconds above the zero-work point (top; dotted: slope 1 "
                 "through the largest size) and peak memory (bottom); bench/scale.py", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| part | curve | sizes | wall s | CPU s | start-up CPU s | CPU s above start-up | peak MiB | slope (CPU) "
             "| slope above start-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for part, label, sizes, wall, cpu, peak, base in curves(results):
        above = ", ".join(f"{c - base:.1f}" for c in cpu) if base is not None else "-"
        lines.append(f"| {part} | {label} | {', '.join(f'{s:,}' for s in sizes)} | "
                     f"{', '.join(f'{w:.1f}' for w in wall)} | {', '.join(f'{c:.1f}' for c in cpu)} | "
                     f"{'-' if base is None else f'{base:.1f}'} | {above} | {', '.join(f'{p:.0f}' for p in peak)} | "
                     f"{slope(sizes, cpu):.2f} | {slope(sizes, cpu, base):.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["index", "train", "features", "ensemble", "store", "sweep",
                                                   "cache_read"])
    ap.add_argument("--image-sizes", nargs="+", type=int, default=[2000, 6000, 20000])
    ap.add_argument("--ensemble-sizes", nargs="+", type=int, default=[10, 50, 200])
    ap.add_argument("--ensemble-methods", nargs="+", default=list(ENSEMBLE_METHODS), choices=ENSEMBLE_METHODS,
                    help="plain: the mean in plain numpy (memory-mapped members), for comparison")
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--store-sizes", nargs="+", type=int, default=[100, 1000, 10000])
    ap.add_argument("--trials", nargs="+", type=int, default=[20, 60, 200])
    ap.add_argument("--read-sizes", nargs="+", type=int, default=[64, 128, 224])
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "scale.png"))
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--plain-upto", type=int, default=30000, help="train: plain fastai up to this many images")
    ap.add_argument("--plain-only", action="store_true", help="train: only the plain fastai curve, added to the "
                    "stored rows")
    ap.add_argument("--no-startup", action="store_true", help="keep the stored zero-work points (STARTUP)")
    ap.add_argument("--startup-repeats", type=int, default=3, help="measure each zero-work point this many times "
                    "and keep the least CPU time (its noise only adds: cold caches, waits for the disk)")
    ap.add_argument("--threads", type=int, default=2, help="OpenMP/BLAS threads of every measured process (1: CPU "
                    "seconds that busy-waiting threads do not inflate on a loaded machine)")
    args = ap.parse_args()
    _THREADS.update({k: str(args.threads) for k in _THREADS})
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if not args.plot_only:
        sys.path.insert(0, str(HERE))
        tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
        try:
            for part in args.parts:
                load0 = os.getloadavg()[0]
                sizes = {"ensemble": args.ensemble_sizes, "cache_read": args.read_sizes, "store": args.store_sizes,
                         "sweep": args.trials}.get(part, args.image_sizes)
                run = globals()[f"part_{part}"]
                if part == "ensemble":
                    run = lambda s, t: part_ensemble(s, t, args.items, args.classes, args.ensemble_methods)  # noqa
                if part == "train":
                    run = lambda s, t: part_train(s, t, args.plain_upto, args.plain_only)  # noqa: E731
                if part in STARTUP and not args.no_startup:
                    startup = results.setdefault("startup", {})
                    startup[part] = merge_rows(startup.get(part, []), least([run([STARTUP[part]], tmp)
                                                                             for _ in range(args.startup_repeats)]))
                results[part] = merge_rows(results.get(part, []), run(sizes, tmp))
                results.setdefault("meta", {})[part] = {"cpus": os.cpu_count(), "load": [load0, os.getloadavg()[0]],
                                                        "date": time.strftime("%Y-%m-%d %H:%M"),
                                                        "threads": args.threads}
                out.write_text(json.dumps(results, indent=1))  # after each part: an interrupted run keeps them
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    plot(results, Path(args.plot))
    print(table(results))


if __name__ == "__main__":
    main()
