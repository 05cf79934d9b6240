"""QDQ writer on tiny torch models: node counts, int8 initializers equal to the torch-side
quantized weights, and onnxruntime output equal to the torch fake-quant model."""
from types import SimpleNamespace

from sqexport.toolchain.stages import QuantContext
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from sqexport.exporters.onnx_export import export_torch
from sqexport.exporters.graph import toposort
from sqexport.exporters.qdq import find_sites, insert_qdq
from sqexport.toolchain.pruning import prunable_layers
from sqexport.toolchain.pruning.magnitude import magnitude_masks
from sqexport.toolchain.pruning.masks import apply_masks
from sqexport.contracts.quant import Anchor
from sqexport.toolchain.quantization import fake_quant_model
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.builtin_methods import lookup

OPT_LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]


class ConvNet(nn.Module):
    """Conv2d(+bias) -> ReLU -> flatten -> Linear: exports Conv, Relu, Flatten, Gemm(transB=1)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))


class SeqNet(nn.Module):
    """Linear on (batch, seq, features): exports MatMul with the weight stored transposed, then Add."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(x)


def _build(model_cls, shape, tmp_path, sparsity=0.5):
    torch.manual_seed(0)
    model = model_cls().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = prunable_layers(model)
    apply_masks(layers, magnitude_masks({n: m.weight for n, m in layers.items()}, sparsity, "layer"))
    rng = np.random.default_rng(0)
    example = {"x": rng.normal(size=shape).astype(np.float32)}
    fp32 = export_torch(model, example, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}, tmp_path / "m.onnx")
    weights = {n: m.weight.detach().numpy() for n, m in layers.items()}
    sites = find_sites(fp32, weights)
    anchors = [Anchor(n, s.rectified_output is not None, s.bias is not None) for n, s in sites.items()]
    calib = [{"x": rng.normal(size=(8,) + shape[1:]).astype(np.float32)} for _ in range(4)]
    ctx = QuantContext(anchors=anchors, calib_batches=calib, run=lambda m, b: m(torch.from_numpy(b["x"])))
    params = lookup("quantize", "int8").handler(model, Int8StaticConfig(observer="minmax"), ctx)
    qdq = insert_qdq(fp32, sites, params)
    onnx.checker.check_model(qdq)
    x = rng.normal(size=(16,) + shape[1:]).astype(np.float32)
    ref = fake_quant_model(model, params)(torch.from_numpy(x)).numpy()
    return SimpleNamespace(model=model, fp32=fp32, sites=sites, params=params, qdq=qdq, x=x, ref=ref)


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    return _build(ConvNet, (1, 2, 5, 5), tmp_path_factory.mktemp("conv"))


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    return _build(SeqNet, (1, 3, 6), tmp_path_factory.mktemp("seq"))


def _ort(model, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_find_sites_conv_and_gemm(conv):
    assert set(conv.sites) == {"conv", "fc"}
    c, f = conv.sites["conv"], conv.sites["fc"]
    assert c.op_type == "Conv" and not c.transposed and c.bias is not None and c.activation == "x"
    assert c.rectified_output is not None  # Conv -> Relu
    assert f.op_type == "Gemm" and not f.transposed and f.bias is not None and f.rectified_output is None


def test_find_sites_matmul_is_transposed(seq):
    s = seq.sites["fc"]
    assert s.op_type == "MatMul" and s.transposed and s.bias is None and s.rectified_output is None


def test_conv_qdq_node_counts(conv, onnx_tools):
    # Q/DQ on: conv input, relu output (rectified), fc input (flatten output) -> 3 Q, 3 DQ;
    # plus DQ for conv weight, conv bias, fc weight, fc bias
    assert onnx_tools.op_count(conv.qdq, "QuantizeLinear") == 3
    assert onnx_tools.op_count(conv.qdq, "DequantizeLinear") == 7
    for op in ("Conv", "Relu", "Flatten", "Gemm"):
        assert onnx_tools.op_count(conv.qdq, op) == 1
    # the FP32 input graph is not modified
    assert onnx_tools.op_count(conv.fp32, "QuantizeLinear") == 0


def test_matmul_qdq_node_counts(seq, onnx_tools):
    assert onnx_tools.op_count(seq.qdq, "QuantizeLinear") == 1
    assert onnx_tools.op_count(seq.qdq, "DequantizeLinear") == 2
    assert onnx_tools.op_count(seq.qdq, "MatMul") == 1 and onnx_tools.op_count(seq.qdq, "Add") == 1


def test_int8_weights_equal_torch_quantized_weights(conv, onnx_tools):
    rows = {r.node.op_type: r for r in onnx_tools.quantized_weights(conv.qdq)}
    for op, module in (("Conv", "conv"), ("Gemm", "fc")):
        r, wq = rows[op], conv.params.weights[module]
        assert r.q.dtype == np.int8 and r.zero_point.dtype == np.int8
        np.testing.assert_array_equal(r.q, wq.q)
        np.testing.assert_array_equal(r.scale, wq.scale)
        assert (r.zero_point == 0).all() and r.axis == 0
        # the pruned zeros are exact zeros in the int8 initializer
        w = dict(conv.model.named_modules())[module].weight.numpy()
        assert (r.q[w == 0] == 0).all() and (r.q == 0).mean() >= 0.5


def test_int8_matmul_weight_is_stored_transposed(seq, onnx_tools):
    (r,) = onnx_tools.quantized_weights(seq.qdq)
    wq = seq.params.weights["fc"]
    assert r.q.shape == (6, 5)  # (in, out)
    np.testing.assert_array_equal(r.q, wq.q.T)
    np.testing.assert_array_equal(r.scale, wq.scale)
    assert r.axis == 1  # per output channel = columns of W^T


def test_bias_is_int32_with_input_times_weight_scale(conv):
    inits = {i.name: numpy_helper.to_array(i) for i in conv.qdq.graph.initializer}
    producers = {o: n for n in conv.qdq.graph.node for o in n.output}
    conv_node = next(n for n in conv.qdq.graph.node if n.op_type == "Conv")
    dq = producers[conv_node.input[2]]
    assert dq.op_type == "DequantizeLinear"
    q, scale = inits[dq.input[0]], inits[dq.input[1]]
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q, conv.params.biases["conv"][0])
    np.testing.assert_allclose(scale, conv.params.inputs["conv"].scale * conv.params.weights["conv"].scale, rtol=1e-6)
    # the float weights and biases are gone from the graph
    assert not any(v.dtype == np.float32 and v.ndim >= 2 for v in inits.values())


def test_activation_qdq_params(conv):
    inits = {i.name: numpy_helper.to_array(i) for i in conv.qdq.graph.initializer}
    qs = [n for n in conv.qdq.graph.node if n.op_type == "QuantizeLinear"]
    by_input = {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]), inits[n.input[2]].dtype) for n in qs}
    p = conv.params.inputs["conv"]
    assert by_input["x"] == (p.scale, p.zero_point, np.uint8)
    p = conv.params.outputs["conv"]
    assert by_input[conv.sites["conv"].rectified_output] == (p.scale, p.zero_point, np.uint8)


@pytest.mark.parametrize("level", OPT_LEVELS, ids=["disable_all", "enable_all"])
def test_onnxruntime_matches_fake_quant_conv(conv, level):
    out = _ort(conv.qdq, level).run(None, {"x": conv.x})[0]
    np.testing.assert_allclose(out, conv.ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("level", OPT_LEVELS, ids=["disable_all", "enable_all"])
def test_onnxruntime_matches_fake_quant_matmul(seq, level):
    out = _ort(seq.qdq, level).run(None, {"x": seq.x})[0]
    assert out.shape == (16, 3, 5)
    np.testing.assert_allclose(out, seq.ref, atol=1e-4, rtol=1e-4)


def test_quantized_model_differs_from_fp32_but_only_by_quantization_error(conv):
    fp32 = conv.model(torch.from_numpy(conv.x)).numpy()
    assert not np.array_equal(fp32, conv.ref)
    assert np.abs(fp32 - conv.ref).max() < 0.1 * np.abs(fp32).max()


def test_toposort_detects_cycles():
    from onnx import helper

    a = helper.make_node("Relu", ["b"], ["a"], name="A")
    b = helper.make_node("Relu", ["a"], ["b"], name="B")
    with pytest.raises(ValueError, match="graph has a cycle"):
        toposort([a, b], None)
    c = helper.make_node("Relu", ["x"], ["c"], name="C")
    d = helper.make_node("Relu", ["c"], ["d"], name="D")
    assert [n.name for n in toposort([d, c], None)] == ["C", "D"]


def test_inplace_rewrite_equals_the_copy(conv):
    """`inplace=True` (the pipeline, done with the FP32 graph) writes the same model as a copy."""
    fp32 = onnx.ModelProto()
    fp32.CopyFrom(conv.fp32)
    out = insert_qdq(fp32, conv.sites, conv.params, inplace=True)
    assert out is fp32
    assert out.SerializeToString() == conv.qdq.SerializeToString()
