"""Dynamic int8 writer on tiny torch models: DynamicQuantizeLinear + MatMulInteger nodes, int8
weights equal to the torch-side quantized weights (transposed), onnxruntime output equal to the
torch fake-quant model (activations quantized per tensor at run time)."""
from types import SimpleNamespace

from sqexport.contracts.weight_grid import WeightGrid
from sqexport.toolchain.stages import QuantContext
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from sqexport.exporters.dynamic import insert_dynamic
from sqexport.exporters.onnx_export import export_torch
from sqexport.exporters.qdq import find_sites
from sqexport.toolchain.pruning import prunable_layers
from sqexport.contracts.quant import Anchor, QuantParams
from sqexport.toolchain.quantization import fake_quant_model, quantize_weights
from sqexport.toolchain.quantization.int8 import Int8DynamicConfig
from sqexport.toolchain.builtin_methods import lookup

OPT_LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]

QMAX = 127  # full int8: these tests pin the grid (the pair-limited grid has tests of its own)
GRID = WeightGrid(QMAX)


class SeqNet(nn.Module):
    """Two Linears on the same (batch, seq, 8) input, then a bias-free Linear: MatMul (+ Add) x 3."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.k = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        return self.out(torch.relu(self.q(x) + self.k(x)))


class MLP(nn.Module):
    """Linear -> ReLU -> Linear on (batch, 8): Gemm(transB=1) with bias x 2."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _build(model_cls, shape, tmp_path):
    torch.manual_seed(0)
    model = model_cls().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(0)
    example = {"x": rng.normal(size=shape).astype(np.float32)}
    fp32 = export_torch(model, example, ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}}, tmp_path / "m.onnx")
    weights = {n: m.weight.detach().numpy() for n, m in prunable_layers(model).items()}
    sites = find_sites(fp32, weights)
    anchors = [Anchor(n, s.rectified_output is not None, s.bias is not None, s.op_type in ("MatMul", "Gemm"))
               for n, s in sites.items()]
    ctx = QuantContext(anchors=anchors, calib_batches=[], run=None, weight_grid=GRID)  # dynamic: no calibration
    params = lookup("quantize", "int8-dynamic").handler(model, Int8DynamicConfig(), ctx)
    dyn = insert_dynamic(fp32, sites, params)
    onnx.checker.check_model(dyn)
    x = rng.normal(size=(16,) + shape[1:]).astype(np.float32)
    with torch.no_grad():
        ref = fake_quant_model(model, params)(torch.from_numpy(x)).numpy()
        fp = model(torch.from_numpy(x)).numpy()
    return SimpleNamespace(model=model, fp32=fp32, sites=sites, params=params, dyn=dyn, x=x, ref=ref, fp=fp)


@pytest.fixture(scope="module")
def seq(tmp_path_factory):
    return _build(SeqNet, (2, 5, 8), tmp_path_factory.mktemp("dyn-seq"))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return _build(MLP, (2, 8), tmp_path_factory.mktemp("dyn-mlp"))


def _session(model, level, optimized_path=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_handler_params_are_dynamic_weight_only(seq):
    p = seq.params
    assert p.dynamic and set(p.weights) == {"q", "k", "out"}
    assert not p.inputs and not p.outputs and not p.biases and not p.embeddings  # no embedding tables here
    assert all(not a.quantize_bias and not a.quantize_output for a in p.anchors)


def test_handler_skips_anchors_that_are_not_matmul():
    anchors = [Anchor("fc", dynamic_ok=True), Anchor("conv", dynamic_ok=False)]
    model = nn.Module()
    model.fc, model.conv = nn.Linear(3, 2), nn.Conv2d(1, 2, 3)
    params = lookup("quantize", "int8-dynamic").handler(model, Int8DynamicConfig(embeddings=False),
                                                        QuantContext(anchors=anchors, calib_batches=[], run=None, weight_grid=GRID))
    assert [a.module for a in params.anchors] == ["fc"] and set(params.weights) == {"fc"}


@pytest.mark.parametrize("name, n_dql, n_linear", [("seq", 2, 3), ("mlp", 2, 2)])
def test_node_pattern(request, onnx_tools, name, n_dql, n_linear):
    b = request.getfixturevalue(name)
    # one DynamicQuantizeLinear per activation tensor: q and k share theirs
    assert onnx_tools.op_count(b.dyn, "DynamicQuantizeLinear") == n_dql
    assert onnx_tools.op_count(b.dyn, "MatMulInteger") == n_linear
    assert onnx_tools.op_count(b.dyn, "Cast") == n_linear
    for op in ("MatMul", "Gemm", "QuantizeLinear", "DequantizeLinear"):
        assert onnx_tools.op_count(b.dyn, op) == 0
    # the FP32 input graph is not modified
    assert onnx_tools.op_count(b.fp32, "MatMulInteger") == 0
    dql = [n for n in b.dyn.graph.node if n.op_type == "DynamicQuantizeLinear"]
    assert {n.input[0] for n in dql} == {s.activation for s in b.sites.values()}


@pytest.mark.parametrize("name", ["seq", "mlp"])
def test_int8_weights_equal_torch_quantized_weights_transposed(request, name):
    b = request.getfixturevalue(name)
    inits = _inits(b.dyn)
    producers = {o: n for n in b.dyn.graph.node for o in n.output}
    by_weight = {}
    for node in b.dyn.graph.node:
        if node.op_type == "MatMulInteger":
            assert producers[node.input[0]].op_type == "DynamicQuantizeLinear"
            assert producers[node.input[2]].op_type == "DynamicQuantizeLinear"
            by_weight[node.input[1]] = node
    for module, site in b.sites.items():
        wq = b.params.weights[module]
        node = by_weight[f"{module}.weight_quantized"]  # quantized weights are named after the module
        q, zp = inits[node.input[1]], inits[node.input[3]]
        assert q.dtype == np.int8 and q.shape == wq.q.T.shape  # (in, out) for MatMulInteger
        np.testing.assert_array_equal(q, wq.q.T)
        # recomputed from the torch weight: round(w / (max|w_c| / 127)), per output channel
        w = dict(b.model.named_modules())[module].weight
        scale = w.abs().amax(dim=1, keepdim=True) / QMAX
        np.testing.assert_allclose(wq.scale, scale.squeeze(1).numpy(), rtol=1e-6)
        np.testing.assert_array_equal(q, torch.round(w / scale).clamp(-QMAX, QMAX).to(torch.int8).numpy().T)
        assert np.abs(q).max() == QMAX
        assert zp.dtype == np.int8 and zp.shape == (wq.q.shape[0],) and (zp == 0).all()
        np.testing.assert_array_equal(inits[f"{module}.weight_scale"], wq.scale)
        assert site.weight not in inits  # the float weight is gone
    if name == "mlp":  # Gemm biases stay float and are added after the rescale
        for module, site in b.sites.items():
            np.testing.assert_array_equal(inits[site.bias], dict(b.model.named_modules())[module].bias.numpy())


def test_quantize_weights_with_dynamic_flag_builds_the_same_graph(seq):
    anchors = [Anchor(a.module, dynamic_ok=True) for a in seq.params.anchors]
    params = QuantParams(**{**quantize_weights(seq.model, anchors, {}, QMAX).__dict__, "dynamic": True})
    dyn = insert_dynamic(seq.fp32, seq.sites, params)
    assert _inits(dyn).keys() == _inits(seq.dyn).keys()
    for k, v in _inits(dyn).items():
        np.testing.assert_array_equal(v, _inits(seq.dyn)[k])
    with torch.no_grad():
        ref = fake_quant_model(seq.model, params)(torch.from_numpy(seq.x)).numpy()
    np.testing.assert_array_equal(ref, seq.ref)


@pytest.mark.parametrize("level", OPT_LEVELS, ids=["disable_all", "enable_all"])
@pytest.mark.parametrize("name", ["seq", "mlp"])
def test_onnxruntime_matches_fake_quant(request, name, level):
    b = request.getfixturevalue(name)
    out = _session(b.dyn, level).run(None, {"x": b.x})[0]
    assert out.shape == b.ref.shape
    np.testing.assert_allclose(out, b.ref, atol=1e-5, rtol=1e-5)
    # and it really is quantized: close to FP32, but not equal
    assert not np.allclose(out, b.fp, atol=1e-6)
    assert np.abs(out - b.fp).max() < 0.05 * np.abs(b.fp).max()


def test_onnxruntime_fuses_the_pattern(mlp, seq, tmp_path):
    for b, fused in ((mlp, "DynamicQuantizeMatMul"), (seq, "MatMulIntegerToFloat")):
        path = tmp_path / "optimized.onnx"
        _session(b.dyn, ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, path)
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        assert fused in ops and "MatMulInteger" not in ops and "Cast" not in ops, ops


def test_dynamic_axes_survive(seq):
    for batch in (1, 7):
        x = np.random.default_rng(batch).normal(size=(batch, 5, 8)).astype(np.float32)
        out = _session(seq.dyn, OPT_LEVELS[1]).run(None, {"x": x})[0]
        with torch.no_grad():
            ref = fake_quant_model(seq.model, seq.params)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
