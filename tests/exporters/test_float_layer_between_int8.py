"""A layer kept in FP32 between int8 layers runs in FP32 in onnxruntime too.

onnxruntime's WeightBiasQuantization would otherwise quantize its float weight per tensor (a Conv
or Gemm whose input is a per-tensor DequantizeLinear and whose output reaches a QuantizeLinear);
with the very different channel scales of a depthwise or BN-folded weight that is far from both
FP32 and our per-channel int8."""
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
from sqexport.toolchain.quantization.fallback import without
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.stages import QuantContext


class DepthwiseNet(nn.Module):
    """conv -> ReLU6 -> depthwise conv (channel scales 1e-3 .. 10) -> ReLU6 -> 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 4, 1)
        self.act = nn.ReLU6()
        with torch.no_grad():
            self.dw.weight.mul_(torch.logspace(-3, 1, 8).view(8, 1, 1, 1))

    def forward(self, x):
        return self.pw(self.act(self.dw(self.act(self.stem(x)))))


def _run(path, x, level):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.optimized_model_filepath = str(path.with_suffix(f".opt{int(level)}.onnx"))
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_fp32_depthwise_conv_is_not_requantized_by_onnxruntime(tmp_path):
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    rng = np.random.default_rng(0)
    example = {"x": rng.normal(size=(1, 3, 8, 8)).astype(np.float32)}
    fp32 = export_torch(model, example, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}, tmp_path / "m.onnx")
    sites = find_sites(fp32, {n: m.weight.detach().numpy() for n, m in prunable_layers(model).items()})
    anchors = [Anchor(n, s.rectified_output is not None, s.bias is not None, output_range=s.output_range)
               for n, s in sites.items()]
    calib = [{"x": rng.normal(size=(8, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    ctx = QuantContext(anchors=anchors, calib_batches=calib, run=lambda m, b: m(torch.from_numpy(b["x"])))
    params = without(lookup("quantize", "int8").handler(model, Int8StaticConfig(), ctx), {"dw"})  # as the fallback
    path = tmp_path / "q.onnx"
    onnx.save(insert_qdq(fp32, sites, params), str(path))
    x = rng.normal(size=(16, 3, 8, 8)).astype(np.float32)
    exact = _run(path, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # the graph's own arithmetic
    fused = _run(path, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    with torch.no_grad():
        reference = fake_quant_model(model, params)(torch.from_numpy(x)).numpy()
    scale = np.abs(reference).max()
    assert np.abs(exact - reference).max() <= 1e-4 * scale
    assert np.abs(fused - reference).max() <= 0.02 * scale  # one requantization step, not a per-tensor weight
    optimized = onnx.load(str(path.with_suffix(f".opt{int(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)}.onnx")))
    assert [n.op_type for n in optimized.graph.node].count("QLinearConv") == 1  # the stem
    assert not any("_weight_q" in o for n in optimized.graph.node for o in n.output)  # no weight requantized
