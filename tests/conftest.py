"""Shared fixtures: tiny settings so the suite trains on CPU in seconds, and paths to the shared real data."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ._proc import wave  # noqa: F401,E402  (session fixture: real child processes, shared by groups)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may wait on the model hub

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

MAX_WORKERS = 4  # `-n auto` (setup.cfg): one test process per core, at most this many (each holds torch: ~1 GB)
# the modules that use the session fixture `wave` (real child processes started together): one worker runs them all,
# so the wave starts once
WAVE_MODULES = ("tests/test_concurrency.py", "tests/test_interrupt.py", "tests/test_kill.py")
# the longest modules (or groups), started first so that no worker is left with one of them at the end
SLOW_FIRST = ("tests/test_notebooks.py", *WAVE_MODULES, "tests/test_ray.py", "tests/test_cv_student.py",
              "tests/test_inference.py", "tests/test_damage.py", "tests/test_distributed.py")


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist: each test module runs whole on one worker, so its module fixtures are built once, and the
    `WAVE_MODULES` share one worker. (xdist's own `--dist loadgroup` marks cannot group here: with pytest 9 they no
    longer reach the node ids it schedules by.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "wave" if _module(nodeid) in WAVE_MODULES else _module(nodeid)
    config.option.loadscopereorder = False  # in collection order: SLOW_FIRST first (below)
    return ByModule(config, log)


def pytest_collection_modifyitems(config, items):
    slow = {m: k for k, m in enumerate(SLOW_FIRST)}
    items.sort(key=lambda i: slow.get(_module(i.nodeid), len(slow)))  # stable: the rest keep their order
    stray = sorted({_module(i.nodeid) for i in items if "wave" in getattr(i, "fixturenames", ())} - set(WAVE_MODULES))
    if stray:
        raise pytest.UsageError(f"{', '.join(stray)} use the session fixture `wave`: add them to WAVE_MODULES in "
                                "tests/conftest.py, so that one worker runs them all and the wave starts once.")


# the smallest useful digits run: from-scratch tiny CNN, 16 px, one epoch on a 200-image sample, one TTA view
TINY = ["--size", "16", "--epochs", "1", "--freeze-epochs", "0", "--bs", "32", "--sample", "200", "--tta", "1",
        "--no-pretrained", "--quiet"]


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or a clean skip when it is absent (e.g. on a user's machine)."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"shared data {p} is not present")
    return p


@pytest.fixture(autouse=True, scope="session")
def _image_cache(tmp_path_factory):
    """Keep the pre-resized image cache (fastcls.data.cache) out of the user's home folder during tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTCLS_CACHE", str(tmp_path_factory.mktemp("image-cache")))
    yield
    mp.undo()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def cli(runner):
    """Invoke the fastcls CLI; returns the Result (exit_code, stdout, stderr)."""
    from fastcls.cli import app

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)
    return invoke


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory):
    """A run store holding one tiny `digits` run trained through the CLI (shared by read-back tests)."""
    from fastcls.cli import app
    runs = tmp_path_factory.mktemp("runs")
    with torch_threads(1):  # as `one_thread` below (a session fixture is set up before a module's one_thread)
        res = CliRunner().invoke(app, ["train", "digits", "simple_cnn", *TINY, "--name", "tiny-digits",
                                       "--runs-dir", str(runs)])
    assert res.exit_code == 0, res.output
    return runs


@pytest.fixture
def digits_copy(digits_store, tmp_path):
    """A private copy of `digits_store` for a test that writes into it (new runs, submissions, a report): the shared
    store stays as trained, holding the one run, whatever order the tests run in."""
    runs = tmp_path / "digits-runs"
    shutil.copytree(digits_store, runs)
    return runs


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models step
    ~50x slower with 2 threads on a busy 2-core CPU (OpenMP threads spin-waiting for each other), and gain nothing
    from a second thread on an idle one."""
    with torch_threads(1):
        yield


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n for a block, then restored."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def body_weights(tmp_path_factory):
    """A simple_cnn body weights file (`--weights`), so a run has a frozen stage (head only) before the unfrozen one."""
    import torch
    from safetensors.torch import save_file
    from fastcls.archs import SimpleCNN
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "simple_cnn_body.safetensors"
    save_file({k: v.contiguous() for k, v in SimpleCNN().state_dict().items()}, str(p))
    return p
