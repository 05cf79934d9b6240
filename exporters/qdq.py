"""Write QuantizeLinear/DequantizeLinear into an exported FP32 graph with params computed in torch.

`find_sites` locates, for each torch Conv/Linear, the ONNX node that consumes its weight (matched
by content, so it works whatever names the exporter chose and whether it stored W or W^T).
`insert_qdq` then stores the weight as int8 + per-channel DequantizeLinear, the bias as int32 where
the op takes one (Conv, Gemm), and adds Q/DQ pairs on the activations the plan names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sqexport.contracts.quant import UNIT_RANGE, LINEAR, RELU, ActQuant, Anchor, QuantParams, act_params_from_range
from sqexport.exporters.elementwise import hard_gate_node, pool_qdq_targets, write_hard_gate
from sqexport.exporters.graph import consumers, ensure_node_names, toposort
from sqexport.exporters.weight_index import WeightIndex, initializer_array

__all__ = ["Site", "find_sites", "anchors_for", "find_embedding_sites", "insert_qdq"]


@dataclass(frozen=True)
class Site:
    node: str  # ONNX node name
    op_type: str
    weight: str  # initializer name
    activation: str  # the node's activation input tensor
    transposed: bool  # ONNX stores W^T (in, out): per-channel axis 1
    bias: str | None  # bias initializer consumed by the node itself (Conv / Gemm)
    rectified_output: str | None  # output of a Relu / Clip(0, hi) that alone consumes the node's output
    # bounds of that rectifier (Relu: (0, inf), ReLU6's Clip: (0, 6)); for a Conv without one whose
    # output feeds other nodes, `linear_output` is that output and the bounds are (-inf, inf)
    output_range: tuple[float, float] = RELU
    linear_output: str | None = None
    input_summed: bool = False  # a Conv's activation input is also read by Add nodes (a skip path)

    @property
    def output(self) -> str | None:
        """The tensor that gets an output Q/DQ pair, if any."""
        return self.rectified_output or self.linear_output


def anchors_for(sites: dict[str, Site], quantized_elsewhere: frozenset[str] | set[str] = frozenset()) -> list[Anchor]:
    """The torch-side quantization points of `sites`, one per layer, in the same places the QDQ
    graph will take them. `quantized_elsewhere`: activation tensors that already get one Q/DQ for
    every reader (a FloatFunctional add's output), so a skip path reading them needs no second one."""
    return [Anchor(name, s.output is not None, s.bias is not None, s.op_type in ("MatMul", "Gemm"), s.output_range,
                   quantize_input_for_sum=s.input_summed and s.activation not in quantized_elsewhere)
            for name, s in sites.items()]


def _layout_fits(node: onnx.NodeProto, transposed: bool) -> bool:
    """Whether the node reads a weight stored in that layout as torch's (out, in, ...) weight."""
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return False
        return transposed != bool(attrs.get("transB", 0))
    return transposed if node.op_type == "MatMul" else not transposed  # Conv: as is


def find_sites(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, Site]:
    """Map torch module name -> Site for every weight found as a Conv/Gemm/MatMul initializer."""
    graph = model.graph
    ensure_node_names(graph)
    inits = {i.name: i for i in graph.initializer}
    index = WeightIndex(weights)
    readers = consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    sites = {}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w_name = node.input[1]
        if w_name not in inits or len(readers[w_name]) != 1:
            continue
        hits = [h for h in index.matches(initializer_array(inits[w_name]), sites) if _layout_fits(node, h[1])]
        if not hits:
            continue
        module, transposed = hits[0]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        rectified, bounds = _rectifier(node, readers, inits, graph, graph_outputs)
        linear = None
        if rectified is None and node.op_type == "Conv" and readers[node.output[0]] \
                and node.output[0] not in graph_outputs:
            linear, bounds = node.output[0], LINEAR
        input_summed = (node.op_type == "Conv" and node.input[0] not in {i.name for i in graph.input}
                        and any(n.op_type == "Add" for n in readers[node.input[0]]))
        sites[module] = Site(node.name, node.op_type, w_name, node.input[0], transposed, bias, rectified,
                             bounds, linear, input_summed)
    return sites


def _constant(name: str, inits: dict, graph: onnx.GraphProto) -> float | None:
    if name in inits:
        return float(numpy_helper.to_array(inits[name]))
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(helper.get_attribute_value(node.attribute[0])))
    return None


def _rectifier(node, readers, inits, graph, graph_outputs) -> tuple[str | None, tuple[float, float]]:
    """(output, bounds) of a Relu, or of a Clip with constant bounds and min 0 (ReLU6), that alone
    reads the node's output; onnxruntime folds both into QLinearConv when the QuantizeLinear after
    them saturates inside the bounds."""
    nxt = readers[node.output[0]]
    if len(nxt) != 1 or node.output[0] in graph_outputs:
        return None, RELU
    act = nxt[0]
    if act.op_type == "Relu":
        return act.output[0], RELU
    if act.op_type == "Clip" and len(act.input) == 3 and all(act.input[1:]):
        lo, hi = _constant(act.input[1], inits, graph), _constant(act.input[2], inits, graph)
        if lo == 0.0 and hi is not None and 0 < hi < math.inf:
            return act.output[0], (0.0, hi)
    return None, RELU


def find_embedding_sites(model: onnx.ModelProto, tables: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """Map embedding module name -> (Gather node name, table initializer) by content."""
    graph = model.graph
    ensure_node_names(graph)
    inits = {i.name: i for i in graph.initializer}
    index = WeightIndex(tables)
    readers = consumers(graph)
    sites = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in inits or len(readers[node.input[0]]) != 1:
            continue
        hits = [h for h in index.matches(initializer_array(inits[node.input[0]]), sites) if not h[1]]
        if hits:
            sites[hits[0][0]] = (node.name, node.input[0])
    return sites


def _write_hard_gates(graph: onnx.GraphProto, ed: "_GraphEditor", params: QuantParams,
                      hard_sites: dict[str, str]) -> None:
    todo = {m: t for m, t in hard_sites.items() if m in params.gates}
    if not todo:
        return
    names = {n.output[0]: i for i, n in enumerate(graph.node) if n.output}
    three = ed.dq_constant(np.array(3, np.uint8), np.array(1.0, np.float32), 0, "hard_gate_three")
    unit = ed.add_init(np.array(act_params_from_range(*UNIT_RANGE).scale, np.float32), "hard_gate_unit_scale")
    for module, tensor in todo.items():
        if tensor not in names or hard_gate_node([graph.node[names[tensor]]], tensor) is None:
            continue  # plan_quantization matched it in this very graph: not expected
        p = params.gates[module]
        tag = f"{module}.hard_gate"
        s = ed.add_init(np.array(p.scale, np.float32), f"{tag}_scale")
        z = ed.add_init(np.array(p.zero_point, np.uint8), f"{tag}_zero_point")
        write_hard_gate(graph.node[names[tensor]], three, (s, z, tag), unit, ed.new_nodes)


def _quantize_pool_outputs(graph: onnx.GraphProto, ed: "_GraphEditor") -> None:
    """A GlobalAveragePool whose output reaches a quantized tensor through shape ops only takes
    that tensor's Q/DQ pair on its own output (elementwise.pool_qdq_targets): onnxruntime then runs
    it as QLinearGlobalAveragePool. The torch model needs no change: the same params twice in a
    row quantize once."""
    params: dict[str, set] = {}
    for tensor, scale, zero_point in ed.act_cache:
        params.setdefault(tensor, set()).add((scale, zero_point))
    quantized = {t for t, ps in params.items() if len(ps) == 1}
    nodes = list(graph.node) + ed.new_nodes
    targets = pool_qdq_targets(nodes, {o.name for o in graph.output}, quantized)
    for pooled, target in targets.items():
        scale, zero_point = next(iter(params[target]))
        dq = ed.qdq_activation(pooled, ActQuant(scale, zero_point))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == pooled:
                    node.input[i] = dq


class _GraphEditor:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.new_nodes: list[onnx.NodeProto] = []
        self.act_cache: dict[tuple, str] = {}

    def add_init(self, arr: np.ndarray, name: str) -> str:
        self.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name

    def qdq_activation(self, tensor: str, p: ActQuant) -> str:
        """Q/DQ pair on `tensor`; shared by every consumer that asks with the same params."""
        key = (tensor, p.scale, p.zero_point)
        if key in self.act_cache:
            return self.act_cache[key]
        tag = f"{tensor}_q{len(self.act_cache)}"
        s = self.add_init(np.array(p.scale, np.float32), f"{tag}_scale")
        z = self.add_init(np.array(p.zero_point, np.uint8), f"{tag}_zero_point")
        self.new_nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tag}_quantized"], name=f"{tag}_Q"))
        self.new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_quantized", s, z], [f"{tag}_dequantized"],
                                               name=f"{tag}_DQ"))
        self.act_cache[key] = f"{tag}_dequantized"
        return self.act_cache[key]

    def dq_constant(self, q: np.ndarray, scale: np.ndarray, axis: int, tag: str) -> str:
        qn = self.add_init(q, f"{tag}_quantized")
        sn = self.add_init(scale.astype(np.float32), f"{tag}_scale")
        zn = self.add_init(np.zeros(scale.shape, q.dtype), f"{tag}_zero_point")
        self.new_nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [f"{tag}_dequantized"],
                                               name=f"{tag}_DQ", axis=axis))
        return f"{tag}_dequantized"


def insert_qdq(model: onnx.ModelProto, sites: dict[str, Site], params: QuantParams,
               embedding_sites: dict[str, tuple[str, str]] | None = None,
               tensor_sites: dict[str, str] | None = None, inplace: bool = False,
               gate_sites: dict[str, str] | None = None, hard_sites: dict[str, str] | None = None,
               ) -> onnx.ModelProto:
    """`tensor_sites` maps a torch module whose output is quantized (params.tensors) to its tensor;
    `gate_sites` a SiLU module to the Sigmoid output inside it (params.gates: quantized too, so
    onnxruntime runs the SiLU as QLinearSigmoid + QLinearMul); `hard_sites` a hard swish / hard
    sigmoid module to its node's output, rewritten around its int8 gate (params.gates,
    elementwise.write_hard_gate).
    `inplace` rewrites `model` itself (a caller done with the FP32 graph saves a copy of it:
    440 MB for a BERT-base)."""
    out = model if inplace else onnx.ModelProto()
    if not inplace:
        out.CopyFrom(model)
    graph = out.graph
    ensure_node_names(graph)
    nodes = {n.name: n for n in graph.node}
    ed = _GraphEditor(graph)
    replaced: set[str] = set()
    rewire: dict[str, str] = {}
    sum_rewire: dict[str, str] = {}  # skip-path tensors: their Add readers take the quantized one
    for anchor in params.anchors:
        site = sites[anchor.module]
        node = nodes[site.node]
        wq = params.weights[anchor.module]
        q, axis = (wq.q.T.copy(), 1) if site.transposed else (wq.q, 0)
        node.input[1] = ed.dq_constant(q, wq.scale, axis, f"{anchor.module}.weight")
        replaced.add(site.weight)
        if anchor.module in params.biases and site.bias:
            bq, bscale = params.biases[anchor.module]
            node.input[2] = ed.dq_constant(bq, bscale, 0, f"{anchor.module}.bias")
            replaced.add(site.bias)
        node.input[0] = ed.qdq_activation(site.activation, params.inputs[anchor.module])
        if anchor.quantize_input_for_sum and site.input_summed:
            sum_rewire.setdefault(site.activation, node.input[0])
        if anchor.module in params.outputs and site.output:
            rewire[site.output] = ed.qdq_activation(site.output, params.outputs[anchor.module])
    for module, tensor in (tensor_sites or {}).items():
        if module in params.tensors:  # e.g. residual adds: every reader reads the Q/DQ'd sum
            rewire[tensor] = ed.qdq_activation(tensor, params.tensors[module])
    for module, tensor in ({} if params.dynamic else (gate_sites or {})).items():
        if module in params.gates:
            rewire[tensor] = ed.qdq_activation(tensor, params.gates[module])
    for module, (node_name, table) in (embedding_sites or {}).items():
        if module not in params.embeddings:
            continue
        q, scale = params.embeddings[module]
        node = nodes[node_name]
        s_name = ed.add_init(np.array(scale, np.float32), f"{table}_scale")
        # Stored as uint8 with zero point 128 (same values as int8 with zero point 0): onnxruntime
        # rewrites int8 activation Q/DQ to uint8, which would break the Gather pattern below.
        z_name = ed.add_init(np.array(128, np.uint8), f"{table}_zero_point")
        ed.add_init((q.astype(np.int16) + 128).astype(np.uint8), f"{table}_quantized")
        ed.new_nodes.append(helper.make_node("DequantizeLinear", [f"{table}_quantized", s_name, z_name],
                                             [f"{table}_dequantized"], name=f"{table}_DQ"))
        node.input[0] = f"{table}_dequantized"
        replaced.add(table)
        # Q/DQ with the table's own params after Gather: onnxruntime then gathers int8 rows
        # instead of dequantizing the whole table on every run. Exact: rows are already on the grid.
        gathered = node.output[0]
        tag = f"{gathered}_q"
        ed.new_nodes.append(helper.make_node("QuantizeLinear", [gathered, s_name, z_name], [f"{tag}_quantized"],
                                             name=f"{tag}_Q"))
        ed.new_nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_quantized", s_name, z_name],
                                             [f"{tag}_dequantized"], name=f"{tag}_DQ"))
        rewire[gathered] = f"{tag}_dequantized"
    new_names = {n.name for n in ed.new_nodes}
    for node in graph.node:
        if node.name in new_names:
            continue
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
            elif node.op_type == "Add" and name in sum_rewire:
                node.input[i] = sum_rewire[name]
    if not params.dynamic:
        _write_hard_gates(graph, ed, params, hard_sites or {})
    _quantize_pool_outputs(graph, ed)
    # an exporter stores equal constants once (zero biases, say): a replaced initializer that
    # another node still reads stays
    still_read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name not in replaced or i.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    all_nodes = list(graph.node) + ed.new_nodes
    all_nodes += _float_layers_stay_float(all_nodes, graph)
    del graph.node[:]
    graph.node.extend(toposort(all_nodes, graph))
    return out


FLOAT_WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm")


def _float_layers_stay_float(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Layers left in FP32 (fallback, or never quantized) between int8 ones keep their FP32 weights
    in onnxruntime too.

    onnxruntime's WeightBiasQuantization rewrites a Conv / ConvTranspose / Gemm whose input comes from
    a DequantizeLinear with a *scalar* scale and whose output reaches a QuantizeLinear: it quantizes
    the float weight to int8 *per tensor*, far coarser than per-channel for depthwise or BN-folded
    weights (mobilenet-v2 with its first depthwise conv kept FP32: KL to FP32 0.005 as the graph
    says, 0.055 as onnxruntime ran it). Each such layer reads its input through a DequantizeLinear
    of its own whose scale and zero point are the same values as a per-channel vector (axis 1):
    the same arithmetic, and the rewrite no longer applies. Returns the new nodes; rewires in place."""
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in nodes for o in n.output}
    added: list[onnx.NodeProto] = []
    for node in nodes:
        if node.op_type not in FLOAT_WEIGHT_OPS or len(node.input) < 2:
            continue
        weight = inits.get(node.input[1])
        dq = producers.get(node.input[0])
        if weight is None or weight.data_type != onnx.TensorProto.FLOAT or dq is None \
                or dq.op_type != "DequantizeLinear" or dq.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        if scale.ndim != 0:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            channels, axis = weight.dims[1] * int(attrs.get("group", 1)), 1
        elif node.op_type == "ConvTranspose":
            channels, axis = weight.dims[0], 1
        else:  # Gemm: A is (M, K), or (K, M) with transA
            channels = weight.dims[1] if attrs.get("transB", 0) else weight.dims[0]
            axis = 0 if attrs.get("transA", 0) else 1
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits \
            else np.zeros((), np.uint8)
        tag = f"{node.name}_input_per_channel"
        s_name, z_name = f"{tag}_scale", f"{tag}_zero_point"
        graph.initializer.extend([numpy_helper.from_array(np.full(channels, scale, np.float32), s_name),
                                  numpy_helper.from_array(np.full(channels, zero, zero.dtype), z_name)])
        added.append(helper.make_node("DequantizeLinear", [dq.input[0], s_name, z_name], [f"{tag}_dequantized"],
                                      name=f"{tag}_DQ", axis=axis))
        node.input[0] = f"{tag}_dequantized"
    return added
