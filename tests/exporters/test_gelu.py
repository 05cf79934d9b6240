"""An erf-GELU whose input is dequantized is written as one com.microsoft Gelu: onnxruntime's own
fusion cannot match it once every DequantizeLinear reader gets its own copy."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper
from torch import nn

from sqexport.exporters.gelu import MS_DOMAIN, fuse_dequantized_gelu, with_ms_domain


def _gelu_graph(tmp_path, dequantized: bool) -> onnx.ModelProto:
    """conv -> GELU -> conv as torch exports it, with Q/DQ on the first conv's output if asked."""
    path = tmp_path / "g.onnx"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.GELU(), nn.Conv2d(4, 2, 1)).eval()
    torch.onnx.export(model, (torch.rand(1, 3, 4, 4),), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    m = onnx.load(str(path))
    if dequantized:
        conv = next(n for n in m.graph.node if n.op_type == "Conv")
        out = conv.output[0]
        m.graph.initializer.extend([numpy_helper.from_array(np.float32(0.02), "s"),
                                    numpy_helper.from_array(np.uint8(128), "z")])
        for reader in [n for n in m.graph.node if out in n.input]:
            reader.input[:] = [out + "_dq" if i == out else i for i in reader.input]
        at = list(m.graph.node).index(conv) + 1
        m.graph.node.insert(at, helper.make_node("DequantizeLinear", [out + "_q", "s", "z"], [out + "_dq"]))
        m.graph.node.insert(at, helper.make_node("QuantizeLinear", [out, "s", "z"], [out + "_q"]))
    return m


def _run(m: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_a_dequantized_gelu_becomes_one_node_computing_the_same(tmp_path):
    m = _gelu_graph(tmp_path, dequantized=True)
    x = np.random.default_rng(0).random((1, 3, 4, 4), np.float32) * 4 - 2
    before = _run(m, x)
    assert fuse_dequantized_gelu(m.graph) == 1
    with_ms_domain(m)
    ops = [n.op_type for n in m.graph.node]
    assert "Erf" not in ops and "Div" not in ops and ops.count("Gelu") == 1
    assert next(n for n in m.graph.node if n.op_type == "Gelu").domain == MS_DOMAIN
    onnx.checker.check_model(m)
    np.testing.assert_allclose(_run(m, x), before, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(m, x, optimize=True), before, rtol=1e-5, atol=1e-6)


def test_a_float_gelu_is_left_to_onnxruntime(tmp_path):
    m = _gelu_graph(tmp_path, dequantized=False)
    assert fuse_dequantized_gelu(m.graph) == 0
    assert "Erf" in [n.op_type for n in m.graph.node]
