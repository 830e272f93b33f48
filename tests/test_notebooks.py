"""Every notebook in nbs/ runs top to bottom on small settings, in a kernel of this very Python, and is stored in git
with its outputs cleared. Notebooks that need ../shared/data skip with the reason when it is absent."""

import os
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, SHARED_DATA, shared_data

nbformat = pytest.importorskip("nbformat", reason="the dev extra (nbformat, nbclient, ipykernel) is not installed")
NBS = ROOT / "nbs"
NOTEBOOKS = sorted(NBS.glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4, NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: clear its outputs before committing"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel spec that runs this interpreter (the venv's python), found first through JUPYTER_PATH."""
    from ipykernel.kernelspec import install
    prefix = tmp_path_factory.mktemp("kernel")
    install(kernel_name="fastcls-test", prefix=str(prefix))
    return prefix / "share" / "jupyter", "fastcls-test"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, kernel, tmp_path, monkeypatch):
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    for name in nb.metadata.get("fastcls", {}).get("shared_data", []):
        shared_data(name)  # skips with "shared data ... is not present"
    jupyter_path, kernel_name = kernel
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join([str(jupyter_path), os.environ.get("JUPYTER_PATH", "")]))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FASTCLS_NB_QUICK", "1")
    monkeypatch.setenv("FASTCLS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("FASTCLS_SHARED_DATA", str(SHARED_DATA))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # one intra-op thread: on a busy CPU, torch's spinning worker threads make tiny models several times slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys, fastcls; print(sys.executable); print(fastcls.__file__)"))
    NotebookClient(nb, kernel_name=kernel_name, timeout=300, resources={"metadata": {"path": str(NBS)}}).execute()
    first = "".join(o.get("text", "") for o in nb.cells[0].outputs).split()
    assert Path(first[0]).resolve() == Path(sys.executable).resolve(), "the kernel must run the venv's python"
    assert Path(first[1]).resolve().is_relative_to(ROOT), f"fastcls imported from {first[1]}, not this checkout"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2, "the notebook should show its pictures inline"
