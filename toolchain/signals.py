"""SIGINT, SIGTERM and SIGHUP become one exception that unwinds the stack, so every `finally` and
context manager (the temporary output folder above all) cleans up; the CLI turns it into one line
and exit 128 + signal number (130, 143, 129).

`Interrupted` derives from BaseException so the many `except Exception` blocks around library
calls let it through. Some libraries swallow even that (a signal in the first moments of a
torch.onnx export used to vanish and the run finished with exit 0), so a received signal is also
remembered and `check()` re-raises it at every stage boundary and before the output is committed.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from sqexport.contracts.errors import Interruption

__all__ = ["Interrupted", "install", "check", "received", "deferred", "HANDLED"]

HANDLED = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

_pending: list[int] = []
_deferred = [0]


class Interrupted(Interruption):
    """A handled signal arrived; `exit_code` is the shell convention 128 + signal number."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + int(signum)
        super().__init__(signal.Signals(signum).name)


def _handler(signum, frame):
    if signum not in _pending:
        _pending.append(signum)
    if not _deferred[0]:
        raise Interrupted(signum)


def install() -> None:
    """Route the handled signals to `Interrupted` (main thread only; elsewhere a no-op).

    A signal the parent set to be ignored stays ignored, as Python itself does for SIGINT:
    `nohup` ignores SIGHUP, and a shell starts background jobs with SIGINT ignored.
    A file-size limit (`ulimit -f`) normally kills the process with SIGXFSZ and leaves the
    temporary folder behind; ignored, the write fails with EFBIG, an ordinary OSError."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in HANDLED:
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _handler)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def received() -> int | None:
    """The first handled signal received since install(), if any. Any error raised after one
    is a consequence of it (an import cut in half breaks later imports in odd ways)."""
    return _pending[0] if _pending else None


def check() -> None:
    """Raise `Interrupted` if a signal arrived, even if library code swallowed the exception."""
    if _pending:
        raise Interrupted(_pending[0])


@contextmanager
def deferred():
    """Signals only remembered, not raised, inside (for cleanup and commit steps that must not be
    cut in half); call `check()` afterwards where the signal should still take effect."""
    _deferred[0] += 1
    try:
        yield
    finally:
        _deferred[0] -= 1
