"""Where activations get quantized, per anchor layer (a Conv/Linear whose weight becomes int8).

The plan comes from the exported FP32 graph (exporters.qdq.find_sites), so torch and ONNX agree on
every quantization point: the anchor's activation input, and its output: for Conv/Linear + ReLU or
ReLU6 (Clip) the rectified output, for a Conv without one its plain output (what lets onnxruntime
fuse the node into QLinearConv, which needs a QuantizeLinear right after the node).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Anchor", "RELU", "LINEAR", "rectify"]

RELU = (0.0, math.inf)
LINEAR = (-math.inf, math.inf)


@dataclass(frozen=True)
class Anchor:
    module: str  # qualified torch module name
    quantize_output: bool = False  # quantize the output too (after its rectifier, see output_range)
    quantize_bias: bool = False  # bias as int32 with scale s_in * s_w (Conv / Gemm)
    dynamic_ok: bool = False  # MatMul / Gemm: can take run-time (dynamic) activation quantization
    # the rectifier between the layer and its quantized output: Relu (0, inf), Clip(0, 6) for
    # ReLU6 (0, 6), or none (-inf, inf) for a Conv whose plain output is quantized
    output_range: tuple[float, float] = RELU


def rectify(out: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """What the graph computes between the layer and its output QuantizeLinear."""
    lo, hi = bounds
    if lo == -math.inf and hi == math.inf:
        return out
    if hi == math.inf:
        return torch.clamp(out, min=lo) if lo != 0.0 else torch.relu(out)
    return torch.clamp(out, min=None if lo == -math.inf else lo, max=hi)
