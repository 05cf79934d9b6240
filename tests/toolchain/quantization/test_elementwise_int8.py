"""SiLU, hard swish, squeeze-excitation and pooling run as int8 kernels in onnxruntime: an
EfficientNet-style block (BN + SiLU convs, a squeeze-excite with a mean, SiLU and a sigmoid gate, a
residual sum, a pooled head) and its MobileNetV3 form (hard swish, ReLU and a hard-sigmoid gate)
leave no float activation, Mul, Add or pooling op once onnxruntime has fused the QDQ graph, and
onnxruntime still computes what the torch fake-quant model does."""
from __future__ import annotations

import collections
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sqexport.exporters.elementwise import pool_qdq_targets, pools_from_means

pytestmark = pytest.mark.e2e

NET = '''
import torch
from torch import nn


class SE(nn.Module):
    def __init__(self, c, r, act, gate):
        super().__init__()
        self.conv_reduce, self.act, self.conv_expand = nn.Conv2d(c, r, 1), act(inplace=True), nn.Conv2d(r, c, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class Net(nn.Module):
    def __init__(self, act=nn.SiLU, se_act=nn.SiLU, gate=nn.Sigmoid):
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), act(inplace=True)
        self.dw, self.bn1, self.act1 = nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), act()
        self.se = SE(16, 4, se_act, gate)
        self.pwl, self.bn2 = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.head, self.act2 = nn.Conv2d(16, 32, 1), act()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        x = x + self.bn2(self.pwl(self.se(self.act1(self.bn1(self.dw(x))))))
        return self.fc(self.pool(self.act2(self.head(x))).flatten(1))


def build():
    torch.manual_seed(0)
    return Net().eval()


class Ghost(nn.Module):
    """GhostNet's form: a conv and a cheap depthwise conv of its output, concatenated, added in place
    to the block's input."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16)
        self.primary, self.bn1 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.cheap, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8)
        self.head, self.fc = nn.Conv2d(16, 32, 1), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x1 = torch.relu(self.bn1(self.primary(x)))
        out = torch.cat([x1, torch.relu(self.bn2(self.cheap(x1)))], 1)
        out += x
        return self.fc(torch.relu(self.head(out)).mean((2, 3)))


def build_ghost():
    torch.manual_seed(0)
    return Ghost().eval()


class RepBlock(nn.Module):
    """RepVGG's training form: 3x3 and 1x1 conv branches summed, plus a BatchNorm identity branch
    (no conv to fold into: it stays a float op), then ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.a, self.bn_a = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.b, self.bn_b = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.bn_id, self.head = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.bn_a(self.a(x)) + self.bn_b(self.b(x)) + self.bn_id(x))).mean((2, 3))


def build_rep():
    torch.manual_seed(0)
    m = RepBlock()
    with torch.no_grad():
        m.bn_id.weight.uniform_(0.5, 1.5)
    return m.eval()


def build_hard():
    torch.manual_seed(0)
    return Net(nn.Hardswish, nn.ReLU, nn.Hardsigmoid).eval()
'''


def _export(tmp_path_factory, factory: str):
    from click.testing import CliRunner

    from sqexport.toolchain.cli import cli

    root = tmp_path_factory.mktemp("se")
    (root / "senet.py").write_text(NET)
    sys.path.insert(0, str(root))
    try:
        r = CliRunner().invoke(cli, [f"senet:{factory}", "--input-shape", "1x3x16x16", "--prune", "none",
                                     "--max-accuracy-drop", "100", "--quiet", "-o", str(root / "out")])
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("senet", None)
    assert r.exit_code == 0, r.output
    return root / "out"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return _export(tmp_path_factory, "build")


@pytest.fixture(scope="module")
def exported_hard(tmp_path_factory):
    return _export(tmp_path_factory, "build_hard")


@pytest.fixture(scope="module")
def exported_ghost(tmp_path_factory):
    return _export(tmp_path_factory, "build_ghost")


def _optimized_ops(path, tmp_path) -> collections.Counter:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)


def test_silu_gate_and_pools_become_int8_kernels(exported, tmp_path):
    ops = _optimized_ops(exported / "model.onnx", tmp_path)
    assert not {"Sigmoid", "Mul", "ReduceMean", "GlobalAveragePool", "DequantizeLinear"} & set(ops), ops
    assert ops["QLinearSigmoid"] == 5  # four SiLUs and the gate
    assert ops["QLinearMul"] == 5  # four SiLUs and the gating multiply
    assert ops["QLinearGlobalAveragePool"] == 2  # the squeeze (a ReduceMean in torch) and the head's pool
    assert ops["QLinearConv"] == 6 and ops["QLinearAdd"] == 1


def test_hard_swish_and_hard_gate_become_int8_kernels(exported_hard, tmp_path):
    """relu6(x + 3) quantized on [0, 6] and read back with scale 1/255 is hard sigmoid:
    QLinearAdd, and QLinearMul for hard swish; the squeeze's ReLU folds into its QLinearConv."""
    ops = _optimized_ops(exported_hard / "model.onnx", tmp_path)
    assert not {"HardSigmoid", "HardSwish", "Mul", "Add", "Relu", "GlobalAveragePool", "DequantizeLinear"} & set(ops), ops
    assert ops["QLinearAdd"] == 5  # three hard swishes, the gate and the residual sum
    assert ops["QLinearMul"] == 4  # three hard swishes and the gating multiply
    assert ops["QLinearGlobalAveragePool"] == 2


def test_concat_and_sum_of_int8_tensors_stay_int8(exported_ghost, tmp_path):
    """A factory model's torch.cat and `+=` become modules when it is rebuilt (models.graph_module),
    so their outputs can take Q/DQ: QLinearConcat and QLinearAdd, no float op between the convs."""
    ops = _optimized_ops(exported_ghost / "model.onnx", tmp_path)
    assert not {"Concat", "Add", "Relu"} & set(ops), ops  # (the head's mean without keepdim stays float)
    assert ops["QLinearConcat"] == 1 and ops["QLinearAdd"] == 1 and ops["QLinearConv"] == 4


def test_a_sum_read_by_a_float_op_keeps_no_quantization_point(tmp_path_factory):
    """The two conv branches' sum feeds a sum with a float BatchNorm branch: a Q/DQ pair there
    would cost error and buy no int8 kernel."""
    graph = onnx.load(str(_export(tmp_path_factory, "build_rep") / "model.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    assert not [q for q in graph.node if q.op_type == "QuantizeLinear"
                and getattr(producers.get(q.input[0]), "op_type", "") == "Add"]


@pytest.mark.parametrize("which", ["exported", "exported_hard", "exported_ghost"])
def test_onnxruntime_matches_the_torch_fake_quant_model(which, request):
    fid = json.loads((request.getfixturevalue(which) / "report.json").read_text())["fidelity"]
    assert fid["max_abs_deviation"] <= 0.02 * fid["reference_max_abs"], fid


def test_sigmoid_outputs_take_their_whole_range(exported):
    """A sigmoid's output cannot leave [0, 1] whatever the input: its Q/DQ covers exactly that,
    so inputs beyond the calibration data never clip there."""
    graph = onnx.load(str(exported / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    scales = [(float(inits[q.input[1]]), int(inits[q.input[2]])) for q in graph.node
              if q.op_type == "QuantizeLinear" and getattr(producers.get(q.input[0]), "op_type", "") == "Sigmoid"]
    assert len(scales) == 5
    assert set(scales) == {(float(np.float32(1 / 255)), 0)}


def _mean_graph(axes, keepdims: int) -> onnx.ModelProto:
    node = helper.make_node("ReduceMean", ["x"], ["y"], axes=axes, keepdims=keepdims)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("axes,keepdims,rewritten", [([2, 3], 1, True), ([-1, -2], 1, True), ([2, 3], 0, False),
                                                     ([1], 1, False)])
def test_spatial_means_become_global_pools(axes, keepdims, rewritten):
    model = _mean_graph(axes, keepdims)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert pools_from_means(model) == int(rewritten)
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool" if rewritten else "ReduceMean"]
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_a_pool_takes_the_qdq_of_the_tensor_it_reaches_through_shape_ops():
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("GlobalAveragePool", ["d"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("GlobalAveragePool", ["x"], ["p2"]),  # float input: nothing to fuse
             helper.make_node("Flatten", ["p2"], ["f2"])]
    assert pool_qdq_targets(nodes, set(), {"f", "f2"}) == {"p": "f"}
    assert pool_qdq_targets(nodes, set(), set()) == {}
