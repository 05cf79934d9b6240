"""ReLU6 (Clip), depthwise convs and residual adds: the QDQ graph onnxruntime runs matches the torch
fake-quant model, and onnxruntime fuses every conv into QLinearConv and the add into QLinearAdd."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import FloatFunctional

from sqexport.exporters.export import export_model
from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.folding import copy_for_compression, fold_batchnorm
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.equalization import equalize
from sqexport.toolchain.quantize_step import quantize_to_onnx
from sqexport.toolchain.recipe import Stage


class _Block(nn.Module):
    """stem conv-BN-ReLU6 -> [1x1 expand-ReLU6 -> 3x3 depthwise-ReLU6 -> 1x1 project] + skip."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.body = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                                  nn.ReLU6(), nn.Conv2d(16, 8, 1))
        self.skip_add = FloatFunctional()
        self.head = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.stem[1].running_var.uniform_(0.5, 2.0)
            self.stem[1].running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.skip_add.add(h, self.body(h))).mean((2, 3))


def _spec(model):
    rng = np.random.default_rng(0)
    batches = [{"x": (2.0 * rng.standard_normal((8, 3, 12, 12))).astype(np.float32)} for _ in range(3)]
    return ModelSpec(name="tiny", model=model.eval(), task="image-classification", input_names=["x"],
                     output_names=["y"], example_inputs={"x": batches[0]["x"][:1]}, calib_batches=batches,
                     eval_batches=batches, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def _optimized_ops(path):
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("config", [Int8StaticConfig(fallback=False),
                                    Int8StaticConfig(fallback=False, bias_correction=True, observer="mse")])
def test_onnxruntime_matches_torch_fake_quant_and_fuses(tmp_path, config):
    spec = _spec(_Block())
    work, folded = fold_batchnorm(copy_for_compression(spec.model))
    assert folded == 1
    prepared = export_model(spec, work, tmp_path / "prepared.onnx")
    assert sum(n.op_type == "Clip" for n in prepared.graph.node) == 3  # ReLU6 exports as Clip(0, 6)
    reference, info = quantize_to_onnx(work, spec, Stage("quantize", "int8", config), prepared,
                                       tmp_path / "model.onnx", 1.0)
    assert info["quantized_layers"] == 5 and info["weight_range"]["max_abs_q"] <= weight_grid("cpu").qmax
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in spec.eval_batches:
        got = sess.run(None, batch)[0]
        want = reference(batch)[0]
        # one uint8 step of the last activation, spread over the mean: well below 1e-2
        np.testing.assert_allclose(got, want, atol=2e-3)
    ops = _optimized_ops(tmp_path / "model.onnx")
    assert ops.count("QLinearConv") == 5 and "Conv" not in ops and "Clip" not in ops
    assert ops.count("QLinearAdd") == 1


def test_equalized_block_still_fuses_and_matches(tmp_path):
    spec = _spec(_Block())
    work, _ = fold_batchnorm(copy_for_compression(spec.model))
    assert len(equalize(work, relu6="relu")) >= 2
    prepared = export_model(spec, work, tmp_path / "prepared.onnx")
    reference, _ = quantize_to_onnx(work, spec, Stage("quantize", "int8", Int8StaticConfig(fallback=False)),
                                    prepared, tmp_path / "model.onnx", 1.0)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = spec.eval_batches[0]
    np.testing.assert_allclose(sess.run(None, batch)[0], reference(batch)[0], atol=2e-3)
    assert _optimized_ops(tmp_path / "model.onnx").count("QLinearConv") == 5
