"""Does factoring a layer pay on the target? Time it: the dense layer and its factored
replacement, each alone as a small int8 QDQ ONNX graph (what the pipeline will export), fed the
layer's real input shape, interleaved in one onnxruntime run so machine noise hits both alike.

Fewer multiply-adds are not always less time: two small MatMuls/Convs pay a second kernel
launch and a quantize/dequantize of the intermediate, which can cost more than the saved work on
a small layer (a 96 x 10 classifier head) or at batch 1.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from contracts.quant import Anchor
from exporters.onnx_export import export_torch
from exporters.qdq import find_sites, insert_qdq
from runtime_check.latency import measure_interleaved
from toolchain.pruning.masks import prunable_layers
from toolchain.quantization.static import calibrate, quantize_weights

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


def _int8_graph(module: nn.Module, x: np.ndarray, path: Path, qmax: int) -> None:
    wrapped = nn.Sequential(module).eval()  # prunable_layers names a bare layer "", which find_sites cannot key
    graph = export_torch(wrapped, {"x": x}, ["x"], ["y"], {}, path)
    weights = {n: m.weight.detach().numpy() for n, m in prunable_layers(wrapped).items()}
    sites = find_sites(graph, weights)
    anchors = [Anchor(n, s.rectified_output is not None, s.bias is not None, s.op_type in ("MatMul", "Gemm"))
               for n, s in sites.items()]

    def run(model, batch):
        with torch.no_grad():
            return [model(torch.from_numpy(batch["x"])).numpy()]
    ins, outs = calibrate(wrapped, anchors, [{"x": x}], run)
    params = quantize_weights(wrapped, anchors, ins, qmax)
    params.outputs = outs
    onnx.save(insert_qdq(graph, sites, params), str(path))


def time_variants(variants: dict[str, nn.Module], x: np.ndarray, threads: int, qmax: int,
                  budget_s: float = 1.0) -> dict[str, float]:
    """p50 milliseconds of each variant (int8 QDQ in onnxruntime) on input `x`."""
    with tempfile.TemporaryDirectory(prefix="sqexport-lowrank-") as tmp:
        paths = {}
        for key, module in variants.items():
            paths[key] = Path(tmp) / f"{key}.onnx"
            _int8_graph(module, x, paths[key], qmax)
        times = measure_interleaved(paths, {"x": x}, threads, warmup=5, max_iters=400, budget_s=budget_s)
    return {k: v["p50"] for k, v in times.items()}
