"""Seconds per code cell of the notebooks in CI mode, as tests/test_notebooks.py runs them (FASTCLS_NB_QUICK=1, a
fresh kernel of this Python per notebook, one torch thread): where a notebook's test time goes.

    python bench/nb_times.py 01_quickstart 05_transfer_learning      # names in nbs/, without .ipynb

Prints `name total S [cell] S ...` per notebook and writes bench/results/notebooks.json. No test asserts a time.
"""

import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import nbformat
from ipykernel.kernelspec import install
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def seconds(cell) -> float:
    t = cell.metadata.get("execution", {})
    a, b = (datetime.fromisoformat(t[k].rstrip("Z")) for k in ("iopub.execute_input", "shell.execute_reply"))
    return (b - a).total_seconds()


def main(names):
    prefix = Path(tempfile.mkdtemp())
    install(kernel_name="fastcls-bench", prefix=str(prefix))
    os.environ.update(JUPYTER_PATH=str(prefix / "share" / "jupyter"), PYTHONPATH=str(ROOT), FASTCLS_NB_QUICK="1",
                      FASTCLS_SHARED_DATA=str(ROOT.parent / "shared" / "data"), HF_HUB_OFFLINE="1",
                      OMP_NUM_THREADS="1", MPLBACKEND="module://matplotlib_inline.backend_inline",
                      FASTCLS_CACHE=tempfile.mkdtemp())
    results = {}
    for name in names:
        os.environ["FASTCLS_RUNS"] = str(Path(tempfile.mkdtemp()) / "runs")
        nb = nbformat.read(ROOT / "nbs" / f"{name}.ipynb", as_version=4)
        t = time.perf_counter()
        NotebookClient(nb, kernel_name="fastcls-bench", timeout=600,
                       resources={"metadata": {"path": str(ROOT / "nbs")}}).execute()
        cells = {i: round(seconds(c), 1) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
        results[name] = {"total_s": round(time.perf_counter() - t, 1), "cells_s": cells}
        print(name, "total", results[name]["total_s"], " ".join(f"[{i}] {s}" for i, s in cells.items()), flush=True)
    out = ROOT / "bench" / "results" / "notebooks.json"
    out.write_text(json.dumps({"load": os.getloadavg(), "notebooks": results}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
