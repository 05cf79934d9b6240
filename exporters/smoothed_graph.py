"""The FP32 graph of a smoothed model, written from the graph of the same model before smoothing.

SmoothQuant (toolchain/quantization/smoothing.py) turns a group of Linears that read one tensor
into linear(x * inv_scale) with the weight columns multiplied by 1/inv_scale. Its export is the
graph before smoothing plus one Mul(x, inv_scale) in front of the group's MatMul/Gemm nodes and
the new weights in their initializers: this module writes exactly that, so the model is not
exported a second time (a BERT-base-size encoder: ~6 CPU s and a 435 MB file less).

Everything is checked before anything changes; a graph that does not have the expected shape
raises GraphMismatch with the reason, and the caller exports instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporters.graph import consumers
from exporters.qdq import Site

__all__ = ["SmoothedGroup", "GraphMismatch", "apply_smoothing"]


class GraphMismatch(Exception):
    """The graph is not the one expected: its message says why (it goes into the report)."""


@dataclass(frozen=True)
class SmoothedGroup:
    """Linears that read one tensor, smoothed with one scale."""

    inv_scale: np.ndarray  # (in_features,): the input is multiplied by it
    weights: dict[str, np.ndarray]  # module name (before smoothing) -> smoothed weight as torch holds it: (out, in)

    @property
    def leader(self) -> str:
        return min(self.weights)


def _check_group(group: SmoothedGroup, sites: dict[str, Site], nodes: dict, inits: dict, readers: dict) -> str:
    """The group's shared input tensor in the graph; raises GraphMismatch if anything is off."""
    for module in sorted(group.weights):
        if module not in sites:
            raise GraphMismatch(f"smoothed Linear {module} has no weight initializer of its own in the baseline graph")
    activations = {sites[m].activation for m in group.weights}
    if len(activations) != 1:
        raise GraphMismatch(f"the smoothed Linears of {group.leader}'s group read different tensors in the baseline graph")
    inv = group.inv_scale
    for module, w in sorted(group.weights.items()):
        site = sites[module]
        node, init = nodes.get(site.node), inits.get(site.weight)
        if site.op_type not in ("MatMul", "Gemm") or node is None or node.op_type != site.op_type:
            raise GraphMismatch(f"smoothed Linear {module} is read by a {site.op_type} node, not MatMul/Gemm")
        if init is None or list(node.input[:2]) != [site.activation, site.weight] or len(readers[site.weight]) != 1:
            raise GraphMismatch(f"the weight of smoothed Linear {module} is not one initializer read by its node alone")
        stored = w.T if site.transposed else w
        if init.data_type != onnx.TensorProto.FLOAT or tuple(init.dims) != stored.shape \
                or init.data_location == onnx.TensorProto.EXTERNAL:
            raise GraphMismatch(f"the weight initializer of smoothed Linear {module} is not a float32 {stored.shape}")
        if inv.dtype != np.float32 or inv.shape != (w.shape[1],):
            raise GraphMismatch(f"the smoothing scale of {module} is not float32 ({w.shape[1]},)")
    return activations.pop()


def apply_smoothing(model: onnx.ModelProto, sites: dict[str, Site], groups: list[SmoothedGroup]) -> None:
    """Rewrite `model` (the graph before smoothing; `sites` located on the weights before
    smoothing) in place into the graph of the smoothed model: per group one Mul(shared input,
    inv_scale initializer) that the group's MatMul/Gemm nodes read instead, and their weight
    initializers holding the smoothed weights in the layout the graph stores them."""
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    taken = set(nodes) | set(inits) | {t for n in graph.node for t in n.output} | {i.name for i in graph.input}
    planned = []
    for group in groups:
        shared = _check_group(group, sites, nodes, inits, readers)
        scale, mul, out = f"{group.leader}.inv_scale", f"{group.leader}/SmoothQuant/Mul", f"{group.leader}.smoothed_input"
        if {scale, mul, out} & taken:
            raise GraphMismatch(f"the baseline graph already has a tensor or node named like {scale}")
        taken |= {scale, mul, out}
        planned.append((group, shared, scale, mul, out))
    position = {n.name: i for i, n in enumerate(graph.node)}
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> Muls that go right before it
    for group, shared, scale, mul, out in planned:
        graph.initializer.append(numpy_helper.from_array(group.inv_scale, scale))
        first = min(position[sites[m].node] for m in group.weights)  # the shared input exists by then
        before.setdefault(first, []).append(helper.make_node("Mul", [shared, scale], [out], name=mul))
        for module, w in group.weights.items():
            site = sites[module]
            nodes[site.node].input[0] = out
            init = inits[site.weight]
            init.ClearField("float_data")
            init.raw_data = np.ascontiguousarray(w.T if site.transposed else w, np.dtype("<f4")).tobytes()
    if before:
        ordered = [m for i, n in enumerate(graph.node) for m in (*before.get(i, ()), n)]
        del graph.node[:]
        graph.node.extend(ordered)
