"""Find the ONNX tensor that holds a given torch module's output, by value.

Residual adds have no weight to match by content (as exporters.qdq.find_sites does for Conv/Gemm),
and exporter node names are not a contract. So the FP32 graph runs once on the example input with
the candidate tensors exposed as outputs, and each torch output is matched to the candidate of the
same shape and values (to float rounding). An ambiguous or missing match is left out: that add then
simply stays unquantized, which is slower but still correct.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

__all__ = ["find_tensor_sites"]


def _candidates(model: onnx.ModelProto, op_types: tuple[str, ...]) -> list[str]:
    return [n.output[0] for n in model.graph.node if n.op_type in op_types]


def find_tensor_sites(model: onnx.ModelProto, torch_values: dict[str, np.ndarray], feed: dict,
                      op_types: tuple[str, ...] = ("Add",), rtol: float = 1e-4) -> dict[str, str]:
    """torch module name -> ONNX tensor name, for modules whose output (on `feed`) equals exactly
    one output of an `op_types` node."""
    names = _candidates(model, op_types)
    if not names or not torch_values:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in sess.get_inputs()}
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v for k, v in feed.items()
                                                                              if k in inputs})))
    found: dict[str, str] = {}
    for module, want in torch_values.items():
        tol = rtol * (1.0 + float(np.abs(want).max()))
        hits = [n for n in names if values[n].shape == want.shape and float(np.abs(values[n] - want).max()) <= tol]
        if len(hits) == 1 and hits[0] not in found.values():
            found[module] = hits[0]
    return found
