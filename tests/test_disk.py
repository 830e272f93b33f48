"""Disk full or unwritable runs folder: a clear error before training, and nothing written."""

import shutil

import pytest

from fastcls.runs import RunStore

from ._proc import one_thread  # noqa: F401  (fixture)
from .conftest import TINY


def test_runs_dir_that_cannot_be_created(cli, tmp_path):
    """Tests run as root, which ignores permissions: a runs folder whose parent is a regular file fails for anyone."""
    (tmp_path / "afile").write_text("x")
    res = cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", tmp_path / "afile" / "runs")
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = res.stderr.replace("\n", " ")
    assert "cannot be written (Not a directory)" in msg and "--runs-dir" in msg


def test_too_little_free_space_stops_before_training(cli, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3 * 2**20))
    runs = tmp_path / "runs"
    res = cli("train", "digits", "simple_cnn", *TINY, "--runs-dir", runs)
    assert res.exit_code == 2 and "Traceback" not in res.output
    msg = res.stderr.replace("\n", " ")
    assert "3 MB free" in msg and "needs about" in msg and "Nothing was trained" in msg and "--runs-dir" in msg
    assert RunStore(runs).leaderboard(status=None).empty
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]


@pytest.mark.usefixtures("one_thread")
def test_space_estimate_covers_what_a_run_writes(digits_store, monkeypatch):
    """The estimate (weights x 9 + probabilities + 16 MB) must exceed what a stored run really takes."""
    used = sum(f.stat().st_size for f in digits_store.rglob("*") if f.is_file() and f.parent != digits_store)
    seen = []
    real = RunStore.check_writable
    monkeypatch.setattr(RunStore, "check_writable", lambda self, need_bytes=0: seen.append(need_bytes) or real(self))
    from fastcls.config import RunConfig
    from fastcls.train import fit_run
    cfg = RunConfig.from_options("digits", "simple_cnn", sample=200, size=16, epochs=1, freeze_epochs=0, bs=32, tta=1,
                      pretrained=False)
    fit_run(cfg, RunStore(digits_store.parent / "runs-estimate"), progress="none")
    assert max(seen) > 2 * used
