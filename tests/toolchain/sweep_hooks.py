"""Test-only job functions for sweeps: wrap the real job (toolchain.cli.run_export_job) to crash or
stall the first attempt. Importable by spawned job processes (they inherit sys.path) and pickled by
value for Ray workers (ray.cloudpickle.register_pickle_by_value)."""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sqexport.toolchain.cli import run_export_job


def _claim(marker: Path) -> bool:
    """True for exactly one caller across processes: the first to create the marker."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


@dataclass(frozen=True)
class CrashFirst:
    """The first job to run SIGKILLs its own process; every later call (its retry too) runs normally."""

    marker: str

    def __call__(self, argv, outdir):
        if _claim(Path(self.marker)):
            os.kill(os.getpid(), signal.SIGKILL)
        return run_export_job(argv, outdir)


@dataclass(frozen=True)
class StallFirst:
    """The first job to run writes its pid to `marker` and sleeps (the test kills the process);
    every later call runs normally."""

    marker: str
    seconds: float = 120.0

    def __call__(self, argv, outdir):
        if _claim(Path(self.marker)):
            Path(outdir).parent.mkdir(parents=True, exist_ok=True)
            time.sleep(self.seconds)  # killed long before this ends
        return run_export_job(argv, outdir)


def latency_by_size(baseline, model):
    """Deterministic stand-in for timing (--auto tests): p50 proportional to the file size."""
    base, m = baseline.stat().st_size / 1e5, model.stat().st_size / 1e5
    return {"threads": 1, "baseline": {"p50": base}, "model": {"p50": m}, "speedup": base / m}
