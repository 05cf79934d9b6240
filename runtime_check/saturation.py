"""Would this host's int8 kernels compute something other than a model's QDQ graph says?

On x86 without VNNI, onnxruntime adds the products of adjacent s8 weights into a saturating int16
(contracts.weight_grid). A model built elsewhere (a VNNI host, the mobile target, another tool) may
have same-sign adjacent weights above the pair limit: checked here, such a model runs, but its
outputs are not its graph's. `sqexport check` says so instead of reporting those outputs silently.
"""
from __future__ import annotations

import onnx
from onnx import numpy_helper

from sqexport.contracts.weight_grid import PAIR_SUM_LIMIT, pair_violations, reduction_pairs

__all__ = ["saturating_pairs"]

_INT8 = onnx.TensorProto.INT8


def _torch_layout(weight, consumer: onnx.NodeProto, position: int):
    """A weight as (out, in, ...) whatever node reads it: Conv stores that already; MatMul's B is
    (in, out); Gemm's B is (in, out) unless transB."""
    if (consumer.op_type, position) in (("Conv", 1), ("QLinearConv", 3)):
        return weight
    if (consumer.op_type, position) in (("MatMulInteger", 1), ("DynamicQuantizeMatMul", 1),
                                        ("MatMulIntegerToFloat", 1), ("QLinearMatMul", 3)) and weight.ndim == 2:
        return weight.T
    if consumer.op_type == "MatMul" and position == 1 and weight.ndim == 2:
        return weight.T
    if consumer.op_type == "Gemm" and position == 1 and weight.ndim == 2:
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return weight if trans_b else weight.T
    return None  # an activation-side or unusual position: not a weight the kernel pairs this way


def saturating_pairs(model: onnx.ModelProto, limit: int = PAIR_SUM_LIMIT) -> dict:
    """{"pairs": same-sign adjacent int8 weight pairs above `limit`, "layers": how many weights have
    any} over the int8 weights a DequantizeLinear feeds to a Conv, MatMul or Gemm, or that an int8
    kernel (MatMulInteger, QLinearConv, ...) reads directly. uint8 weights (u8 x u8 kernels widen
    first) never saturate."""
    inits = {t.name: t for t in model.graph.initializer if t.data_type == _INT8}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, position))
    pairs = layers = 0
    for name, tensor in inits.items():
        uses = [(c, p) for n, _ in readers.get(name, []) if n.op_type == "DequantizeLinear"
                for c, p in readers.get(n.output[0], [])] + readers.get(name, [])
        array, weight = numpy_helper.to_array(tensor), None
        for consumer, position in uses:
            weight = _torch_layout(array, consumer, position)
            if weight is not None:
                break
        if weight is None or weight.ndim < 2:
            continue
        found = int(pair_violations(reduction_pairs(weight), limit).sum())
        pairs += found
        layers += bool(found)
    return {"pairs": pairs, "layers": layers}
