"""Does factoring pay *in the model*? Timing each layer alone (lowrank_latency.py) misses what the
whole int8 graph does: onnxruntime fuses Q/DQ pairs into QLinearConv / QLinearAdd, runs convs in
NHWC with the transposes hoisted out, and picks a kernel per node from its channel counts. On
mnist-resnet every layer timed faster alone while the whole factored model was 0.84x int8 alone.

So, for models the spec's exporter can export (single-input models):
- `model_int8_graph`: the whole model as the pipeline will ship it (BatchNorm folded, int8 QDQ
  weights and activations, residual adds quantized), from a deep copy.
- `profile_node_times`: onnxruntime's own per-node kernel times of such graphs at one thread,
  the graphs run interleaved, so each layer's cost is read *in context* (`layer_times`): the
  dense layer's QLinearConv vs the sum of its factors' nodes, profiled at the same moments.
- `time_pair`: the dense and the factored model interleaved run by run; the speedup is the
  median of the paired ratios (each pair ran back to back, so load drifts cancel).
- `revert_until_faster`: the whole-model check; layers go back to dense, least measured gain
  first, until the factored model is faster by the required margin or nothing is factored.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from torch import nn

from sqexport.contracts.weight_grid import WeightGrid
from sqexport.exporters.graph import merge_duplicate_nodes
from sqexport.exporters.qdq import anchors_for, find_sites, insert_qdq
from sqexport.runtime_check.session import make_session
from sqexport.toolchain.folding import fold_batchnorm
from sqexport.toolchain.pruning.masks import prunable_layers
from sqexport.toolchain.quantization.static import calibrate, quantize_weights

__all__ = ["model_int8_graph", "profile_node_times", "layer_times", "time_pair", "revert_until_faster"]


def model_int8_graph(model: nn.Module, export: Callable, batches: list[dict], run: Callable, path: Path,
                     qmax: int | WeightGrid) -> dict[str, str]:
    """Write the int8 QDQ graph of a copy of `model` to `path`; return torch module -> ONNX node
    (the node consuming its weight: the QLinearConv / QGemm onnxruntime fuses it into). The same
    placement as the pipeline's quantize step (toolchain/quantize_step.plan_quantization, which
    this module cannot import: it imports the pruning package): weights and inputs of every
    Conv/Linear, rectified or linear outputs, and a skip path's sum where a conv reads it (so the
    residual Adds become QLinearAdd). Ranges come from `batches`; they shape no kernel choice."""
    work, _ = fold_batchnorm(copy.deepcopy(model).eval())
    prepared = export(work, path)
    merge_duplicate_nodes(prepared)
    sites = find_sites(prepared, {n: m.weight.detach().numpy() for n, m in prunable_layers(work).items()})
    anchors = anchors_for(sites)
    ins, outs, _ = calibrate(work, anchors, batches, run)
    params = quantize_weights(work, anchors, ins, qmax)
    params.outputs = outs
    onnx.save(insert_qdq(prepared, sites, params, inplace=True), str(path))
    return {name: site.node for name, site in sites.items()}


def profile_node_times(paths: dict[str, Path], feed: dict, threads: int = 1, budget_s: float = 2.0,
                       min_rounds: int = 30) -> dict[str, dict[str, float]]:
    """Per graph, median kernel microseconds per node of the optimized graph (onnxruntime's
    profiler). The graphs run interleaved, one run each per round (order alternating), so load
    from other processes hits every graph alike: the per-layer comparison is between graphs
    profiled at the same moments. Fused nodes keep the name of the node they replace, plus a
    `_token_N` suffix after the NHWC rewrite (`_node_time`)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="sqexport-profile-") as tmp:
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


def _node_time(node: str, times: dict[str, float]) -> float | None:
    if node in times:
        return times[node]
    hits = [t for n, t in times.items() if n.startswith(node + "_token_")]
    return hits[0] if len(hits) == 1 else None


def layer_times(site_nodes: dict[str, str], times: dict[str, float], names: list[str]) -> dict[str, float | None]:
    """Microseconds of each named layer: its own node, or the sum of its factors' nodes (modules
    under `name.`); None when a node cannot be found in the profile (then it is not judged here)."""
    out = {}
    for name in names:
        nodes = [node for module, node in site_nodes.items() if module == name or module.startswith(name + ".")]
        found = [_node_time(n, times) for n in nodes]
        out[name] = float(sum(found)) if nodes and None not in found else None
    return out


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
