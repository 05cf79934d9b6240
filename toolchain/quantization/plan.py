"""Where activations get quantized, per anchor layer (a Conv/Linear whose weight becomes int8).

The plan comes from the exported FP32 graph (exporters.qdq.find_sites), so torch and ONNX agree on
every quantization point: the anchor's activation input, and for Conv/Linear + ReLU its rectified
output (what lets onnxruntime fuse the node into QLinearConv).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Anchor"]


@dataclass(frozen=True)
class Anchor:
    module: str  # qualified torch module name
    quantize_output: bool = False  # quantize relu(output) too
    quantize_bias: bool = False  # bias as int32 with scale s_in * s_w (Conv / Gemm)
    dynamic_ok: bool = False  # MatMul / Gemm: can take run-time (dynamic) activation quantization
