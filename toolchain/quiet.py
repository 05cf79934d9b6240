"""Library chatter that says nothing about the user's model stays off stderr (with --quiet and
without, and when HOME is unusable):

- onnxruntime writes "Failed to persist telemetry device ID" from C++ straight to file descriptor 2
  while it is imported (before any Python setting can reach it); the import runs with fd 2 pointed
  at a temporary file, which is replayed only if the import fails. Afterwards its default logger
  shows errors only (sqexport's own sessions already log errors only).
- matplotlib logs notes about a config folder it cannot create; its logger shows errors only.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

__all__ = ["quiet_libraries"]

_DONE: list[bool] = []


def _import_onnxruntime_quietly():
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import onnxruntime
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())  # a failed import keeps what it printed
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return onnxruntime


def quiet_libraries() -> None:
    """Once per process, before anything imports onnxruntime."""
    if _DONE:
        return
    _import_onnxruntime_quietly().set_default_logger_severity(3)
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    _DONE.append(True)
