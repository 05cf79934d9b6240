"""Does factoring a layer pay on the target? Time it: the dense layer and its factored
replacement, each alone as a small int8 QDQ ONNX graph (what the pipeline will export), fed the
layer's real input shape, interleaved in one onnxruntime run so machine noise hits both alike.

Fewer multiply-adds are not always less time: two small MatMuls/Convs pay a second kernel
launch and a quantize/dequantize of the intermediate, which can cost more than the saved work on
a small layer (a 96 x 10 classifier head) or at batch 1.
"""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from sqexport.contracts.weight_grid import WeightGrid
from sqexport.exporters.onnx_export import export_torch
from sqexport.exporters.qdq import anchors_for, find_sites, insert_qdq
from sqexport.runtime_check.session import make_session
from sqexport.toolchain.pruning.masks import prunable_layers
from sqexport.toolchain.quantization.static import calibrate, quantize_weights

__all__ = ["layer_inputs", "time_variants"]


def layer_inputs(model: nn.Module, names: list[str], example: dict, run) -> dict[str, np.ndarray]:
    """The input each named layer receives when `model` runs the example inputs."""
    modules = dict(model.named_modules())
    seen: dict[str, np.ndarray] = {}

    def hook(name):
        def record(module, args) -> None:  # returning a value would replace the layer's input
            seen.setdefault(name, args[0].detach().numpy().copy())
        return record
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        run(model, example)
    finally:
        for h in handles:
            h.remove()
    return seen


def _timing_copy(module: nn.Module) -> nn.Sequential:
    """The layer as the int8 graph runs it inside a model: input and output quantized, so onnxruntime
    fuses it into QLinearConv / QLinearMatMul. Alone, a layer's FP32 output would leave it as
    DequantizeLinear + FP32 Gemm (a last-layer artifact; we measured 5.6 ms vs 2.3 ms FP32 for a
    384 x 1536 MatMul). A ReLU after it gives the quantized output; the bias is dropped, since an
    Add between MatMul and ReLU would hide the ReLU, and it costs the same in both variants."""
    layer = copy.deepcopy(module)
    for m in layer.modules():
        if getattr(m, "bias", None) is not None:  # the layers' and an H-matrix layer's own
            m.bias = None
    # a bare layer would be named "" by prunable_layers, which find_sites cannot key
    return nn.Sequential(layer, nn.ReLU()).eval()


def _int8_graph(module: nn.Module, x: np.ndarray, path: Path, qmax: int | WeightGrid) -> None:
    wrapped = _timing_copy(module)
    graph = export_torch(wrapped, {"x": x}, ["x"], ["y"], {}, path)
    weights = {n: m.weight.detach().numpy() for n, m in prunable_layers(wrapped).items()}
    sites = find_sites(graph, weights)
    anchors = anchors_for(sites)  # one layer alone: nothing reads its input but the layer

    def run(model, batch):
        with torch.no_grad():
            return [model(torch.from_numpy(batch["x"])).numpy()]
    ins, outs, _ = calibrate(wrapped, anchors, [{"x": x}], run)
    params = quantize_weights(wrapped, anchors, ins, qmax)
    params.outputs = outs
    onnx.save(insert_qdq(graph, sites, params), str(path))


def _fastest_runs(paths: dict[str, Path], x: np.ndarray, threads: int, budget_s: float,
                  max_rounds: int = 300) -> dict[str, float]:
    """Fastest run of each variant in ms, the variants interleaved round by round (order
    alternating). The minimum, not the median: on a shared machine a run is only ever slowed
    down by others, never sped up, and a layer takes ~0.1-10 ms, less than one scheduler slice,
    so medians of layers this small follow the neighbours' load (we saw 14x "speedups")."""
    sessions = {k: make_session(p, threads, spinning=False) for k, p in paths.items()}
    names = list(sessions)
    for k in names:  # warm-up: first runs allocate
        for _ in range(3):
            sessions[k].run(None, {"x": x})
    best = {k: float("inf") for k in names}
    start = time.perf_counter()
    for i in range(max_rounds):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            sessions[k].run(None, {"x": x})
            best[k] = min(best[k], time.perf_counter() - t0)
        if i >= 10 and time.perf_counter() - start > budget_s:
            break
    return {k: v * 1000.0 for k, v in best.items()}


def time_variants(variants: dict[str, nn.Module], x: np.ndarray, threads: int, qmax: int | WeightGrid,
                  budget_s: float = 1.0) -> dict[str, float]:
    """Fastest-run milliseconds of each variant (int8 QDQ in onnxruntime) on input `x`."""
    with tempfile.TemporaryDirectory(prefix="sqexport-lowrank-") as tmp:
        paths = {}
        for key, module in variants.items():
            paths[key] = Path(tmp) / f"{key}.onnx"
            _int8_graph(module, x, paths[key], qmax)
        return _fastest_runs(paths, x, threads, budget_s)
