"""The FP32 graph of a smoothed model, written from the graph of the same model before smoothing.

SmoothQuant (toolchain/quantization/smoothing.py) turns a group of Linears that read one tensor
into linear(x * inv_scale) with the weight columns multiplied by 1/inv_scale. Its export is the
graph before smoothing plus one Mul(x, inv_scale) in front of the group's MatMul/Gemm nodes and
the new weights in their initializers: this module writes exactly that, so the model is not
exported a second time (a BERT-base-size encoder: ~6 CPU s and a 435 MB file less).

The graph is kept without the weights it locates (without_weights: a BERT-base-size encoder
keeps ~100 MB instead of 440 while smoothing runs), and they come back from torch as the model
holds them then (with_weights): setting a protobuf bytes field in place would keep the old bytes
in the message's arena as well. Everything is checked before anything changes; a graph that does
not have the expected shape raises GraphMismatch with the reason, and the caller exports instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from sqexport.exporters.graph import consumers
from sqexport.exporters.qdq import Site

__all__ = ["SmoothedGroup", "GraphMismatch", "without_weights", "with_weights", "unsmooth_float_readers",
           "SMOOTHED_INPUT_SUFFIX"]

SMOOTHED_INPUT_SUFFIX = ".smoothed_input"  # the output of a group's Mul: how unsmooth_float_readers finds it


class GraphMismatch(Exception):
    """The graph is not the one expected: its message says why (it goes into the report)."""


@dataclass(frozen=True)
class SmoothedGroup:
    """Linears that read one tensor, smoothed with one scale."""

    inv_scale: np.ndarray  # (in_features,): the input is multiplied by it
    modules: tuple[str, ...]  # the Linears, by their names before smoothing

    @property
    def leader(self) -> str:
        return min(self.modules)


def without_weights(model: onnx.ModelProto, sites: dict[str, Site]) -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """(`model` without the weight initializers of `sites`, their shapes by initializer name).
    `model` is taken apart: its initializers are moved out, so the caller drops it afterwards."""
    graph = model.graph
    dropped = {s.weight for s in sites.values()}
    shapes = {}
    for init in graph.initializer:
        if init.name in dropped:
            if init.data_type != onnx.TensorProto.FLOAT or init.data_location == onnx.TensorProto.EXTERNAL:
                raise GraphMismatch(f"weight initializer {init.name} is not float32 held in the graph")
            shapes[init.name] = tuple(init.dims)
    kept = [i for i in graph.initializer if i.name not in dropped]
    del graph.initializer[:]  # the copy below then copies everything else but no weight
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    skeleton.graph.initializer.extend(kept)
    return skeleton, shapes


def _stored(site: Site, w: np.ndarray) -> np.ndarray:
    return w.T if site.transposed else w


def _check(skeleton: onnx.ModelProto, sites: dict[str, Site], shapes: dict, weights: dict,
           groups: list[SmoothedGroup]) -> dict[int, str]:
    """Shared input tensor per group (by index); raises GraphMismatch if anything is off."""
    nodes = {n.name: n for n in skeleton.graph.node}
    readers = consumers(skeleton.graph)
    for module, site in sorted(sites.items()):
        node, w = nodes.get(site.node), weights.get(module)
        if w is None:
            raise GraphMismatch(f"Linear {module} of the baseline graph is not in the model any more")
        if node is None or node.op_type != site.op_type or list(node.input[:2]) != [site.activation, site.weight] \
                or len(readers[site.weight]) != 1:
            raise GraphMismatch(f"the node of Linear {module} is not the one located in the baseline graph")
        if _stored(site, w).shape != shapes.get(site.weight):
            raise GraphMismatch(f"the weight of Linear {module} changed shape since the baseline export")
    shared = {}
    for i, group in enumerate(groups):
        for module in sorted(group.modules):
            if module not in sites:
                raise GraphMismatch(f"smoothed Linear {module} has no weight initializer of its own in the baseline graph")
            if sites[module].op_type not in ("MatMul", "Gemm"):
                raise GraphMismatch(f"smoothed Linear {module} is read by a {sites[module].op_type} node, not MatMul/Gemm")
        activations = {sites[m].activation for m in group.modules}
        if len(activations) != 1:
            raise GraphMismatch(f"the smoothed Linears of {group.leader}'s group read different tensors "
                                "in the baseline graph")
        width = weights[group.leader].shape[1]
        if group.inv_scale.dtype != np.float32 or group.inv_scale.shape != (width,):
            raise GraphMismatch(f"the smoothing scale of {group.leader}'s group is not float32 ({width},)")
        shared[i] = activations.pop()
    return shared


def with_weights(skeleton: onnx.ModelProto, sites: dict[str, Site], shapes: dict, weights: dict[str, np.ndarray],
                 groups: list[SmoothedGroup]) -> None:
    """Complete `skeleton` (without_weights) in place into the graph of the model now: every
    site's weight from `weights` (module -> weight as torch holds it now, smoothed or not) in the
    layout the graph stores it, and per smoothed group one Mul(shared input, inv_scale
    initializer) that the group's MatMul/Gemm nodes read instead of the shared input."""
    shared = _check(skeleton, sites, shapes, weights, groups)
    graph = skeleton.graph
    taken = {n.name for n in graph.node} | {i.name for i in graph.initializer} | set(shapes) \
        | {t for n in graph.node for t in n.output} | {i.name for i in graph.input}
    names = []
    for group in groups:
        scale, mul, out = f"{group.leader}.inv_scale", f"{group.leader}/SmoothQuant/Mul", f"{group.leader}{SMOOTHED_INPUT_SUFFIX}"
        if {scale, mul, out} & taken:
            raise GraphMismatch(f"the baseline graph already has a tensor or node named like {scale}")
        taken |= {scale, mul, out}
        names.append((scale, mul, out))
    for module, site in sites.items():  # one tensor at a time: the weights are copied once, into the graph
        init = graph.initializer.add()
        init.name, init.data_type = site.weight, onnx.TensorProto.FLOAT
        init.dims.extend(shapes[site.weight])
        init.raw_data = np.ascontiguousarray(_stored(site, weights[module]), np.dtype("<f4")).tobytes()
    nodes = {n.name: n for n in graph.node}
    position = {n.name: i for i, n in enumerate(graph.node)}
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> Muls that go right before it
    for i, (group, (scale, mul, out)) in enumerate(zip(groups, names)):
        graph.initializer.append(numpy_helper.from_array(group.inv_scale, scale))
        first = min(position[sites[m].node] for m in group.modules)  # the shared input exists by then
        before.setdefault(first, []).append(helper.make_node("Mul", [shared[i], scale], [out], name=mul))
        for module in group.modules:
            nodes[sites[module].node].input[0] = out
    if before:
        ordered = [m for i, n in enumerate(graph.node) for m in (*before.get(i, ()), n)]
        del graph.node[:]
        graph.node.extend(ordered)


def _foldable_weight(node: onnx.NodeProto, tensor: str, inits: dict, readers: dict) -> onnx.TensorProto | None:
    """The float (in, out) weight initializer of a MatMul that reads `tensor` and owns its weight;
    None otherwise (an int8 layer reads a DequantizeLinear). Smoothing only groups Linears over token
    sequences (rank >= 3), which export as MatMul, never Gemm."""
    if node.op_type != "MatMul" or node.input[0] != tensor:
        return None
    weight = inits.get(node.input[1])
    if weight is None or weight.data_type != onnx.TensorProto.FLOAT or len(weight.dims) != 2 \
            or weight.data_location == onnx.TensorProto.EXTERNAL or len(readers.get(weight.name, ())) != 1:
        return None
    return weight


def unsmooth_float_readers(graph: onnx.GraphProto) -> int:
    """Fold each smoothing Mul whose readers all stayed FP32 back into their weights; returns how many.

    Smoothing only serves an int8 quantizer after the Mul. When every Linear of a group ended in FP32
    (accuracy fallback, speed check) the Mul is a wasted pass over the activation: CaiT's talking-heads
    Linears, kept FP32 for speed, paid 15 of 51 ms for their Muls over the attention maps. W' = diag(s) W
    is the same function up to float32 rounding."""
    readers = consumers(graph)
    inits = {i.name: i for i in graph.initializer}
    dropped: dict[str, str] = {}  # Mul node -> its scale initializer
    for mul in graph.node:
        out = mul.output[0]
        if mul.op_type != "Mul" or not out.endswith(SMOOTHED_INPUT_SUFFIX) or mul.input[1] not in inits \
                or any(o.name == out for o in graph.output):
            continue
        weights = [_foldable_weight(n, out, inits, readers) for n in readers.get(out, ())]
        scale = numpy_helper.to_array(inits[mul.input[1]]).astype(np.float32)
        if not weights or any(w is None or tuple(w.dims[:1]) != scale.shape for w in weights):
            continue
        for weight, node in zip(weights, readers[out]):
            folded = numpy_helper.to_array(weight) * scale[:, None]  # rows are the input channels
            weight.raw_data = np.ascontiguousarray(folded, np.dtype("<f4")).tobytes()
            del weight.float_data[:]
            node.input[0] = mul.input[0]
        dropped[mul.name] = mul.input[1]
    if not dropped:
        return 0
    kept = [n for n in graph.node if n.name not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    still_read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name in set(dropped.values()) - still_read]:
        graph.initializer.remove(init)
    return len(dropped)
