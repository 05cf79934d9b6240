"""Which weight layers of an exported graph take int8, and why each other one does not.

A weight layer is a Conv, ConvTranspose, Gemm or MatMul that reads a constant weight (an
initializer, possibly behind Identity/Transpose/Reshape/Cast). Every one of them is either a
quantization site (exporters.qdq.find_sites) or listed with the reason it stays FP32, so a user
sees per layer what the tool did with their model instead of a bare count.
"""
from __future__ import annotations

import onnx
from onnx import helper

from sqexport.exporters.graph import consumers

__all__ = ["WEIGHT_OPS", "weight_layer_coverage"]

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN")
_RECURRENT = ("LSTM", "GRU", "RNN")
# Measured (benchmarks/results/user-forms.md): Q/DQ on both inputs of DeiT-Tiny's 24 attention
# MatMuls ran 1.01-1.09x faster in two runs with an unchanged cosine, but sqexport mirrors every ONNX quantization
# point in torch (calibration, fallback, the fidelity check), and these inputs are no module's output
ACTIVATION_PRODUCT_REASON = ("activation x activation product (attention): kept FP32; its inputs are not the output of "
                             "a torch module, where sqexport calibrates and checks every int8 point")
_PASS_THROUGH = ("Identity", "Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze")


def _constant_source(name: str, inits: set[str], producers: dict) -> tuple[str | None, list[str]]:
    """(initializer or Constant output behind `name`, ops on the way) or (None, ops) if computed."""
    ops: list[str] = []
    while name not in inits:
        node = producers.get(name)
        if node is None:
            return None, ops
        if node.op_type == "Constant":
            return name, ops
        if node.op_type not in _PASS_THROUGH:
            return None, ops + [node.op_type]
        ops.append(node.op_type)
        name = node.input[0]
    return name, ops


def _reason(node: onnx.NodeProto, source: str, ops: list[str], readers: dict) -> str:
    if node.op_type in _RECURRENT:
        # onnxruntime's int8 LSTM is its contrib DynamicQuantizeLSTM (run-time activation ranges);
        # no QDQ form of a recurrent op becomes an int8 kernel
        return (f"{node.op_type}: onnxruntime has no static (QDQ) int8 recurrent kernel; its weights stay FP32 "
                "(the recurrence runs in float)")
    if node.op_type == "ConvTranspose":
        # measured on onnxruntime 1.32: a QDQ ConvTranspose stays DQ -> float ConvTranspose -> Q
        # after graph optimization (a QDQ Conv, 1-D to 3-D, becomes QLinearConv)
        return ("ConvTranspose: onnxruntime's CPU provider has no int8 transposed convolution (Q/DQ around it "
                "would only add work to its float kernel); kept FP32")
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta: not the plain x @ W^T + b layout int8 is written for"
    if ops:
        return f"weight reaches the node through {' -> '.join(reversed(ops))}, not as a stored tensor"
    if len(readers[source]) > 1:
        return f"weight tensor shared by {len(readers[source])} nodes (tied weights): one int8 copy cannot serve them"
    return ("no torch Conv/Linear holds these weight values (the layer is not an nn.Conv/nn.Linear, or the "
            "exporter rewrote the weight)")


def weight_layer_coverage(model: onnx.ModelProto, site_nodes: dict[str, str]) -> dict:
    """`site_nodes`: torch module -> the ONNX node that takes int8. Returns counts, the FP32 layers
    with reasons, and activation x activation MatMuls / Einsums (attention), which hold no weight:
    their count and each one with its reason."""
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    layer_of = {node: module for module, node in site_nodes.items()}
    fp32, int8, attention = [], 0, []
    for node in graph.node:
        if node.op_type == "Einsum" and all(_constant_source(i, inits, producers)[0] is None for i in node.input):
            attention.append({"node": node.name, "op": node.op_type, "reason": ACTIVATION_PRODUCT_REASON})
            continue
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        source, ops = _constant_source(node.input[1], inits, producers)
        if source is None and node.op_type == "MatMul":
            first, _ = _constant_source(node.input[0], inits, producers)
            if first is None:
                attention.append({"node": node.name, "op": node.op_type, "reason": ACTIVATION_PRODUCT_REASON})
                continue
        if node.name in layer_of:
            int8 += 1
            continue
        reason = (_reason(node, source, ops, readers) if source is not None else
                  f"weight computed in the graph ({' -> '.join(reversed(ops)) or 'no stored tensor'})")
        fp32.append({"node": node.name, "op": node.op_type, "reason": reason})
    return {"weight_layers": int8 + len(fp32), "int8": int8, "fp32": fp32,
            "activation_matmuls": len(attention), "activation_matmuls_fp32": attention}
