"""A run store cannot be turned against its user: ids and file names stay inside the store, a damaged index is
rebuilt (the damaged file kept), a full disk says how to resume, messages print user text as is, and `fastcls
doctor` finds and marks damaged runs without deleting anything."""

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from fastcls.errors import FastclsError
from fastcls.runs import RunStore

from .conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (conftest) for the trainings below


def _copy(digits_store, tmp_path) -> tuple:
    runs = tmp_path / "runs"
    shutil.copytree(digits_store, runs)
    rid = next(p.name for p in runs.iterdir() if (p / "meta.json").is_file())
    return runs, rid


def _victim(tmp_path) -> Path:
    """A user's folder outside the store that looks like a resumable run."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metrics.json").write_text('{"mine": 1}')
    return victim


def test_a_run_id_in_meta_json_never_leads_outside_the_store(digits_store, tmp_path, cli):
    runs, rid = _copy(digits_store, tmp_path)
    victim = _victim(tmp_path)
    shutil.copy(runs / rid / "config.json", victim / "config.json")
    meta = json.loads((runs / rid / "meta.json").read_text())
    (runs / rid / "meta.json").write_text(json.dumps({**meta, "id": str(victim), "status": "interrupted"}))
    (runs / "index.sqlite").unlink()  # the index is rebuilt from the folders: where meta.json's id is read
    res = cli("runs", "--runs-dir", runs)
    assert res.exit_code == 0 and str(victim) not in res.output and "broken" in res.output, res.output
    for cmd in (["report", "tiny-digits"], ["resume", "tiny-digits"], ["show", str(victim)]):
        res = cli(*cmd, "--runs-dir", runs)
        assert res.exit_code == 2 and "Traceback" not in res.output, (cmd, res.output)
    assert sorted(p.name for p in victim.iterdir()) == ["config.json", "metrics.json"]
    assert (victim / "metrics.json").read_text() == '{"mine": 1}'


def test_an_index_row_naming_a_path_is_no_run(digits_store, tmp_path, cli):
    runs, rid = _copy(digits_store, tmp_path)
    victim = _victim(tmp_path)
    with sqlite3.connect(runs / "index.sqlite") as con:
        row = dict(zip([c[0] for c in con.execute("SELECT * FROM runs").description],
                       con.execute("SELECT * FROM runs").fetchone()))
        row.update(id=str(victim), name="evil", status="interrupted")
        con.execute(f"INSERT INTO runs ({','.join(row)}) VALUES ({','.join('?' * len(row))})", list(row.values()))
    assert "evil" not in cli("runs", "--runs-dir", runs).output
    for cmd in (["report", "evil"], ["resume", "evil"], ["resume", str(victim)]):
        res = cli(*cmd, "--runs-dir", runs)
        assert res.exit_code == 2 and "Traceback" not in res.output, (cmd, res.output)
    with pytest.raises(FastclsError, match="not read or written"):
        RunStore(runs).run_dir(str(victim))
    assert sorted(p.name for p in victim.iterdir()) == ["metrics.json"]


def test_a_run_folder_linked_out_of_the_store_is_refused(digits_store, tmp_path, cli):
    runs, rid = _copy(digits_store, tmp_path)
    shutil.rmtree(runs / rid / "report", ignore_errors=True)  # an earlier test may have reported on the shared run
    elsewhere = tmp_path / "elsewhere"
    shutil.move(runs / rid, elsewhere)
    (runs / rid).symlink_to(elsewhere)
    res = cli("report", rid, "--runs-dir", runs)
    assert res.exit_code == 2 and "not read or written" in res.stderr, res.output
    assert not (elsewhere / "report").exists()


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_a_damaged_index_is_rebuilt_and_kept_aside(digits_store, tmp_path, cli, damage):
    runs, rid = _copy(digits_store, tmp_path)
    index = runs / "index.sqlite"
    data = index.read_bytes()
    index.write_bytes(np.random.default_rng(1).bytes(len(data)) if damage == "random" else data[:len(data) // 2])
    res = cli("runs", "--runs-dir", runs)
    assert res.exit_code == 0 and rid in res.stdout, res.output
    kept = [p for p in runs.glob("index.sqlite.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(kept) == 1 and str(kept[0]) in res.stderr.replace("\n", "")


def test_a_full_disk_mid_run_says_how_to_resume(tmp_path, cli, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("FASTCLS_FAULT", "write-checkpoint.safetensors:enospc")
    res = cli("train", "digits", "simple_cnn", *TINY, "--name", "full", "--runs-dir", runs)
    msg = res.stderr.replace("\n", " ")
    assert res.exit_code == 2 and "Traceback" not in res.output and "filled" in msg and "fastcls resume" in msg, \
        res.output
    rid = RunStore(runs).leaderboard(status=None)["id"].iloc[0]
    meta = json.loads((runs / rid / "meta.json").read_text())
    assert meta["status"] == "failed" and "disk filled" in meta["note"]
    monkeypatch.delenv("FASTCLS_FAULT")
    res = cli("resume", rid, "--runs-dir", runs, "--quiet")
    assert res.exit_code == 0 and RunStore(runs).load(rid).status == "done", res.output


def test_a_zero_byte_test_probs_is_named_not_an_abort(digits_store, tmp_path, cli):
    runs, rid = _copy(digits_store, tmp_path)
    (runs / rid / "test_probs.npy").write_bytes(b"")
    res = cli("submit", rid, "--out", tmp_path / "s.csv", "--runs-dir", runs)
    assert res.exit_code == 2 and "test_probs.npy" in res.stderr and "Aborted" not in res.output, res.output


def test_a_member_missing_test_probs_is_refused_by_ensemble(digits_store, tmp_path, cli):
    runs, rid = _copy(digits_store, tmp_path)
    (runs / rid / "test_probs.npy").unlink()
    res = cli("ensemble", rid, rid, "--runs-dir", runs)
    assert res.exit_code == 2 and "test_probs.npy is missing" in res.stderr.replace("\n", " "), res.output


def test_user_text_is_printed_as_is_never_as_markup(digits_store, tmp_path, cli):
    res = cli("show", "nope", "--runs-dir", "/x/data[/old]")
    assert res.exit_code == 2 and "/x/data[/old]" in res.stderr and "Traceback" not in res.output, res.output
    runs, rid = _copy(digits_store, tmp_path)
    res = cli("ensemble", rid, rid, "--method", "weighted", "--weights", "nan,1", "--runs-dir", runs)
    assert res.exit_code == 2 and "[nan, 1.0]" in res.stderr, res.output
    red = tmp_path / "[red]runs"
    shutil.copytree(runs, red)
    res = cli("runs", "--runs-dir", red)
    assert res.exit_code == 0 and "[red]runs" in res.output


def test_doctor_finds_and_marks_damage_and_deletes_nothing(digits_store, tmp_path, cli):
    runs, rid = _copy(digits_store, tmp_path)
    assert cli("doctor", "--runs-dir", runs).exit_code == 0
    (runs / rid / "valid_probs.npy").write_bytes(b"\x93NUMPY garbage")
    before = {p.relative_to(runs) for p in runs.rglob("*") if not p.name.endswith(("-wal", "-shm"))}  # SQLite's
    res = cli("doctor", "--runs-dir", runs)
    assert res.exit_code == 1 and "valid_probs.npy" in res.output, res.output
    res = cli("doctor", "--fix", "--runs-dir", runs)
    assert res.exit_code == 0 and f"marked run {rid} broken" in res.output, res.output
    assert before <= {p.relative_to(runs) for p in runs.rglob("*")}  # nothing deleted
    assert json.loads((runs / rid / "meta.json").read_text())["status"] == "broken"
    assert "broken" in cli("runs", "--runs-dir", runs).output
    res = cli("show", rid, "--runs-dir", runs)
    assert res.exit_code == 2 and "broken" in res.stderr, res.output


def test_a_name_already_taken_is_refused_before_training(digits_store, tmp_path, cli):
    """--name must find one run later: a second run (or ensemble) of a taken name is refused before it trains."""
    runs, rid = _copy(digits_store, tmp_path)
    before = sorted(p.name for p in runs.iterdir())
    res = cli("train", "digits", "simple_cnn", *TINY, "--name", "tiny-digits", "--runs-dir", runs)
    msg = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in msg, msg
    assert f"--name 'tiny-digits' is taken: run {rid} (train, done) in {runs} has it" in msg
    assert "Nothing was trained; choose another --name" in msg
    res = cli("ensemble", rid, rid, "--name", "tiny-digits", "--runs-dir", runs)
    assert res.exit_code == 2 and f"--name 'tiny-digits' is taken: run {rid}" in " ".join(res.output.split())
    for cmd in (["probe", "digits", "simple_cnn"], ["distill", rid, "--arch", "simple_cnn"]):  # they store runs too
        res = cli(*cmd, "--name", "tiny-digits", "--runs-dir", runs)
        msg = " ".join(res.output.split())
        assert res.exit_code == 2 and f"--name 'tiny-digits' is taken: run {rid}" in msg, (cmd, msg)
    RunStore(runs).set_status(rid, "interrupted", note="test")
    res = cli("train", "digits", "simple_cnn", *TINY, "--name", "tiny-digits", "--runs-dir", runs)
    assert res.exit_code == 2 and f"continue it with `fastcls resume {rid}`" in " ".join(res.output.split())
    assert sorted(p.name for p in runs.iterdir()) == before
    assert cli("show", "tiny-digits", "--runs-dir", runs).exit_code == 0  # still one run of that name
