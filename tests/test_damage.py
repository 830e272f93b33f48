"""The damage matrix: every file a run folder holds (and the index) x each kind of damage x each command that reads
the store. Each case ends in exit status 2 with a message naming the damaged file (or 0 where the command does not
need that file), never a traceback, and changes no file of the store or of the folder around it. The same commands
on a read-only copy of a healthy store all succeed.

Which cases run (a covering design, `runs_case`; `test_the_design_covers_the_matrix` checks it):
- every (file, damage) pair, each on a fresh copy of the store, with at least the commands below;
- every case where the damage decides the outcome, in full: each command x each damage of each file it needs
  (exit 2, or the HARMLESS damage it must survive), `resume` on every case, and the index linked out of the store;
- every damage that cannot matter (a file the command does not need; a damaged index, which is rebuilt) in two
  damages per (file, command): `outside` (a link out of the store, which no command may write through) and one
  more, rotating over the other five kinds so that each command meets every kind on some file it does not need.
The full product (576 commands) ran in ~200 s, most of it `report` drawing its figures for cases whose outcome
the damage cannot change; this design runs 360 of them."""

import hashlib
import json
import os
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fastcls.cli import app

FILES = ["config.json", "meta.json", "metrics.json", "vocab.json", "valid_ids.json", "test_ids.json",
         "valid_probs.npy", "valid_targets.npy", "test_probs.npy", "history.csv", "model.safetensors", "index.sqlite"]
DAMAGES = ["deleted", "zero", "truncated", "random", "wrong", "outside"]
COMMANDS = ["runs", "show", "ensemble", "submit", "report", "resume", "predict", "export"]

# the files each command needs (damage to one of these: exit 2 naming it; to any other: the command still works);
# `resume` refuses a done run whatever its files hold, so it always exits 2
NEEDS = {
    "runs": set(),
    "show": {"config.json", "metrics.json", "history.csv"},
    "ensemble": {"config.json", "vocab.json", "valid_ids.json", "test_ids.json", "valid_probs.npy",
                 "valid_targets.npy", "test_probs.npy"},
    # the stored test views and the TTA blend the run chose on valid (meta.json, beside its post-hoc steps)
    "submit": {"config.json", "meta.json", "vocab.json", "test_ids.json", "test_probs.npy"},
    "report": {"config.json", "meta.json", "metrics.json", "vocab.json", "valid_ids.json", "valid_probs.npy",
               "valid_targets.npy", "history.csv"},
    # new images through the stored model: its config, statistics and checksum (meta.json), vocab and weights
    "predict": {"config.json", "meta.json", "vocab.json", "model.safetensors"},
    "export": {"config.json", "meta.json", "vocab.json", "model.safetensors"},
}
# damage that leaves a file usable: a deleted optional file, or a "wrong" file a command does not look inside
HARMLESS = {("history.csv", "deleted"), ("metrics.json", "deleted"), ("history.csv", "wrong"),
            ("history.csv", "truncated")}  # half a CSV is a shorter CSV


def _decides(fname: str, how: str, cmd: str) -> bool:
    """Whether this damage to this file decides what `cmd` does (exit 2, or surviving a HARMLESS damage)."""
    if cmd == "resume":
        return True
    if fname == "index.sqlite":
        return how == "outside"
    return fname in NEEDS[cmd]


def runs_case(fname: str, how: str, cmd: str) -> bool:
    """The covering design (module docstring): every deciding case; two damages per (file, command) otherwise."""
    if _decides(fname, how, cmd) or how == "outside":
        return True
    unneeded = [f for f in FILES if not _decides(f, "zero", cmd)]
    return DAMAGES[unneeded.index(fname) % 5] == how


def test_the_design_covers_the_matrix():
    run = {(f, h, c) for f in FILES for h in DAMAGES for c in COMMANDS if runs_case(f, h, c)}
    assert {(f, h) for f, h, _ in run} == {(f, h) for f in FILES for h in DAMAGES}
    assert all(sum((f, h, c) in run for h in DAMAGES) >= 2 for f in FILES for c in COMMANDS)
    succeeds = {(h, c) for f, h, c in run if c != "resume" and (not _decides(f, h, c) or (f, h) in HARMLESS)}
    assert succeeds == {(h, c) for h in DAMAGES for c in COMMANDS if c != "resume"}  # each kind, on a file not needed
    deciding = {(f, h, c) for f in FILES for h in DAMAGES for c in COMMANDS if _decides(f, h, c)}
    assert deciding <= run and len(run) < len(FILES) * len(DAMAGES) * len(COMMANDS)


def _damage(path: Path, how: str, outside: Path):
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(max(len(data), 64)))
    elif how == "wrong":  # parseable, of the wrong shape or type
        if path.suffix == ".npy":
            np.save(path, np.arange(3, dtype=np.int32 if "probs" in path.name else np.float32))
        elif path.suffix == ".json":
            path.write_text(json.dumps("a string"))  # (a meta.json naming another folder: test_store_safety)
        elif path.suffix == ".csv":
            path.write_text("a,b\n1,2\n")
        elif path.name == "index.sqlite":
            path.unlink()
            with sqlite3.connect(path) as con:
                con.execute("CREATE TABLE runs (id)")
                con.execute("INSERT INTO runs VALUES (?)", (str(outside),))
        else:
            from safetensors.numpy import save_file
            save_file({"x": np.zeros(2, np.float32)}, str(path))
    elif how == "outside":  # a link out of the store, to a file the user owns
        target = outside / f"victim-{path.name}"
        target.write_bytes(data)
        path.unlink()
        path.symlink_to(target)


def _snapshot(root: Path) -> dict:
    """Every file and link under `root` (the store and what surrounds it): name -> content hash or link target."""
    snap = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            snap[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            snap[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def _args(command: str, runs: Path, rid: str, out: Path, images: Path = None) -> list:
    return {"runs": ["runs"], "show": ["show", rid], "resume": ["resume", rid],
            "predict": ["predict", rid, "--data", images, "--out", out / "pred.csv"],
            "export": ["export", rid, "--out", out / "bundle"],
            "ensemble": ["ensemble", rid, rid, "--method", "mean", "--tta-beta", "1"],
            "submit": ["submit", rid, "--out", out / "sub.csv"],
            "report": ["report", rid, "--top", "0", "--out", out / "report"]}[command] + ["--runs-dir", runs]


@pytest.fixture(scope="module")
def world(digits_store, tmp_path_factory):
    rid = next(p.name for p in Path(digits_store).iterdir() if (p / "meta.json").is_file())
    return Path(digits_store), rid, tmp_path_factory


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two new 8x8 digit images for `predict` (a folder of images: the fastest input it takes)."""
    from PIL import Image
    folder = tmp_path_factory.mktemp("new-images")
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"new{i}.png")
    return folder


def _invoke(args):
    from typer.testing import CliRunner
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("fname", FILES)
def test_damage_matrix(world, images, fname):
    """One file x every damage x the commands `runs_case` picks (the store copied fresh per damage, hashed around
    each command)."""
    store, rid, tmp = world
    for how in DAMAGES:
        base = tmp.mktemp(f"{fname}-{how}")
        runs, outside, out = base / "runs", base / "outside", base / "out"
        shutil.copytree(store, runs)
        outside.mkdir()
        out.mkdir()
        (outside / "metrics.json").write_text("{\"user\": \"data\"}")
        path = runs / fname if fname == "index.sqlite" else runs / rid / fname
        _damage(path, how, outside)
        for cmd in [c for c in COMMANDS if runs_case(fname, how, c)]:
            case = f"{fname} {how} {cmd}"
            before = _snapshot(base)
            res = _invoke(_args(cmd, runs, rid, out, images))
            text = res.output.replace("\n", " ")
            assert "Traceback" not in text and res.exception is None or isinstance(res.exception, SystemExit), \
                f"{case}: {res.exception!r}\n{text}"
            after = _snapshot(base)
            changed = {k for k in before if after.get(k) != before[k]} | (set(after) - set(before))
            if fname == "index.sqlite" and how != "outside":  # a damaged index is rebuilt, the old one kept aside
                changed = {k for k in changed if not k.startswith("runs/index.sqlite")}
            needed = cmd == "resume" or (fname in NEEDS[cmd] and (fname, how) not in HARMLESS)
            if fname == "index.sqlite":  # damaged: rebuilt from the run folders; a link out of the store: refused
                needed = cmd == "resume" or how == "outside"
            if needed:
                assert res.exit_code == 2, f"{case}: exit {res.exit_code}\n{text}"
                if cmd != "resume":
                    assert fname in text and "doctor" in text, f"{case}: the message does not name the file\n{text}"
                assert not changed, f"{case}: changed {sorted(changed)}"
            else:
                assert res.exit_code == 0, f"{case}: exit {res.exit_code}\n{text}"
                written = {k for k in changed if not k.startswith("out/")}
                if cmd == "submit":  # records the written submission for `fastcls lb` (its file and its lock)
                    written -= {"runs/submissions.json", "runs/submissions.json.lock"}
                if cmd == "ensemble":  # stores its run: a new folder and its index row, nothing else
                    new_run = {k for k in written if k.startswith("runs/") and k.split("/")[1] not in (rid,)}
                    written -= new_run | {"runs/index.sqlite", "runs/index.sqlite-wal", "runs/index.sqlite-shm"}
                assert not written, f"{case}: changed {sorted(written)}"
            assert (outside / "metrics.json").read_text() == "{\"user\": \"data\"}"


@contextmanager
def read_only(base: Path):
    """`base` read-only for this process; as root (who ignores permissions) by running as `nobody` meanwhile."""
    for p in [base, *base.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~0o222 | (0o555 if p.is_dir() else 0o444))
    root = os.geteuid() == 0
    opened = []
    if root:  # let `nobody` reach the folder and write its output folder only
        for p in [*base.parents][:-1]:
            opened.append((p, p.stat().st_mode))
            p.chmod(p.stat().st_mode | 0o055)  # `nobody` keeps group root: group bits apply
        os.seteuid(65534)
    try:
        yield
    finally:
        if root:
            os.seteuid(0)
            for p, mode in opened:
                p.chmod(mode)
        for p in [base, *base.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o200)


def test_read_only_store_every_reading_command_works(world, images, tmp_path_factory):
    store, rid, _ = world
    base = tmp_path_factory.mktemp("ro")
    shutil.copytree(store, base / "runs")
    shutil.copytree(images, base / "images")  # where `nobody` can read them
    reading = ("runs", "show", "ensemble", "submit", "predict", "export")
    out = tmp_path_factory.mktemp("ro-out")
    out.chmod(0o777)
    warm = tmp_path_factory.mktemp("warm")  # first on a writable copy: as `nobody`, lazy imports from a private
    shutil.copytree(store, warm / "runs")   # Python install would fail
    for cmd in reading:
        assert _invoke(_args(cmd, warm / "runs", rid, warm, images)).exit_code == 0
    before = _snapshot(base)
    with read_only(base):
        assert not os.access(base / "runs", os.W_OK, effective_ids=os.access in os.supports_effective_ids)
        results = {cmd: _invoke(_args(cmd, base / "runs", rid, out, base / "images")) for cmd in reading}
        ens_sub = _invoke(["ensemble", rid, rid, "--submission", out / "ens.csv", "--runs-dir", base / "runs"])
    for cmd, res in results.items():
        assert res.exit_code == 0, f"{cmd}: {res.output} {res.exception!r}"
    assert "not stored: the store is read-only" in results["ensemble"].output
    assert ens_sub.exit_code == 0, ens_sub.output
    assert (out / "ens.csv").read_text().count("\n") == (out / "sub.csv").read_text().count("\n")
    assert _snapshot(base) == before  # not even a -wal or -shm file beside the index
    assert (out / "pred.csv").read_text() == (warm / "pred.csv").read_text()  # the same predictions as writable
    assert (out / "bundle" / "manifest.json").is_file() and not (out / ".bundle.tmp").exists()
