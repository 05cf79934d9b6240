"""Graph utilities every ONNX writer shares: consumers, node names, topological order, and
merging duplicate nodes."""
from __future__ import annotations

import json

import hashlib
import heapq
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["consumers", "ensure_node_names", "toposort", "merge_duplicate_nodes", "own_weights", "set_metadata"]


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    out = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def ensure_node_names(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes a unique name: the writers address nodes by name."""
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def toposort(nodes: list[onnx.NodeProto], graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's algorithm, keeping the original order among ready nodes (stable, no recursion)."""
    producer = {o: idx for idx, n in enumerate(nodes) for o in n.output}
    deps = [{producer[i] for i in n.input if i in producer} for n in nodes]
    users = defaultdict(list)
    for idx, d in enumerate(deps):
        for p in d:
            users[p].append(idx)
    pending = [len(d) for d in deps]
    ready = [idx for idx, c in enumerate(pending) if c == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        idx = heapq.heappop(ready)
        ordered.append(nodes[idx])
        for u in users[idx]:
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(ordered) != len(nodes):
        raise ValueError("graph has a cycle after QDQ insertion")
    return ordered


def merge_duplicate_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] = ("Mul",)) -> int:
    """Common-subexpression elimination for `op_types`: nodes with the same inputs (initializers
    compared by value) and attributes collapse into one. Smoothing gives Q/K/V the same
    per-channel multiply; merged, the three MatMuls read one tensor and share one Q/DQ pair."""
    graph = model.graph
    ensure_node_names(graph)
    inits = {i.name: i for i in graph.initializer}
    canonical: dict[tuple, str] = {}

    # exporters dedupe equal constants as Identity(initializer): look through those
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}

    def key_of(name: str):
        name = alias.get(name, name)
        if name in inits:
            arr = numpy_helper.to_array(inits[name])
            return ("init", arr.dtype.str, arr.shape, hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest())
        return ("tensor", name)

    rename: dict[str, str] = {}
    keep = []
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
        if node.op_type in op_types and len(node.output) == 1:
            key = (node.op_type, tuple(key_of(n) for n in node.input),
                   tuple(a.SerializeToString() for a in node.attribute))
            if key in canonical:
                rename[node.output[0]] = canonical[key]
                continue
            canonical[key] = node.output[0]
        keep.append(node)
    outputs = {o.name for o in graph.output}
    if rename.keys() & outputs:
        return 0  # never rename a graph output; leave such graphs alone
    merged = len(graph.node) - len(keep)
    del graph.node[:]
    graph.node.extend(keep)
    return merged


_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


def own_weights(model: onnx.ModelProto) -> int:
    """Give every Conv/Gemm/MatMul its own weight initializer, read directly. Exporters store equal
    constants once, behind Identity nodes (zero-initialized layers, e.g. a residual branch's last
    conv whose BatchNorm scale starts at 0, fold to equal weights): a shared weight cannot take
    one int8 copy per layer. Only weights that nothing but such nodes read are copied (a weight
    tied to an embedding Gather stays shared). Returns the number of copies made."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    names_of: dict[str, list[str]] = defaultdict(list)  # initializer -> itself and its Identity aliases
    for name in inits:
        names_of[name].append(name)
    for out, source in alias.items():
        names_of[source].append(out)
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)  # initializer -> weight nodes reading it
    for node in graph.node:
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1:
            source = alias.get(node.input[1], node.input[1])
            if source in inits:
                users[source].append(node)
    copies = 0
    for source, nodes in users.items():
        own = {id(n) for n in nodes}
        others = [n for name in names_of[source] for n in readers[name]
                  if n.op_type != "Identity" and id(n) not in own]
        if others or any(name in outputs for name in names_of[source]):
            continue  # also read elsewhere (a tied embedding table): stays shared
        for i, node in enumerate(nodes):
            if i == 0:
                node.input[1] = source
                continue
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[source])
            copy.name = f"{source}_copy{i}"
            graph.initializer.append(copy)
            node.input[1] = copy.name
            copies += 1
    read = {name for n in graph.node for name in n.input} | outputs
    for node in [n for n in graph.node if n.op_type == "Identity" and n.output[0] in alias and n.output[0] not in read]:
        graph.node.remove(node)  # aliases no node reads any more
    return copies


def set_metadata(model: onnx.ModelProto, metadata: dict) -> None:
    """metadata_props[key] = value (JSON for non-strings), replacing an entry of the same key."""
    for key, value in metadata.items():
        entry = next((p for p in model.metadata_props if p.key == key), None) or model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)
