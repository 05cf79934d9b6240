"""The sentence embedding as an extra ONNX output: contracts.pooling's arithmetic in graph ops
after the token states, so an app gets the pooled (and normalized) vector the model card promises
without re-implementing the pooling. Appended after export, before quantization: model.onnx and
baseline.onnx both carry it, and the int8 writers never touch these ops (no weights)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sqexport.contracts.pooling import Pooling

__all__ = ["SENTENCE_EMBEDDING", "add_pooling_output"]

SENTENCE_EMBEDDING = "sentence_embedding"


class _Builder:
    def __init__(self, graph: onnx.GraphProto, opset: int):
        self.graph, self.n, self.opset = graph, 0, opset

    def const(self, value, dtype=np.float32) -> str:
        name = f"pooling_const_{self.n}"
        self.n += 1
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = f"pooling_{op_type.lower()}_{self.n}"
        self.n += 1
        self.graph.node.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _mode(b: _Builder, mode: str, hidden: str, mask3: str, mask2: str, count: str) -> str:
    if mode == "cls":
        return b.op("Gather", [hidden, b.const(0, np.int64)], axis=1)
    if mode == "max":
        # masked-out tokens become -1e9, as sentence-transformers does
        neg = b.op("Mul", [b.op("Sub", [b.const(1.0), mask3]), b.const(-1e9)])
        masked = b.op("Add", [b.op("Mul", [hidden, mask3]), neg])
        # ReduceMax takes axes as an attribute until opset 18 (ReduceSum: an input since 13)
        if b.opset >= 18:
            return b.op("ReduceMax", [masked, b.const([1], np.int64)], keepdims=0)
        return b.op("ReduceMax", [masked], axes=[1], keepdims=0)
    summed = b.op("ReduceSum", [b.op("Mul", [hidden, mask3]), b.const([1], np.int64)], keepdims=0)
    if mode == "mean":
        return b.op("Div", [summed, count])
    if mode == "mean_sqrt_len":
        return b.op("Div", [summed, b.op("Sqrt", [count])])
    if mode == "lasttoken":
        last = b.op("ArgMax", [mask2], axis=1, keepdims=1, select_last_index=1)  # (batch, 1)
        idx = b.op("Unsqueeze", [last, b.const([2], np.int64)])  # (batch, 1, 1)
        width = b.op("Slice", [b.op("Shape", [hidden]), b.const([2], np.int64), b.const([3], np.int64)])
        idx = b.op("Expand", [idx, b.op("Concat", [b.const([1, 1], np.int64), width], axis=0)])  # (batch, 1, dim)
        picked = b.op("GatherElements", [hidden, idx], axis=1)
        return b.op("Squeeze", [picked, b.const([1], np.int64)])
    raise ValueError(f"unknown pooling mode {mode!r}")


def add_pooling_output(model: onnx.ModelProto, pooling: Pooling, hidden: str = "last_hidden_state",
                       mask: str = "attention_mask") -> onnx.ModelProto:
    """Append `sentence_embedding` (batch, dim) computed from `hidden` and the `mask` input, in place."""
    graph = model.graph
    if hidden not in {o.name for o in graph.output} or mask not in {i.name for i in graph.input}:
        return model
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    b = _Builder(graph, opset)
    mask2 = b.op("Cast", [mask], to=TensorProto.FLOAT)
    mask3 = b.op("Unsqueeze", [mask2, b.const([2], np.int64)])
    count = b.op("Max", [b.op("ReduceSum", [mask3, b.const([1], np.int64)], keepdims=0), b.const(1e-9)])
    parts = [_mode(b, mode, hidden, mask3, mask2, count) for mode in pooling.modes]
    out = b.op("Concat", parts, axis=-1) if len(parts) > 1 else parts[0]
    if pooling.normalize:
        norm = b.op("Sqrt", [b.op("ReduceSum", [b.op("Mul", [out, out]), b.const([-1], np.int64)], keepdims=1)])
        out = b.op("Div", [out, b.op("Max", [norm, b.const(1e-12)])])
    graph.node.append(helper.make_node("Identity", [out], [SENTENCE_EMBEDDING], name="sentence_embedding_Identity"))
    graph.output.append(helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch_size", None]))
    return model
