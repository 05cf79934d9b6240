"""Helpers for tests that start sqexport (or its children) as a separate process."""
from __future__ import annotations

import signal
from pathlib import Path


def signals_as_from_a_terminal():
    """preexec_fn: the child starts with SIGINT and SIGHUP at their defaults. A shell starts
    background jobs with SIGINT ignored (nohup: SIGHUP), an ignored signal stays ignored across
    exec, and sqexport keeps it ignored by design; the test must not depend on how pytest was run."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def alive(pid: int) -> bool:
    """Whether `pid` still runs: a zombie has exited, only its parent's wait is missing."""
    try:
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return " Z " not in state + " "
