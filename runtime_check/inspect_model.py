"""`sqexport inspect`: what is inside an ONNX file: per-weight sparsity, QDQ coverage, dtypes, sizes."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from sqexport.exporters.sparse import file_sizes, initializer_stats
from sqexport.contracts.errors import ModelLoadError, first_line
from sqexport.contracts.files import require_regular

__all__ = ["inspect_onnx", "load_onnx"]

COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "MatMulInteger")
QUANTIZED_ACTIVATION_SOURCES = ("DequantizeLinear", "DynamicQuantizeLinear")


def load_onnx(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        require_regular(path, "model", ModelLoadError)  # a FIFO or device: said so
        raise ModelLoadError(f"no such file: {path}")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {first_line(exc)}") from None
    return model


def inspect_onnx(path: Path) -> dict:
    model = load_onnx(path)
    graph = model.graph
    ops = Counter(n.op_type for n in graph.node)
    producers = {o: n for n in graph.node for o in n.output}
    stats = {r["name"]: r for r in initializer_stats(model)}
    weights, quantized_compute = [], 0
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS or len(node.input) < 2:
            continue
        w, src = node.input[1], producers.get(node.input[1])
        if src is not None and src.op_type == "DequantizeLinear":
            w = src.input[0]
        if w not in stats:
            continue
        act = producers.get(node.input[0])
        qdq = act is not None and act.op_type in QUANTIZED_ACTIVATION_SOURCES
        int8_weight = src is not None or stats[w]["dtype"] in ("int8", "uint8")
        quantized_compute += qdq and int8_weight
        row = dict(stats[w])
        row.update(node=node.name, op=node.op_type, activation_qdq=bool(qdq))
        weights.append(row)
    total_w = sum(r["bytes"] for r in weights)
    n_elems = sum(r["elements"] for r in weights)
    n_zero = sum(round(r["sparsity"] * r["elements"]) for r in weights)
    return {
        "file": str(path), "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "inputs": [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                   for i in graph.input],
        "outputs": [o.name for o in graph.output],
        "nodes": sum(ops.values()), "op_counts": dict(sorted(ops.items())),
        "quantize_linear": ops.get("QuantizeLinear", 0), "dequantize_linear": ops.get("DequantizeLinear", 0),
        "compute_nodes": len(weights), "quantized_compute_nodes": int(quantized_compute),
        "weights": weights, "weight_bytes": total_w,
        "weight_sparsity": n_zero / n_elems if n_elems else 0.0,
        "size_bytes": file_sizes(path),
    }
