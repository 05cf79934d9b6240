"""Layers recognized by what they compute: a model built from the module forms real zoos use
(BatchNorm subclasses with their activation inside, "same"-padding conv wrappers, squeeze-excite,
LayerNorm2d, F.conv2d / F.linear on bare parameters, attention, layer scale) is int8 in every weight
layer, whether it comes as a factory, a TorchScript file or an ExportedProgram, and onnxruntime
computes what the torch fake-quant model does."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

FORMS = Path(__file__).resolve().parent.parent / "models" / "zoo_forms.py"
SHAPE = "1x3x16x16"

pytestmark = pytest.mark.e2e


@pytest.fixture
def forms_project(tmp_path, monkeypatch):
    shutil.copy(FORMS, tmp_path / "zooforms.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.modules.pop("zooforms", None)
    yield tmp_path
    sys.modules.pop("zooforms", None)


def _model():
    sys.path.insert(0, str(FORMS.parent))
    try:
        import zoo_forms
        return zoo_forms.build(), zoo_forms.ZooForms.WEIGHT_LAYERS
    finally:
        sys.path.remove(str(FORMS.parent))


def _save_torchscript(path: Path) -> None:
    """Traced TorchScript records "same" padding computed from H and W as tensor arithmetic, which
    torch's TorchScript converter cannot turn into a program (data-dependent sizes): the trace here
    pads by the amounts the 16x16 input gives, as a traced model of fixed resolution does."""
    model, _ = _model()
    stem = model.stem
    model.stem = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.Conv2d(3, 16, 3, stride=2, bias=False))
    model.stem[1].weight.data.copy_(stem.weight.data)
    torch.jit.save(torch.jit.trace(model, torch.rand(2, 3, 16, 16)), str(path))


def _save_program(path: Path) -> None:
    model, _ = _model()
    batch = torch.export.Dim("batch", min=1)
    ep = torch.export.export(model, (torch.rand(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(path))


def _export(run_cli, ref: str, out: Path, *extra) -> dict:
    r = run_cli([ref, "--input-shape", SHAPE, "--prune", "none", "--max-accuracy-drop", "100", "-o", out, *extra])
    assert r.exit_code == 0, r.output
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("kind", ["factory", "torchscript", "program"])
def test_every_weight_layer_is_int8_in_every_model_kind(kind, forms_project, run_cli):
    _, expected = _model()
    ref = {"factory": "zooforms:build", "torchscript": "forms.pt", "program": "forms.pt2"}[kind]
    if kind == "torchscript":
        _save_torchscript(forms_project / ref)
    elif kind == "program":
        _save_program(forms_project / ref)
    out = forms_project / "out"
    rep = _export(run_cli, ref, out)
    cov = rep["quantization"]["coverage"]
    assert cov["fp32"] == [] and cov["int8"] == cov["weight_layers"] == expected
    assert cov["activation_matmuls"] == 2  # q @ k^T and attn @ v hold no weight
    folded = next(s for s in rep["stages"] if s["name"] == "fold_batchnorm")["params"]["folded"]
    assert folded == 2  # both BatchNormAct2d, their activations kept
    graph = onnx.load(str(out / "model.onnx")).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    onnx.checker.check_model(onnx.load(str(out / "model.onnx")))
    # onnxruntime computes the torch fake-quant model's numbers
    fid = rep["fidelity"]
    assert fid["max_abs_deviation"] <= 0.02 * fid["reference_max_abs"]


def test_factory_capture_is_reported_and_falls_back_when_export_fails(forms_project, run_cli):
    (forms_project / "dyn.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(8, 4)\n"
        "    def forward(self, x):\n"
        "        if x.sum().item() > 1e9:  # data-dependent branch: torch.export cannot capture it\n"
        "            return self.fc(x) * 2\n"
        "        return self.fc(x)\n"
        "def build():\n"
        "    torch.manual_seed(0); return Net().eval()\n")
    r = run_cli(["dyn:build", "--input-shape", "1x8", "--prune", "none", "--max-accuracy-drop", "100",
                 "-o", forms_project / "o", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((forms_project / "o" / "report.json").read_text())
    capture = rep["source"]["graph_capture"]
    assert capture["rebuilt"] is False and "torch.export" in capture["why"]
    assert rep["quantization"]["coverage"]["int8"] == 1  # the model as written still quantizes


def test_shared_and_zero_weights_each_get_their_own_int8_copy(forms_project, run_cli):
    """Zero-initialized layers (a residual branch's last BatchNorm at gamma 0) fold to equal
    weights, which exporters store once behind Identity nodes."""
    (forms_project / "zeros.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.stem = nn.Conv2d(3, 8, 3, padding=1)\n"
        "        self.a = nn.Conv2d(8, 8, 3, padding=1); self.bn_a = nn.BatchNorm2d(8)\n"
        "        self.b = nn.Conv2d(8, 8, 3, padding=1); self.bn_b = nn.BatchNorm2d(8)\n"
        "        self.head = nn.Linear(8, 5)\n"
        "    def forward(self, x):\n"
        "        x = torch.relu(self.stem(x))\n"
        "        x = x + self.bn_a(self.a(x))\n"
        "        x = x + self.bn_b(self.b(x))\n"
        "        return self.head(x.mean((2, 3)))\n"
        "def build():\n"
        "    torch.manual_seed(0); m = Net()\n"
        "    nn.init.zeros_(m.bn_a.weight); nn.init.zeros_(m.bn_b.weight)\n"
        "    return m.eval()\n")
    rep = _export(run_cli, "zeros:build", forms_project / "o", "--quiet")
    cov = rep["quantization"]["coverage"]
    assert cov["fp32"] == [] and cov["int8"] == 4


def test_coverage_names_the_ops_dynamic_int8_leaves_out(tmp_path, run_cli):
    r = run_cli(["digits-cnn", "--quant", "int8-dynamic", "--prune", "none", "--quiet", "-o", tmp_path / "o"])
    assert r.exit_code == 0, r.output
    cov = json.loads((tmp_path / "o" / "report.json").read_text())["quantization"]["coverage"]
    assert cov["weight_layers"] == 4 and cov["int8"] == 1  # the classifier's Gemm
    assert [f["op"] for f in cov["fp32"]] == ["Conv"] * 3
    assert all("int8-dynamic" in f["reason"] for f in cov["fp32"])


def test_auto_candidates_quantize_the_same_points_as_a_plain_run(forms_project, run_cli):
    """`--auto` writes its int8 candidates from its own plan: it must see the model's activation
    modules (SiLU, squeeze-excite gates) as the plain run does, or its models lose their int8 points."""
    from sqexport.contracts.shapes import parse_input_shapes
    from sqexport.models.data import apply_user_data
    from sqexport.models.zoo import load_model
    from sqexport.toolchain.overrides import Overrides, apply_overrides
    from sqexport.toolchain.search import AutoConfig, run_auto

    def by_size(baseline, model):  # deterministic stand-in for timing
        base, m = baseline.stat().st_size, model.stat().st_size
        return {"threads": 1, "baseline": {"p50": base}, "model": {"p50": m}, "speedup": base / m}

    def ops(path):
        return sorted(n.op_type for n in onnx.load(str(path)).graph.node)

    plain = forms_project / "plain"
    _export(run_cli, "zooforms:build", plain)
    spec = apply_user_data(load_model("zooforms:build", input_shapes=parse_input_shapes([SHAPE])), None, None)
    recipe = apply_overrides(None, Overrides(seed=0, target="cpu", max_accuracy_drop=100.0))
    auto = forms_project / "auto"
    rep = run_auto(recipe, spec, auto, config=AutoConfig(minutes=10, levels=(0.0,), recover=False), latency=by_size)
    assert rep["auto"]["chosen"] == "s0-int8"
    assert ops(auto / "model.onnx") == ops(plain / "model.onnx")


MORE_FORMS = '''
import torch
from torch import nn
import torch.nn.functional as F

class StdConv(nn.Conv2d):  # weight standardization in forward (NF-ResNet, BiT)
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) * w.var((1, 2, 3), keepdim=True, unbiased=False).add(1e-5).rsqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StdConv(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # called twice (CoaT)
        self.patch = nn.Conv2d(8, 8, 4, stride=4)
        self.pos = nn.Conv2d(1, 8, 1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        b = x.shape[0]
        x = torch.relu(self.stem(x))
        with torch.autocast(device_type="cpu", enabled=False):  # EfficientViT's attention
            x = torch.relu(self.bn(self.conv(x)))
        x = x + self.shared(x)
        x = x + self.shared(torch.relu(x))
        grid = torch.zeros(b, 2, 2).cumsum(1).unsqueeze(1) + 1.0  # EdgeNeXt's positional encoding
        t = (self.patch(x).flatten(2) + self.pos(grid).reshape(b, 8, -1)).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)  # a ViT's class token
        return self.head(t[:, 0] + t[:, 1:].mean(1))

def build():
    torch.manual_seed(0)
    m = Net()
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()
'''


def _run_source(project: Path, run_cli, source: str, module: str, shape: str, *flags: str) -> Path:
    """`sqexport module:build` on a module written from `source`, a loose gate; returns the output folder."""
    (project / f"{module}.py").write_text(source)
    out = project / "o"
    r = run_cli([f"{module}:build", "--input-shape", shape, *flags, "--max-accuracy-drop", "100", "-o", out, "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_more_zoo_forms_are_int8_and_keep_a_dynamic_batch(forms_project, run_cli):
    """Forms met in a sweep of timm models: each once made a run crash or left layers FP32."""
    out = _run_source(forms_project, run_cli, MORE_FORMS, "moreforms", "1x3x8x8", "--prune", "none")
    rep = json.loads((out / "report.json").read_text())
    assert rep["source"]["graph_capture"]["rebuilt"] is True
    cov = rep["quantization"]["coverage"]
    # stem, conv, shared (twice), patch, pos, head
    assert cov["fp32"] == [] and cov["int8"] == cov["weight_layers"] == 7
    assert next(s for s in rep["stages"] if s["name"] == "fold_batchnorm")["params"]["folded"] == 1
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for n in (1, 5):  # exported at batch 1
        assert session.run(None, {name: np.random.default_rng(n).random((n, 3, 8, 8), np.float32)})[0].shape == (n, 5)


VOLUME_FORMS = '''
import torch
from torch import nn

class Net(nn.Module):  # a video / volume model with an upsampling decoder head
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv3d(8, 8, 3, stride=2, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.c2(self.c1(x)).mean(2)  # (b, 8, h/2, w/2)
        return self.head(torch.relu(self.up(y)).mean((2, 3)))

def build():
    torch.manual_seed(0)
    m = Net()
    for bn in (m.c1[1], m.c2[1]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m.eval()
'''


def test_3d_convs_are_int8_and_a_transposed_conv_is_named(forms_project, run_cli):
    """Conv3d + BatchNorm3d (video, volumes) rebuild, fold and quantize like 2-D ones; onnxruntime's
    CPU has no int8 ConvTranspose, so it stays FP32 with that reason."""
    out = _run_source(forms_project, run_cli, VOLUME_FORMS, "volforms", "1x3x4x8x8", "--prune", "none")
    rep = json.loads((out / "report.json").read_text())
    assert next(s for s in rep["stages"] if s["name"] == "fold_batchnorm")["params"]["folded"] == 2
    assert rep["quantization"]["quantized_layers"] == 3  # c1, c2, head: the 5-D weights found
    cov = rep["quantization"]["coverage"]
    transposed = [f for f in cov["fp32"] if f["op"] == "ConvTranspose"]
    assert len(transposed) == 1 and "no int8 transposed convolution" in transposed[0]["reason"]
    for_speed = [f for f in cov["fp32"] if f["op"] != "ConvTranspose"]  # the speed check may keep c1 (3 channels)
    assert all(f["reason"].startswith("kept FP32 for speed") for f in for_speed)
    assert cov["weight_layers"] == 4 and cov["int8"] == 3 - len(for_speed)
    model = onnx.load(str(out / "model.onnx"))
    five_d = {i.name for i in model.graph.initializer if len(i.dims) == 5 and i.data_type == onnx.TensorProto.INT8}
    assert len(five_d) == 2 - sum(f["op"] == "Conv" for f in for_speed)  # 3-D conv weights stored int8
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).random((5, 3, 4, 8, 8), np.float32)
    baseline = onnxruntime.InferenceSession(str(out / "baseline.onnx"), providers=["CPUExecutionProvider"])
    got, ref = session.run(None, {name: x})[0], baseline.run(None, {name: x})[0]
    assert got.shape == (5, 3)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.99


def test_structured_pruning_removes_channels_of_3d_convs(forms_project, run_cli):
    out = _run_source(forms_project, run_cli, VOLUME_FORMS, "volforms", "1x3x4x8x8", "--prune", "structured",
                      "--sparsity", "0.5")
    model = onnx.load(str(out / "model.onnx"))
    channels = [i.dims[0] for i in model.graph.initializer if len(i.dims) == 5]
    assert len(channels) == 2 and min(channels) < 8  # output channels of a 3-D conv removed (8 before)
