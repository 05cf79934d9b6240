"""Child processes (device commands, the runner, qemu) that never outlive sqexport.

Each child starts in its own session, so it is the leader of a new process group and everything
it starts (a shell's runner, qemu's threads) stays in that group. On every way out of the block
(normal end, error, timeout, SIGTERM/SIGINT turned into an exception by toolchain.signals) the
whole group gets SIGKILL and the child is reaped. A terminal's Ctrl-C reaches only the
foreground group, so without this the children kept running (qemu at 100% CPU after `check
--arch arm64` was interrupted, the runner after `bench` got SIGTERM).
"""
from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager
from typing import Iterator

__all__ = ["Children", "children", "run_child", "kill_group"]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's process group (the child and all it started), then reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is gone already
    try:
        proc.kill()
    except OSError:
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    proc.wait()


class Children:
    """The processes started in one block; see the module docstring."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            kill_group(proc)  # also after a normal exit: whatever the child left in its group dies
        self.procs.clear()


@contextmanager
def children() -> Iterator[Children]:
    group = Children()
    try:
        yield group
    finally:
        group.close()


def run_child(cmd, timeout: float, shell: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, killed with its group on any exit; a timeout
    raises subprocess.TimeoutExpired after the kill."""
    with children() as group:
        proc = group.start(cmd, shell=shell, env=env)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
