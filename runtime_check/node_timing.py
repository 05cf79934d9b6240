"""Timing onnxruntime graphs against each other on this host: per-node kernel times read in the
whole optimized graph, and whole-model A/B runs interleaved so that load from other processes hits
both alike. Shared by the low-rank stage (are factors faster?) and int8's speed check (is a layer
faster in FP32?).

- `profile_node_times`: onnxruntime's own per-node kernel times of several graphs at one thread,
  the graphs run interleaved, so each layer's cost is read *in context*.
- `node_time`: a node's time in such a profile, under the names onnxruntime gives fused nodes.
- `time_pair`: two models interleaved run by run; the speedup is the median of the paired ratios
  (each pair ran back to back, so load drifts cancel).
- `revert_until_faster`: the whole-model check; changed layers go back, least measured gain
  first, until the changed model is faster by the required margin or nothing is changed.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from sqexport.runtime_check.session import make_session

__all__ = ["profile_node_times", "node_time", "time_pair", "revert_until_faster"]


def profile_node_times(paths: dict[str, Path], feed: dict, threads: int = 1, budget_s: float = 2.0,
                       min_rounds: int = 30, scratch: Path | None = None) -> dict[str, dict[str, float]]:
    """Per graph, median kernel microseconds per node of the optimized graph (onnxruntime's
    profiler). The graphs run interleaved, one run each per round (order alternating), so load
    from other processes hits every graph alike: the per-layer comparison is between graphs
    profiled at the same moments. Fused nodes keep the name of the node they replace, plus a
    `_token_N` suffix after the NHWC rewrite (`node_time`). The profiler's files go to a temporary
    folder under `scratch` (the caller's own; the system's when None) and are removed."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="sqexport-profile-", dir=scratch) as tmp:
        sessions = {}
        for key, path in paths.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(tmp) / f"p{len(sessions)}")
            sessions[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        keys = list(sessions)
        for k in keys:
            for _ in range(3):
                sessions[k].run(None, feed)
        start, rounds = time.perf_counter(), 0
        while rounds < min_rounds or time.perf_counter() - start < budget_s:
            for k in (keys if rounds % 2 == 0 else keys[::-1]):
                sessions[k].run(None, feed)
            rounds += 1
            if rounds >= 20 * min_rounds:
                break
        out = {}
        for k in keys:
            times: dict[str, list[float]] = {}
            for e in json.loads(Path(sessions[k].end_profiling()).read_text()):
                if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                    times.setdefault(e["name"][:-len("_kernel_time")], []).append(float(e["dur"]))
            # the warm-up runs are in the profile too: the median ignores them
            out[k] = {n: float(np.median(d)) for n, d in times.items()}
    return out


def node_time(node: str, times: dict[str, float]) -> float | None:
    """Microseconds of `node` (an ONNX node name of the source graph) in a profile: its own name, or
    the single fused node onnxruntime names `<node>_token_N` after its NHWC rewrite; None if absent."""
    if node in times:
        return times[node]
    hits = [t for n, t in times.items() if n.startswith(node + "_token_")]
    return hits[0] if len(hits) == 1 else None


def time_pair(paths: dict[str, Path], feed: dict, threads: int = 1, budget_s: float = 2.0,
              min_rounds: int = 40) -> dict:
    """Interleave `dense` and `factored` (order alternating each round); medians, fastest runs, and
    the median of the per-round ratios dense / factored."""
    sessions = {k: make_session(p, threads, spinning=False) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, feed)
    runs: dict[str, list[float]] = {k: [] for k in sessions}
    start, i = time.perf_counter(), 0
    while i < min_rounds or time.perf_counter() - start < budget_s:
        for k in (("dense", "factored") if i % 2 == 0 else ("factored", "dense")):
            t0 = time.perf_counter()
            sessions[k].run(None, feed)
            runs[k].append(time.perf_counter() - t0)
        i += 1
        if i >= 50 * min_rounds:
            break
    d, f = np.array(runs["dense"]), np.array(runs["factored"])
    return {"dense_ms": round(float(np.median(d)) * 1e3, 4), "factored_ms": round(float(np.median(f)) * 1e3, 4),
            "fastest_ms": {"dense": round(float(d.min()) * 1e3, 4), "factored": round(float(f.min()) * 1e3, 4)},
            "speedup": round(float(np.median(d / f)), 4), "rounds": i, "threads": threads,
            "statistic": "median of interleaved per-round ratios", "load_average": [round(x, 2) for x in os.getloadavg()]}


def revert_until_faster(order: list[str], measure: Callable[[list[str]], dict], threshold: float,
                        max_checks: int = 8) -> tuple[list[str], list[dict]]:
    """`order`: the factored layers, least gain first. `measure(kept)` times the model with `kept`
    factored against the dense one ({"speedup": ...}). Drop layers from the front of `order`, in
    chunks sized so that at most `max_checks` measurements are made, until the speedup reaches
    `threshold` or nothing is left. Returns (layers kept factored, one record per measurement)."""
    kept, trace = list(order), []
    chunk = max(1, -(-len(order) // max(1, max_checks - 1)))
    while kept:
        record = measure(kept)
        trace.append({"factored": len(kept), **record})
        if record["speedup"] >= threshold:
            break
        trace[-1]["reverted"] = kept[:chunk]
        kept = kept[chunk:]
    return kept, trace
