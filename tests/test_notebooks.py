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


def _missing_data(nb) -> str:
    """Why the notebook cannot run here (a ../shared/data folder it names is absent), or ''."""
    try:
        for name in nb.metadata.get("fastcls", {}).get("shared_data", []):
            shared_data(name)
    except pytest.skip.Exception as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def executed(kernel, tmp_path_factory):
    """Every notebook run top to bottom, each in its own kernel of this Python with its own run store, two at a time
    (each kernel is one process with one torch thread: two use a 2-core machine; they share the image cache, as a
    user's notebooks do). Returns {path: the executed notebook, or the reason it was skipped}."""
    import asyncio
    from nbclient import NotebookClient
    jupyter_path, kernel_name = kernel
    env = {**os.environ, "JUPYTER_PATH": os.pathsep.join([str(jupyter_path), os.environ.get("JUPYTER_PATH", "")]),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "FASTCLS_NB_QUICK": "1",
           "FASTCLS_SHARED_DATA": str(SHARED_DATA), "HF_HUB_OFFLINE": "1",
           # one intra-op thread: on a busy CPU, torch's spinning worker threads make tiny models several times slower
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    out, gate = {}, asyncio.Semaphore(max(1, min(2, os.cpu_count() or 1)))

    async def run(path):
        nb = nbformat.read(path, as_version=4)
        out[path] = _missing_data(nb)
        if out[path]:
            return
        nb.cells.insert(0, nbformat.v4.new_code_cell("import sys, fastcls; print(sys.executable); "
                                                     "print(fastcls.__file__)"))
        runs = tmp_path_factory.mktemp(f"runs-{path.stem}")
        async with gate:
            client = NotebookClient(nb, kernel_name=kernel_name, timeout=300,
                                    resources={"metadata": {"path": str(NBS)}})
            try:
                await client.async_execute(env={**env, "FASTCLS_RUNS": str(runs)})
            except Exception as e:  # a failing cell: its test reports it, the other notebooks still run
                out[path] = e
                return
        out[path] = nb

    async def run_all():
        await asyncio.gather(*(run(p) for p in NOTEBOOKS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # where this process finds the kernel spec
        asyncio.run(run_all())
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, executed):
    nb = executed[path]
    if isinstance(nb, str):
        pytest.skip(nb)
    if isinstance(nb, Exception):
        raise nb
    first = "".join(o.get("text", "") for o in nb.cells[0].outputs).split()
    assert Path(first[0]).resolve() == Path(sys.executable).resolve(), "the kernel must run the venv's python"
    assert Path(first[1]).resolve().is_relative_to(ROOT), f"fastcls imported from {first[1]}, not this checkout"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2, "the notebook should show its pictures inline"
