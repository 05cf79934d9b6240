"""Sweep jobs on this machine: one after another in this process, or each in its own process.

Processes are started with `spawn` (a fork of a process that holds torch and onnxruntime thread
pools can hang) and are not pooled: a job that crashes its process (killed, out of memory) takes
nothing else with it and is run once more in a fresh one. A job writes ROOT/<name> itself through
the same atomic output folder as `sqexport export`, so a killed attempt leaves only a marked
temporary folder that the next write beside it removes.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Protocol, Sequence

from sqexport.toolchain import signals
from sqexport.toolchain.output_folder import remove_stale_temps
from sqexport.toolchain.sweep_spec import Job
from sqexport.toolchain.sweep_state import Outcome, retryable

__all__ = ["JobFn", "Events", "run_sequential", "run_processes", "MAX_ATTEMPTS"]

# (argv as typed after `sqexport export`, output folder) -> (exit code, one-line message)
JobFn = Callable[[Sequence[str], str], "tuple[int, str]"]
MAX_ATTEMPTS = 2  # a crashed job process is retried once
_POLL_S = 1.0
_STOP_S = 15.0  # how long a terminated job process gets to remove its temporary folder


class Events(Protocol):
    def started(self, job: Job, attempt: int) -> None: ...
    def retrying(self, job: Job, why: str) -> None: ...
    def finished(self, job: Job, outcome: Outcome) -> None: ...


def run_sequential(jobs: Sequence[Job], root: Path, job_fn: JobFn, events: Events) -> None:
    """In this process, in order: what `sqexport export` would do, job after job."""
    for job in jobs:
        events.started(job, 1)
        t0 = time.monotonic()
        code, message = job_fn(list(job.argv), str(root / job.name))
        events.finished(job, Outcome(job.name, code, message, round(time.monotonic() - t0, 2),
                                     where=os.uname().nodename))
        if code > 128:  # the user interrupted it: the rest of the sweep stops too
            raise signals.Interrupted(code - 128)


def _child(job_fn: JobFn, argv: list[str], outdir: str, conn) -> None:
    """A job process: signals unwind the job (its temporary folder goes) like the CLI's own."""
    signals.install()
    code, message = job_fn(argv, outdir)
    conn.send((code, message))
    conn.close()


class _Running:
    def __init__(self, job: Job, attempt: int, job_fn: JobFn, root: Path, ctx):
        self.job, self.attempt, self.t0 = job, attempt, time.monotonic()
        self.conn, child_end = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_child, args=(job_fn, list(job.argv), str(root / job.name), child_end),
                                name=f"sqexport-job-{job.name}", daemon=True)
        self.proc.start()
        child_end.close()  # only the child holds it now: its death ends the pipe

    def result(self) -> tuple[int | None, str]:
        answer = None
        try:
            if self.conn.poll():
                answer = self.conn.recv()
        except (EOFError, OSError):
            pass
        self.proc.join(timeout=_STOP_S)
        if answer is None:
            code = self.proc.exitcode
            return None if code is None or code >= 0 else code, f"job process died (exit code {code})"
        return answer

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: the job unwinds and removes its temporary folder
        self.proc.join(timeout=_STOP_S)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=_STOP_S)


def run_processes(jobs: Sequence[Job], root: Path, job_fn: JobFn, events: Events, workers: int) -> None:
    """At most `workers` job processes at a time. On an interrupt every job process is stopped
    and whatever temporary folders they left are removed before the interrupt goes on."""
    ctx = mp.get_context("spawn")
    todo: deque[tuple[Job, int]] = deque((job, 1) for job in jobs)
    running: dict[int, _Running] = {}
    try:
        while todo or running:
            while todo and len(running) < workers:
                job, attempt = todo.popleft()
                events.started(job, attempt)
                r = _Running(job, attempt, job_fn, root, ctx)
                running[r.proc.sentinel] = r
            for sentinel in wait(list(running), timeout=_POLL_S):
                r = running.pop(sentinel)
                code, message = r.result()
                if retryable(code) and r.attempt < MAX_ATTEMPTS:
                    events.retrying(r.job, message)
                    todo.appendleft((r.job, r.attempt + 1))
                    continue
                events.finished(r.job, Outcome(r.job.name, code if code is not None else -1, message,
                                               round(time.monotonic() - r.t0, 2), r.attempt, where=os.uname().nodename))
                if code is not None and code > 128:
                    raise signals.Interrupted(code - 128)
            signals.check()
    finally:
        with signals.deferred():
            for r in running.values():
                r.stop()
            remove_stale_temps(root)
