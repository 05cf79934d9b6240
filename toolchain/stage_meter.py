"""Wall time and peak resident memory of one pipeline stage.

The process's high-water mark (getrusage ru_maxrss) only says something about a stage that sets a
new record; a stage that peaks below an earlier one would read as "no memory". So a daemon thread
also samples the current RSS (/proc/self/statm, a cheap read) every SAMPLE_S while the stage
runs: the stage's peak is the new high-water mark when it set one, else the highest sample.
Resetting the kernel's high-water mark (/proc/self/clear_refs) would be exact but would also
erase the whole-run peak that /usr/bin/time and benchmarks read, so it is not done.
"""
from __future__ import annotations

import os
import resource
import sys
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from sqexport.contracts.progress import Progress

__all__ = ["StageMeter", "measured_stage", "current_rss_mb", "max_rss_mb"]

SAMPLE_S = 0.05
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def max_rss_mb() -> float:
    """The process's peak RSS so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return None  # no procfs: only the high-water mark is known


class StageMeter:
    """`with StageMeter() as m: ...` then m.seconds, m.peak_rss_mb (None if unmeasurable)."""

    def __init__(self):
        self.seconds = 0.0
        self.peak_rss_mb: float | None = None
        self._sampled = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            rss = current_rss_mb()
            if rss is not None:
                self._sampled = max(self._sampled, rss)

    def __enter__(self) -> "StageMeter":
        self._hwm = max_rss_mb()
        self._sampled = current_rss_mb() or 0.0
        self._thread = threading.Thread(target=self._sample, name="sqexport-rss", daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        now = current_rss_mb()
        sampled = max(self._sampled, now or 0.0)
        hwm = max_rss_mb()
        peak = hwm if hwm > self._hwm else sampled
        self.peak_rss_mb = round(peak, 1) if peak > 0 else None


@contextmanager
def measured_stage(progress: Progress, name: str) -> Iterator[StageMeter]:
    """Announce `name`, measure it, and report its time and peak RSS when it ends without error
    (an error is raised to the CLI, which prints it; the stage then has no finished line)."""
    progress.stage_started(name)
    with StageMeter() as meter:
        yield meter
    progress.stage_finished(name, meter.seconds, meter.peak_rss_mb)
