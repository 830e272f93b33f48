"""Fault injection for the reliability tests: make a real process die, pause or be interrupted at a named point.

Set `FASTCLS_FAULT=<point>[:kill|pause|interrupt|enospc]` (kill is the default). `kill` sends SIGKILL to the process itself
(a real `kill -9` at a known moment), `pause` prints a line to stderr and sleeps so a test can send a signal,
`interrupt` raises KeyboardInterrupt as Ctrl-C would, `enospc` raises the OSError of a full disk. Unset (the normal case) it costs one dict lookup.
"""

__all__ = ["fault"]

import os
import signal
import sys
import time


def fault(point: str):
    """Die, pause or raise KeyboardInterrupt here when FASTCLS_FAULT names `point`."""
    spec = os.environ.get("FASTCLS_FAULT")
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    if action in ("", "kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        print(f"FASTCLS_FAULT paused at {point}", file=sys.stderr, flush=True)
        time.sleep(600)
    elif action == "interrupt":
        raise KeyboardInterrupt(f"FASTCLS_FAULT at {point}")
    elif action == "enospc":
        import errno
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)
