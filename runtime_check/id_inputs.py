"""How many rows the tables a model's integer inputs index have, read from the ONNX graph, so that
synthetic ids are valid rows: a 100-row embedding fails on id 850 (onnxruntime: "indices element
out of data bounds")."""
from __future__ import annotations

import onnx

__all__ = ["id_bounds"]

# ops that carry ids unchanged in value on their way from the graph input to a Gather
_CARRY = ("Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Transpose")


def _table_rows(node: onnx.NodeProto, constants: dict[str, list[int]], producers: dict) -> int | None:
    data = node.input[0]
    producer = producers.get(data)
    if producer is not None and producer.op_type == "DequantizeLinear":  # an int8 embedding table
        data = producer.input[0]
    dims = constants.get(data)
    if not dims:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return dims[axis if axis >= 0 else axis + len(dims)]


def id_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer graph input -> rows of the smallest constant table a Gather indexes with it
    (directly or through Cast / Unsqueeze / Reshape ...); inputs that index no table are left out."""
    graph = model.graph
    constants = {i.name: list(i.dims) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            constants[node.output[0]] = list(node.attribute[0].t.dims)
    producers = {o: n for n in graph.node for o in n.output}
    integer = {i.name for i in graph.input if i.type.tensor_type.elem_type in
               (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    bounds: dict[str, int] = {}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) < 2:
            continue
        source, seen = node.input[1], 0
        while source not in integer and seen < 16:  # a short chain of carrying ops, never a loop
            producer = producers.get(source)
            if producer is None or producer.op_type not in _CARRY:
                break
            source, seen = producer.input[0], seen + 1
        rows = _table_rows(node, constants, producers) if source in integer else None
        if rows:
            bounds[source] = min(rows, bounds.get(source, rows))
    return bounds
