"""What the bad-image check costs before training: first scan, cached re-scan, and a full-size decode for comparison.

    python bench/scan_images.py [FOLDER ...]     (default: the shared imagenette-mini and simpsons folders)

The check (`fastcls.data.check_images`) decodes every image once with the getter's own code path, JPEGs at 1/8
scale (PIL draft mode: still reads every byte, so truncation is found), in a thread pool, and caches each verdict
by path, size and mtime in the runs folder; array layouts (npz, digits) are not scanned.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastcls.data import IMAGE_EXTS, load_image, scan_images  # noqa: E402
from fastcls.data.check import _image_problem  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main():
    folders = [Path(a) for a in sys.argv[1:]] or [SHARED / "imagenette-mini", SHARED / "simpsons"]
    for folder in folders:
        files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_EXTS]
        if not files:
            print(f"{folder}: no images")
            continue
        mb = sum(p.stat().st_size for p in files) / 2**20
        cache = tempfile.mkdtemp()
        t = time.perf_counter()
        bad = scan_images(files, cache_dir=cache)
        first = time.perf_counter() - t
        t = time.perf_counter()
        scan_images(files, cache_dir=cache)
        cached = time.perf_counter() - t
        t = time.perf_counter()
        for p in files:
            _image_problem(str(p))
        serial = time.perf_counter() - t
        t = time.perf_counter()
        for p in files:
            load_image(p)
        full = time.perf_counter() - t
        n = len(files)
        print(f"{folder.name}: {n} images, {mb:.0f} MB, {len(bad)} bad | scan {first:.2f} s "
              f"({1e3 * first / n:.2f} ms/img, "
              f"thread pool) | cached re-scan {cached:.3f} s | serial scan {serial:.2f} s | full-size decode "
              f"{full:.2f} s")


if __name__ == "__main__":
    main()
