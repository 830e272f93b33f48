"""Real child processes for the reliability tests: `python -m fastcls ...` or a small script, from this checkout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def child_env(**extra) -> dict:
    """The environment of a child: this checkout first on the path, one torch thread, no model hub, no fault."""
    env = {k: v for k, v in os.environ.items() if k != "FASTCLS_FAULT"}
    # one thread: on a shared 2-core machine torch's default threads spin against each other (much slower)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start(args, **env) -> subprocess.Popen:
    """Start `python -m fastcls ARGS` (or `python -c CODE` when args[0] == '-c')."""
    cmd = [sys.executable] + (list(args) if args[0] == "-c" else ["-m", "fastcls", *map(str, args)])
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run(args, timeout=300, **env) -> subprocess.CompletedProcess:
    p = start(args, **env)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def wait_for_pause(p: subprocess.Popen, timeout=300) -> str:
    """Read the child's stderr until it reports a FASTCLS_FAULT pause; returns what it printed."""
    seen, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = p.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "FASTCLS_FAULT paused" in line:
            return "".join(seen)
    p.kill()
    raise AssertionError(f"the child never paused (exit {p.poll()}):\n{''.join(seen)}")


def signal_and_wait(p: subprocess.Popen, sig=signal.SIGTERM, timeout=120):
    p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in this process too: bitwise comparisons with the children need the same thread count, and
    on a shared 2-core machine two spinning threads are many times slower than one."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
