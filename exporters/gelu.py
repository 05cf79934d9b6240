"""GELU between Q/DQ as onnxruntime's one Gelu node.

torch exports GELU (opset 17) as x * (1 + erf(x / sqrt(2))) * 0.5 in five nodes. In an FP32 graph
onnxruntime fuses them into one Gelu kernel. In a QDQ graph the x they read comes from a
DequantizeLinear, and onnxruntime first gives each reader of a DequantizeLinear its own copy (so
every QDQ node unit owns its DQ); the Div and the Mul then read two different tensors and the
fusion no longer matches. EfficientFormerV2-S0 ran 27 of its 35 GELUs as Erf + Div + Add + Mul +
Mul with duplicated DQs: 0.88x its FP32 model. Written here as the com.microsoft Gelu that
onnxruntime's own fusion produces (the same exact-erf function), the pattern cannot be split:
1.07x (benchmarks/results/zoo-sweep.md).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sqexport.exporters.graph import consumers

__all__ = ["fuse_dequantized_gelu", "with_ms_domain", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"
_RTOL = 1e-4


def _scalar(name: str, constants: dict[str, np.ndarray]) -> float | None:
    value = constants.get(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in graph.initializer if int(np.prod(i.dims)) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _other(node: onnx.NodeProto, name: str) -> str | None:
    """The input of a two-input node that is not `name` (None if `name` is not one of them)."""
    if len(node.input) != 2 or name not in node.input:
        return None
    return node.input[1] if node.input[0] == name else node.input[0]


def _near(value: float | None, target: float) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=_RTOL)


def _only_reader(readers: dict, name: str, op_type: str) -> onnx.NodeProto | None:
    found = readers.get(name, [])
    return found[0] if len(found) == 1 and found[0].op_type == op_type else None


def fuse_dequantized_gelu(graph: onnx.GraphProto) -> int:
    """Replace every erf-GELU whose input is a DequantizeLinear output by one com.microsoft Gelu
    (in place); returns how many. Only the exact five-node form torch exports is taken:
    Div(x, sqrt 2) or Mul(x, 1/sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5, each intermediate read by
    the next node alone."""
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    constants = _constants(graph)
    dropped: set[int] = set()
    fused: dict[int, onnx.NodeProto] = {}  # id of the last node of a pattern -> its Gelu
    for erf in [n for n in graph.node if n.op_type == "Erf"]:
        scaled = producers.get(erf.input[0])
        if scaled is None or scaled.op_type not in ("Div", "Mul") or len(scaled.input) != 2:
            continue
        x, c = scaled.input
        if not (scaled.op_type == "Div" and _near(_scalar(c, constants), math.sqrt(2))
                or scaled.op_type == "Mul" and (_near(_scalar(c, constants), 1 / math.sqrt(2))
                                                or _near(_scalar(x, constants), 1 / math.sqrt(2)))):
            continue
        if scaled.op_type == "Mul" and _scalar(x, constants) is not None:
            x = c
        source = producers.get(x)
        if source is None or source.op_type != "DequantizeLinear" or len(readers.get(erf.input[0], [])) != 1:
            continue
        add = _only_reader(readers, erf.output[0], "Add")
        if add is None or not _near(_scalar(_other(add, erf.output[0]) or "", constants), 1.0):
            continue
        times_x = _only_reader(readers, add.output[0], "Mul")
        if times_x is None or _other(times_x, add.output[0]) != x:
            continue
        half = _only_reader(readers, times_x.output[0], "Mul")
        if half is None or not _near(_scalar(_other(half, times_x.output[0]) or "", constants), 0.5):
            continue
        pattern = (scaled, erf, add, times_x, half)
        if any(id(n) in dropped for n in pattern):
            continue
        dropped.update(id(n) for n in pattern)
        fused[id(half)] = helper.make_node("Gelu", [x], [half.output[0]], name=f"{half.name}/Gelu", domain=MS_DOMAIN)
    if not fused:
        return 0
    kept = []
    for node in graph.node:
        if id(node) in fused:
            kept.append(fused[id(node)])
        elif id(node) not in dropped:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return len(fused)


def with_ms_domain(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft opset the Gelu nodes belong to (once)."""
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
