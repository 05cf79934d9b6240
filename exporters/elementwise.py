"""The elementwise ops between int8 convolutions that onnxruntime can run in int8 too.

onnxruntime (1.32, CPU) fuses DequantizeLinear -> op -> QuantizeLinear into an int8 kernel for
Sigmoid (QLinearSigmoid), Mul (QLinearMul), Add (QLinearAdd) and GlobalAveragePool
(QLinearGlobalAveragePool), not for ReduceMean, HardSigmoid or HardSwish. Left in float, each such
op costs a DequantizeLinear of its input and a QuantizeLinear of its output on top of the float op:
on EfficientNet-B0 SiLU (Sigmoid + Mul) and squeeze-excitation alone cost more than the int8
convolutions saved. So:

- a spatial mean written as ReduceMean over (H, W) with keepdims (squeeze-excitation's
  `x.mean((2, 3), keepdim=True)`) becomes the GlobalAveragePool it equals (`pools_from_means`);
- a SiLU, exported as Mul(x, Sigmoid(x)), gets a Q/DQ pair on its Sigmoid (`silu_gate`) as well as
  on its output, so both become int8 kernels when x is quantized;
- hard swish and hard sigmoid (HardSwish, HardSigmoid: no int8 kernel) are written as relu6(x + 3)
  quantized on [0, 6] and read back with scale 1/255 (the division by 6 costs nothing: the same
  integers, another scale), times x for hard swish (`hard_gate_node`, `write_hard_gate`):
  QLinearAdd (+ QLinearMul), the clamp done by the QuantizeLinear's saturation;
- a pooling output that reaches a quantized tensor through shape ops only (GlobalAveragePool ->
  Flatten -> Gemm) takes that tensor's Q/DQ pair (`pool_qdq_targets`): exact, because quantizing
  twice with the same parameters changes nothing, and the pool becomes QLinearGlobalAveragePool.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper


__all__ = ["pools_from_means", "silu_gate", "hard_gate_node", "write_hard_gate", "pool_qdq_targets", "SHAPE_OPS"]

SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")


def _rank(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> rank, where ONNX shape inference knows it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here: an unknown rank rewrites nothing
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = len(t.shape.dim)
    return out


def _mean_axes(node: onnx.NodeProto, inits: dict) -> tuple[list[int] | None, int]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    keepdims = int(attrs.get("keepdims", 1))
    if "axes" in attrs:
        return list(attrs["axes"]), keepdims
    if len(node.input) > 1 and node.input[1] in inits:  # opset 18: axes as an input
        return [int(a) for a in numpy_helper.to_array(inits[node.input[1]]).reshape(-1)], keepdims
    return None, keepdims


def pools_from_means(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every ReduceMean over the two spatial axes of a 4-D tensor with keepdims
    into GlobalAveragePool (the same values, same output name). Returns how many."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    ranks = None
    done = 0
    for i, node in enumerate(graph.node):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
            continue
        axes, keepdims = _mean_axes(node, inits)
        if axes is None or not keepdims or len(set(axes)) != 2:
            continue  # before shape inference: a transformer's many one-axis means cost nothing
        ranks = _rank(model) if ranks is None else ranks
        rank = ranks.get(node.input[0])
        if rank != 4 or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        pool = helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0]], name=node.name)
        graph.node[i].CopyFrom(pool)
        done += 1
    return done


def silu_gate(model: onnx.ModelProto, mul_output: str) -> tuple[str, str] | None:
    """(x, sigmoid output) if `mul_output` is Mul(x, Sigmoid(x)) (SiLU as exported), else None."""
    producers = {o: n for n in model.graph.node for o in n.output}
    mul = producers.get(mul_output)
    if mul is None or mul.op_type != "Mul" or len(mul.input) != 2:
        return None
    for x, s in (mul.input, mul.input[::-1]):
        sig = producers.get(s)
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x:
            return x, s
    return None


def hard_gate_node(nodes, output: str) -> onnx.NodeProto | None:
    """The HardSwish node, or HardSigmoid node with torch's slope and offset (x / 6 + 1 / 2), among
    `nodes` that writes `output`, else None."""
    for node in nodes:
        if output not in node.output:
            continue
        if node.op_type == "HardSwish":
            return node
        if node.op_type == "HardSigmoid":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if abs(attrs.get("alpha", 0.2) - 1 / 6) < 1e-6 and abs(attrs.get("beta", 0.5) - 0.5) < 1e-6:
                return node
        return None
    return None


def write_hard_gate(node: onnx.NodeProto, three: str, gate_q: tuple[str, str, str], unit_scale: str,
                    new_nodes: list[onnx.NodeProto]) -> None:
    """Rewrite, in place, a HardSwish / HardSigmoid node that reads a DequantizeLinear output:
    Add(x, three) -> QuantizeLinear(gate_q) -> DequantizeLinear(scale unit_scale), times x for
    HardSwish. `three`: a dequantized constant 3; `gate_q`: (scale, zero point) names for
    HARD_GATE_RANGE and the tag for new tensor names; the nodes before `node` go to `new_nodes`."""
    x, y = node.input[0], node.output[0]
    scale, zero, tag = gate_q
    new_nodes.append(helper.make_node("Add", [x, three], [f"{tag}_plus3"], name=f"{tag}_Add"))
    new_nodes.append(helper.make_node("QuantizeLinear", [f"{tag}_plus3", scale, zero], [f"{tag}_quantized"],
                                      name=f"{tag}_Q"))
    hard_swish = node.op_type == "HardSwish"
    gate = f"{tag}_gate" if hard_swish else y
    read_back = helper.make_node("DequantizeLinear", [f"{tag}_quantized", unit_scale, zero], [gate], name=f"{tag}_DQ")
    if hard_swish:
        new_nodes.append(read_back)
        node.CopyFrom(helper.make_node("Mul", [x, gate], [y], name=node.name))
    else:
        node.CopyFrom(read_back)


def pool_qdq_targets(nodes: list[onnx.NodeProto], graph_outputs: set[str], quantized: set[str]) -> dict[str, str]:
    """GlobalAveragePool output -> the quantized tensor it reaches through single-reader shape ops
    (SHAPE_OPS) only, for pools whose input is a DequantizeLinear output and whose own output is
    not quantized (`quantized`: tensors a QuantizeLinear reads; `nodes`: the whole graph)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    producers = {o: n for n in nodes for o in n.output}
    found = {}
    for node in nodes:
        if node.op_type != "GlobalAveragePool" or node.output[0] in quantized:
            continue
        src = producers.get(node.input[0])
        if src is None or src.op_type != "DequantizeLinear":
            continue
        t = node.output[0]
        while t not in quantized and t not in graph_outputs and len(readers.get(t, [])) == 1 \
                and readers[t][0].op_type in SHAPE_OPS:
            t = readers[t][0].output[0]
        if t in quantized and t != node.output[0]:
            found[node.output[0]] = t
    return found
