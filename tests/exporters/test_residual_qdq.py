"""Residual sums in static int8: every Conv of a residual block becomes QLinearConv and the Add
QLinearAdd in onnxruntime, and onnxruntime still reproduces the torch fake-quant model."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from sqexport.contracts.quant import Anchor
from sqexport.exporters.onnx_export import export_torch
from sqexport.exporters.qdq import find_sites, insert_qdq
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.pruning import prunable_layers
from sqexport.toolchain.quantization import fake_quant_model
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.stages import QuantContext


class ResNetlet(nn.Module):
    """stem conv+relu, one identity block (conv-relu-conv + x, relu), one block with a 1x1
    shortcut conv, then a conv head: the two kinds of residual sum."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.short = nn.Conv2d(c, c, 1)
        self.head = nn.Conv2d(c, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.stem(x))
        x = self.relu(self.a2(self.relu(self.a1(x))) + x)
        x = self.relu(self.b2(self.relu(self.b1(x))) + self.short(x))
        return self.head(x).mean((2, 3))


def _quantized(tmp_path):
    torch.manual_seed(0)
    model = ResNetlet().eval()
    rng = np.random.default_rng(0)
    example = {"x": rng.normal(size=(1, 2, 6, 6)).astype(np.float32)}
    fp32 = export_torch(model, example, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}, tmp_path / "m.onnx")
    sites = find_sites(fp32, {n: m.weight.detach().numpy() for n, m in prunable_layers(model).items()})
    anchors = [Anchor(n, s.output is not None, s.bias is not None, False, s.output_range,
                      quantize_input_for_sum=s.input_summed)
               for n, s in sites.items()]
    calib = [{"x": rng.normal(size=(8, 2, 6, 6)).astype(np.float32)} for _ in range(4)]
    ctx = QuantContext(anchors=anchors, calib_batches=calib, run=lambda m, b: m(torch.from_numpy(b["x"])))
    params = lookup("quantize", "int8").handler(model, Int8StaticConfig(), ctx)
    return model, sites, params, insert_qdq(fp32, sites, params), rng


def test_residual_sites_are_found(tmp_path):
    _, sites, params, _, _ = _quantized(tmp_path)
    # convs without a rectifier whose output feeds the sum (or the head's pooling) are quantized as is
    assert {n for n, s in sites.items() if s.linear_output} == {"a2", "b2", "short", "head"}
    assert {n for n, s in sites.items() if s.input_summed} == {"a1"}  # the identity skip reads a1's input
    assert {"a2", "b2", "short", "head"} <= set(params.outputs)


def test_every_conv_and_sum_runs_in_int8(tmp_path):
    _, _, _, qdq, _ = _quantized(tmp_path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 7 and ops["Conv"] + ops["FusedConv"] == 0
    assert ops["QLinearAdd"] == 2 and ops["Add"] == 0


def test_onnxruntime_reproduces_torch_fake_quant(tmp_path):
    model, _, params, qdq, rng = _quantized(tmp_path)
    x = rng.normal(size=(16, 2, 6, 6)).astype(np.float32)
    ref = fake_quant_model(model, params)(torch.from_numpy(x.copy())).detach().numpy()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        out = ort.InferenceSession(qdq.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
