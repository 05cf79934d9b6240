"""Which weight layers an activation site (a residual sum, a SiLU's gate, a hard swish) sits
between, so that a site whose layers all stay FP32 loses its Q/DQ too.

The Q/DQ pairs on weightless ops exist for onnxruntime's int8 kernels next to int8 layers
(QLinearAdd, QLinearSigmoid, QLinearMul between QLinearConvs). Around layers the fallback or the
speed check returned to FP32 they only round: EfficientNet-B0 (random weights) with all 82 weight
layers in FP32 still carried 239 QuantizeLinear nodes, and its outputs' cosine to FP32 stayed
below 0.99; MobileNetV3-Small with all 54 in FP32 carried 53 and reached 0.9908, not 1.

From the site's tensor the graph is walked forward through its readers and backward through its
producers, through every op that is not a weight layer, and each walk stops at the first weight
layer it meets (a Conv / Gemm / MatMul of the plan's sites). Those layers are the site's
neighbors: while one of them is int8, the site keeps its Q/DQ.
"""
from __future__ import annotations

import onnx

from sqexport.exporters.graph import consumers

__all__ = ["site_neighbors", "without_orphan_sites"]

MAX_HOPS = 64  # ops walked from one site (a residual stream crosses a few adds per block)


def site_neighbors(graph: onnx.GraphProto, site_tensors: dict[str, str],
                   layer_nodes: dict[str, str]) -> dict[str, frozenset[str]]:
    """site module -> the weight-layer modules next to its tensor (`site_tensors`: module -> ONNX
    tensor; `layer_nodes`: ONNX node name -> weight-layer module)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    consts = {i.name for i in graph.initializer}

    def walk(tensor: str) -> frozenset[str]:
        found: set[str] = set()
        seen: set[str] = set()
        todo = [(tensor, "both")]
        hops = 0
        while todo and hops < MAX_HOPS:
            name, way = todo.pop()
            hops += 1
            nodes = []
            if way in ("both", "forward"):
                nodes += [(n, "forward") for n in readers.get(name, ())]
            if way in ("both", "backward") and name in producer:
                nodes.append((producer[name], "backward"))
            for node, direction in nodes:
                if (node.name, direction) in seen:
                    continue
                seen.add((node.name, direction))
                if node.name in layer_nodes:
                    found.add(layer_nodes[node.name])
                    continue
                nxt = node.output if direction == "forward" else [i for i in node.input if i and i not in consts]
                todo += [(t, direction) for t in nxt]
        return frozenset(found)

    return {module: walk(tensor) for module, tensor in site_tensors.items()}


def without_orphan_sites(tensors: dict, gates: dict, neighbors: dict[str, frozenset[str]],
                         int8_layers: set[str]) -> tuple[dict, dict]:
    """`tensors` and `gates` without the sites none of whose neighbor layers is int8 (a site with
    no known neighbors keeps its params)."""
    def kept(module: str) -> bool:
        near = neighbors.get(module)
        return not near or bool(near & int8_layers)
    return ({m: p for m, p in tensors.items() if kept(m)}, {m: p for m, p in gates.items() if kept(m)})
