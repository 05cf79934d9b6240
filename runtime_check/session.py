"""onnxruntime sessions per target profile."""
from __future__ import annotations

import os

import onnxruntime as ort

__all__ = ["make_session", "default_threads"]


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_session(model, threads: int | None = None, spinning: bool = True,
                 optimize: bool = True) -> ort.InferenceSession:
    """CPUExecutionProvider with all graph optimizations; `model` is a path or serialized bytes.

    `spinning=False` stops idle intra-op threads from busy-waiting after a run: needed when
    several sessions take turns, or one session's spinning threads steal the cores of the next."""
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # optimize=False runs a QDQ graph as written (float ops between Q/DQ: the exact int8 arithmetic,
    # no int8 kernel), the reference ARM kernels must match; see runtime_check/isa.py for why x86 may not
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(model) if not isinstance(model, bytes) else model, so,
                                providers=["CPUExecutionProvider"])
