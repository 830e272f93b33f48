"""Images per second of `fastcls predict` (one run; a 3-member ensemble; one exported run with the ONNX runtime)
against a plain timm-style inference loop over the same images, model and size; the ratio per member (goal: at least
0.9x). Prints the table and writes `bench/results/predict.json`.

    OMP_NUM_THREADS=1 python bench/bench_predict.py [--arch resnet18] [--size 128] [--n 200] [--threads 1] [--reps 3]

The runs are stored with untrained weights (throughput does not depend on them) and no TTA views; the images are the
shared imagenette-mini validation JPEGs (224 px). Both sides decode every JPEG with PIL, squish-resize it, normalise
and run the same `nn.Sequential(body, head)` model in eval mode, batch by batch, in this process. `fastcls predict`
adds its image check (cached verdicts after the first call), model rebuild and weight checksum per member. The ONNX
row predicts with `fastcls export --onnx`'s model through onnxruntime (`--runtime onnx`; numpy preprocessing;
onnxruntime's intra-op threads = OMP_NUM_THREADS).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fastcls.archs import build_model  # noqa: E402
from fastcls.config import RunConfig  # noqa: E402
from fastcls.data import IMAGE_EXTS  # noqa: E402
from fastcls.inference import export, predict  # noqa: E402
from fastcls.runs import RunData, RunStore  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette-mini"


def store_runs(root: Path, arch: str, size: int, n_members: int) -> list:
    """`n_members` runs of `arch` with random weights, stored as training would store them."""
    store = RunStore(root)
    cfg = RunConfig.from_options("folder", arch, data=str(SHARED), size=size, pretrained=False, tta=0)
    vocab = [f"c{i}" for i in range(10)]
    ids = []
    for seed in range(n_members):
        torch.manual_seed(seed)
        model = build_model(arch, 10, ps=cfg.recipe.ps)
        p = np.full((1, 2, 10), 0.1, dtype=np.float32)
        ids.append(store.save(RunData(config=cfg.to_dict(), vocab=vocab, valid_probs=p, valid_targets=np.array([0, 1]),
                                      valid_ids=["a", "b"], metrics={}, weights=model.state_dict(),
                                      extra={"normalize_stats": cfg.norm_stats})))
    return ids


def plain_loop(files, arch: str, size: int, bs: int, stats) -> float:
    """Seconds of a plain inference loop: PIL decode, squish resize, normalise, batched forward, softmax."""
    model = build_model(arch, 10).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in stats)
    t = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(files), bs):
            x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size),
                                                                                           Image.BILINEAR)))
                             for f in files[lo:lo + bs]]).permute(0, 3, 1, 2).float().div_(255)
            model((x - mean) / std).softmax(1)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--bs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "predict.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    folder = SHARED / "val"
    files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTS][:a.n]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images"
        data.mkdir()
        for f in files:
            (data / f"{f.parent.name}-{f.name}").symlink_to(f)
        files = sorted(data.iterdir())
        ids = store_runs(Path(tmp) / "runs", a.arch, a.size, 3)
        store = RunStore(Path(tmp) / "runs")
        from fastcls.ensemble import ensemble
        ens = ensemble(store, ids, method="mean", n_boot=0).run_id
        stats = RunConfig.from_dict(store.load(ids[0]).config).norm_stats
        bundle = export(store, ids[0], Path(tmp) / "bundle", onnx=True)
        predict(store, ids[0], data=data, bs=a.bs)  # warm-up: imports, the image check's verdict cache
        predict(bundle, data=data, bs=a.bs, runtime="onnx")
        rows = {"plain loop": [], "fastcls predict, 1 run": [], "fastcls predict, 3-member ensemble": [],
                "fastcls predict --runtime onnx, 1 run": []}
        for _ in range(a.reps):  # interleaved repetitions: a shared CPU's load drifts
            rows["plain loop"].append(plain_loop(files, a.arch, a.size, a.bs, stats))
            t = time.perf_counter()
            predict(store, ids[0], data=data, bs=a.bs)
            rows["fastcls predict, 1 run"].append(time.perf_counter() - t)
            t = time.perf_counter()
            predict(store, ens, data=data, bs=a.bs)
            rows["fastcls predict, 3-member ensemble"].append((time.perf_counter() - t) / 3)
            t = time.perf_counter()
            predict(bundle, data=data, bs=a.bs, runtime="onnx")
            rows["fastcls predict --runtime onnx, 1 run"].append(time.perf_counter() - t)
    setting = (f"{len(files)} imagenette-mini JPEGs, {a.arch} at {a.size} px, bs {a.bs}, {a.threads} thread(s), "
               f"median of {a.reps} (ensemble: seconds per member)")
    print(setting)
    base = np.median(rows["plain loop"])
    table = []
    for name, secs in rows.items():
        med = float(np.median(secs))
        table.append({"what": name, "images_per_s": round(len(files) / med, 1), "vs_plain": round(base / med, 3),
                      "seconds": [round(s, 3) for s in secs]})
        print(f"  {name:40s} {len(files) / med:7.1f} images/s per member   {base / med:5.2f}x the plain loop   "
              f"(range {min(secs):.2f}-{max(secs):.2f} s)")
    a.out.write_text(json.dumps({"setting": setting, "command": "OMP_NUM_THREADS=1 python bench/bench_predict.py "
                                 + " ".join(sys.argv[1:]), "rows": table}, indent=1))


if __name__ == "__main__":
    main()
