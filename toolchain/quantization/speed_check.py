"""Int8 only where it pays: weight layers that run faster in FP32 inside the whole model stay FP32.

onnxruntime's int8 kernels do not win everywhere, and which layers lose depends on the host's
kernels, so it is measured, not ruled. On an AVX-512 VNNI host, a 3x3 stride-2 conv over the 3
channels of an image (K = 27, too short for the u8s8 GEMM's packing and the NHWC transposes to
pay) took 2.2x its FP32 NCHWc time in MobileNetV3-Small; with that one layer in FP32 the whole
model ran 1.14x faster (EfficientNet-Lite0: 1.07x), while ResNet-18's 7x7 stem (K = 147) is the
opposite (its whole model in FP32 there: 0.62x).

1. The all-int8 graph and the FP32 graph are profiled interleaved at one thread
   (runtime_check/node_timing.py). Each weight layer's kernel time is read in both: its own node
   plus the activations onnxruntime fuses into it (`layer_kernel_times`).
2. Candidates: layers whose int8 time exceeds their FP32 time by CANDIDATE_RATIO and by at least
   CANDIDATE_US (so tiny models, where no node takes that long, are never timed further and keep
   their exact, timing-free result).
3. The whole model decides: int8 with the worst 1, n/4, n/2 and all n candidates in FP32, each
   against all int8, interleaved run by run (`time_pair`); the smallest set within TIE of the
   fastest is kept if it is MIN_GAIN and MIN_SAVED_MS faster, otherwise all stays int8. A slow layer alone may pay where a
   set does not: each FP32 layer between int8 ones adds Q/DQ and layout changes that its kernel
   time does not show.

A layer kept in FP32 drops a quantization point, so the accuracy budget the fallback met holds.
Because the choice rests on timing, the report records every measurement; `speed_check: false`
in the int8 stage's params turns it off (the result is then the same on every host).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from sqexport.contracts.errors import first_line
from sqexport.contracts.quant import QuantParams
from sqexport.runtime_check.node_timing import node_time, profile_node_times, time_pair
from sqexport.toolchain.quantization.fallback import without

__all__ = ["SpeedCheck", "layer_kernel_times", "slower_in_int8", "keep_fp32_where_faster"]

CANDIDATE_RATIO = 1.2  # int8 kernel time / FP32 kernel time above which a layer is a candidate
CANDIDATE_US = 10.0  # ... and by at least this many microseconds
# the mixed model must be this much faster than all int8 (median of paired ratios) and save this
# much per run: a smaller gain is within what two runs on a shared host disagree by, and the
# choice would flip between runs
MIN_GAIN = 1.05
MIN_SAVED_MS = 0.02
TIE = 1.02  # sets measured within 2% of each other count as equally fast
MAX_CHECKS = 4
PROFILE_S = 0.3  # profiling budget (at least 30 rounds each)
MAX_WEIGHT_BYTES = 200e6  # larger FP32 graphs are not profiled: two more sessions would cost memory
# ops onnxruntime folds into the conv or matmul before them (activation fusion, NCHWc)
FUSED_AFTER = {"Relu", "Clip", "HardSwish", "HardSigmoid", "Sigmoid", "LeakyRelu", "Tanh", "Gelu"}


@dataclass(frozen=True)
class SpeedCheck:
    """What the check needs from the pipeline: `write(params, path)` writes the QDQ graph of
    `params`, `feed` is one input batch, `scratch` the run's own temporary folder (the graphs
    timed live there, and go when the check ends). Timing runs at one thread, as the per-node
    profile must (the latency gate then measures the chosen model at the run's threads)."""
    write: Callable[[QuantParams, Path], None]
    feed: dict
    scratch: Path


def _chain(graph: onnx.GraphProto, node_name: str) -> list[onnx.NodeProto]:
    """The node named `node_name` and the single-reader activations after it."""
    by_name = {n.name: n for n in graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    chain = [by_name[node_name]] if node_name in by_name else []
    while chain:
        out = chain[-1].output[0]
        nxt = readers.get(out, [])
        if out in outputs or len(nxt) != 1 or nxt[0].op_type not in FUSED_AFTER:
            break
        chain.append(nxt[0])
    return chain


def _time_of(node: onnx.NodeProto, times: dict[str, float]) -> float | None:
    """A node's kernel time under any name onnxruntime gives it: its own (or `<name>_token_N`), or
    the NCHWc rewrite's `<output>_nchwc`, which names a fused conv by the last tensor it writes."""
    for name in (node.name, node.output[0] + "_nchwc"):
        t = node_time(name, times) if name else None
        if t is not None:
            return t
    return None


def layer_kernel_times(graph: onnx.GraphProto, site_nodes: dict[str, str],
                       times: dict[str, float]) -> dict[str, float | None]:
    """Microseconds per layer: the sum over its node and the activations after it of the times found
    (a fused conv appears once, under one of the names); None when none is in the profile."""
    out = {}
    for layer, node in site_nodes.items():
        found = [t for t in (_time_of(n, times) for n in _chain(graph, node)) if t is not None]
        out[layer] = float(sum(found)) if found else None
    return out


def slower_in_int8(int8_us: dict[str, float | None], fp32_us: dict[str, float | None]) -> list[dict]:
    """Layers whose int8 kernels take CANDIDATE_RATIO times and CANDIDATE_US more than FP32's,
    least loss first."""
    rows = [{"layer": n, "int8_us": round(i, 1), "fp32_us": round(fp32_us[n], 1)}
            for n, i in int8_us.items()
            if i is not None and fp32_us.get(n) is not None
            and i >= CANDIDATE_RATIO * fp32_us[n] and i - fp32_us[n] >= CANDIDATE_US]
    return sorted(rows, key=lambda r: (r["int8_us"] - r["fp32_us"], r["layer"]))


def ladder(n: int) -> list[int]:
    """How many of the worst candidates to try in FP32 together: one, a quarter, half, all (at
    most MAX_CHECKS sets): a slow layer alone may pay while its neighbours' Q/DQ boundaries cost
    more than their kernels save."""
    return sorted({1, max(1, n // 4), max(1, n // 2), n})[:MAX_CHECKS]


def _measure(prepared: onnx.ModelProto, quantized: dict[str, str], params: QuantParams, check: SpeedCheck,
             info: dict) -> tuple[list[dict], list[str]]:
    """Steps 1-3 of the module's docstring; fills `info` with the profile's findings. Returns the
    whole-model measurements (empty without candidates) and the candidates, largest loss first."""
    with tempfile.TemporaryDirectory(prefix="speed-check-", dir=check.scratch) as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(prepared, str(fp32))
        check.write(params, int8)
        # per-node medians settle in a few dozen rounds; a longer budget would only slow small models
        profiles = profile_node_times({"fp32": fp32, "int8": int8}, check.feed, threads=1, budget_s=PROFILE_S,
                                      scratch=Path(tmp))
        fp32.unlink()
        int8_us = layer_kernel_times(prepared.graph, quantized, profiles["int8"])
        fp32_us = layer_kernel_times(prepared.graph, quantized, profiles["fp32"])
        info["profiled_layers"] = sum(1 for n in quantized if int8_us[n] is not None and fp32_us[n] is not None)
        candidates = slower_in_int8(int8_us, fp32_us)
        info["candidates"] = candidates
        if not candidates:
            info["why"] = "no layer's int8 kernel is slower than its FP32 one by the rule's margin"
            return [], []

        order = [c["layer"] for c in reversed(candidates)]  # largest loss first
        trace = []
        for k in ladder(len(order)):
            mixed = Path(tmp) / f"mixed-{k}.onnx"
            check.write(without(params, set(order[:k])), mixed)
            record = time_pair({"dense": int8, "factored": mixed}, check.feed, threads=1)
            mixed.unlink()
            trace.append({"fp32_layers": k, "mixed_ms": record["factored_ms"], "int8_ms": record["dense_ms"],
                          "speedup": record["speedup"], "rounds": record["rounds"]})
    return trace, order


def keep_fp32_where_faster(prepared: onnx.ModelProto, site_nodes: dict[str, str], params: QuantParams,
                           check: SpeedCheck) -> tuple[QuantParams, dict]:
    """The params with the layers that measured faster in FP32 (in the whole model) taken out,
    and the report's record of the measurements."""
    info: dict = {"threads": 1, "candidate_rule": f"int8 kernel >= {CANDIDATE_RATIO}x and >= {CANDIDATE_US:g} us "
                  "above FP32's, in the whole graph's profile", "min_gain": MIN_GAIN, "min_saved_ms": MIN_SAVED_MS,
                  "kept_fp32": []}
    weight_bytes = sum(int(np.prod(t.dims)) * 4 for t in prepared.graph.initializer)
    if weight_bytes > MAX_WEIGHT_BYTES:
        info["skipped"] = (f"FP32 weights of {weight_bytes / 1e6:.0f} MB: profiling two more sessions would cost "
                           "more memory than it saves time")
        return params, info
    quantized = {a.module: site_nodes[a.module] for a in params.anchors if a.module in site_nodes}
    try:
        trace, order = _measure(prepared, quantized, params, check, info)
    except Exception as exc:  # an optimization: a graph onnxruntime cannot time here must not fail the export
        info["skipped"] = f"the graphs could not be timed here: {first_line(exc)}"
        return params, info
    if not trace:
        return params, info
    fastest = max(r["speedup"] for r in trace)
    # the fewest FP32 layers within TIE of the fastest: near-equal sets would otherwise flip between runs
    best = next(r for r in trace if r["speedup"] >= fastest / TIE)
    pays = best["speedup"] >= MIN_GAIN and best["int8_ms"] - best["mixed_ms"] >= MIN_SAVED_MS
    kept = order[:best["fp32_layers"]] if pays else []
    info["whole_model"] = trace
    info["kept_fp32"] = kept
    if kept:
        info["gain"] = best["speedup"]
    info["why"] = (f"the fastest measured (the fewest layers within {TIE - 1:.0%}): {len(kept)} layer(s) in FP32 "
                   f"made the whole model {best['speedup']:.3f}x as fast as all int8" if kept else
                   f"no measured set of candidates made the whole model {MIN_GAIN}x as fast as all int8 "
                   f"and {MIN_SAVED_MS * 1e3:g} us faster")
    return (without(params, set(kept)) if kept else params), info
