"""Factory models rebuilt from torch.export: the batch dimension stays dynamic in the ONNX export (a
ViT's class token read by `expand(batch, -1, -1)`, a positional encoding built with
`torch.zeros(batch, h, w)` as EdgeNeXt does), a rebuilt graph whose trace would freeze the batch is
not used (the model as written is), a region under `torch.autocast(enabled=False)` (EfficientViT)
is inlined so its layers are found and its BatchNorm folds, a module called twice (CoaT) gets a
sibling, and a weight computed from parameters (weight standardization) becomes a layer's weight;
the same from ExportedProgram and TorchScript files."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sqexport.models import graph_module
from sqexport.models.user_model import normalized_factory_model

SHAPES = {"x": (1, 3, 8, 8)}


class TokenNet(nn.Module):
    """Patch embedding, a class token, a positional term made from the batch size, a Linear head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 6, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Conv2d(1, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.patch(x)
        grid = torch.zeros(b, h // 4, w // 4).cumsum(1).unsqueeze(1) + 1.0  # EdgeNeXt-style
        t = (t.flatten(2) + self.pos(grid).reshape(b, 6, -1)).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        return self.head(t[:, 0] + t[:, 1:].mean(1))


def _export(model: nn.Module, path) -> ort.InferenceSession:
    torch.onnx.export(model, (torch.rand(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17, dynamo=False)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_class_token_and_sized_zeros_are_rebuilt_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = TokenNet().eval()
    rebuilt, why = normalized_factory_model(model, SHAPES, {})
    assert why["rebuilt"] is True, why
    assert isinstance(rebuilt.patch, nn.Conv2d) and isinstance(rebuilt.head, nn.Linear)
    session = _export(rebuilt, tmp_path / "rebuilt.onnx")
    for n in (1, 3):  # exported at batch 1, run at 3
        x = torch.rand(n, 3, 8, 8)
        got = session.run(None, {"x": x.numpy()})[0]
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_a_rebuilt_graph_whose_trace_freezes_the_batch_is_not_used(monkeypatch):
    # without the torch.zeros rule the size is an aten call the tracer records as a constant
    monkeypatch.setattr(graph_module, "_SIZED_FACTORIES", set())
    torch.manual_seed(0)
    model = TokenNet().eval()
    kept, why = normalized_factory_model(model, SHAPES, {})
    assert kept is model and why["rebuilt"] is False
    assert why["why"].startswith("the rebuilt graph's trace")


@pytest.mark.parametrize("name", sorted(graph_module._SIZED_FACTORIES))
def test_sized_factories_exist_as_torch_functions(name):
    assert callable(getattr(torch, name)) and hasattr(torch.ops.aten, name)


class AutocastOff(nn.Module):
    """EfficientViT's attention form: a region under `torch.autocast(enabled=False)` (torch.export wraps
    it in a higher-order op with its own subgraph) holding a conv and a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        with torch.autocast(device_type="cpu", enabled=False):
            y = torch.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)))


def test_an_autocast_region_is_inlined_and_its_batchnorm_folds():
    from sqexport.toolchain.folding import fold_batchnorm

    torch.manual_seed(0)
    model = AutocastOff().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    rebuilt, why = normalized_factory_model(model, SHAPES, {})
    assert why["rebuilt"] is True, why
    assert isinstance(rebuilt.conv, nn.Conv2d) and isinstance(rebuilt.bn, nn.BatchNorm2d)
    folded, n = fold_batchnorm(rebuilt)
    assert n == 1
    x = torch.rand(3, 3, 8, 8)
    np.testing.assert_allclose(folded(x).detach().numpy(), model(x).detach().numpy(), rtol=1e-5, atol=1e-5)


class SharedConv(nn.Module):
    """One conv module called at two places (CoaT shares its positional conv between blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.shared(x)
        x = x + self.shared(torch.relu(x))
        return self.head(x.mean((2, 3)))


def test_a_module_called_twice_gets_a_sibling_not_a_child():
    torch.manual_seed(0)
    model = SharedConv().eval()
    rebuilt, why = normalized_factory_model(model, SHAPES, {})
    assert why["rebuilt"] is True, why
    convs = {n: m for n, m in rebuilt.named_modules() if isinstance(m, nn.Conv2d)}
    assert sorted(convs) == ["shared", "shared_conv0", "stem"]
    assert all(not list(m.children()) for m in convs.values())  # a layer replaced later takes nothing with it
    assert convs["shared_conv0"].weight is convs["shared"].weight  # still one set of weights
    x = torch.rand(3, 3, 8, 8)
    np.testing.assert_allclose(rebuilt(x).detach().numpy(), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


class StdConv(nn.Conv2d):
    """Weight standardization in forward (timm's ScaledStdConv2d: NF-ResNet; StdConv2d: BiT)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), 1.5))

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False).add(1e-5).rsqrt()
        return torch.nn.functional.conv2d(x, (w - mean) * std * self.gain, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = StdConv(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)).mean((2, 3)))


def test_a_weight_computed_from_parameters_becomes_the_layers_weight():
    torch.manual_seed(0)
    model = StdNet().eval()
    rebuilt, why = normalized_factory_model(model, SHAPES, {})
    assert why["rebuilt"] is True, why
    assert type(rebuilt.stem) is nn.Conv2d  # under the module's own name, holding the computed weight
    w = model.stem.weight.detach()
    expected = (w - w.mean((1, 2, 3), keepdim=True)) * (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).rsqrt() * 1.5
    np.testing.assert_allclose(rebuilt.stem.weight.detach().numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert not hasattr(rebuilt.stem, "gain")
    x = torch.rand(3, 3, 8, 8)
    np.testing.assert_allclose(rebuilt(x).detach().numpy(), model(x).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["exported-program", "torchscript"])
@pytest.mark.parametrize("net", [TokenNet, SharedConv, StdNet])
def test_the_same_forms_rebuild_from_files(tmp_path, net, kind):
    from sqexport.models.zoo import load_model

    torch.manual_seed(0)
    model = net().eval()
    x = torch.rand(2, 3, 8, 8)
    if kind == "torchscript":
        path = tmp_path / "net.pt"
        torch.jit.save(torch.jit.trace(model, x), str(path))
        spec = load_model(str(path), input_shapes={None: SHAPES["x"]})
    else:
        path = tmp_path / "net.pt2"
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
        spec = load_model(str(path))
    layers = [m for m in spec.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) + (net is SharedConv)
    for n in (1, 3):
        xb = torch.rand(n, 3, 8, 8)
        got = spec.torch_outputs(spec.model, {spec.input_names[0]: xb.numpy()})[0]
        np.testing.assert_allclose(got, model(xb).detach().numpy(), rtol=1e-5, atol=1e-5)


class ReservedNames(nn.Module):
    """Children named like fx.GraphModule's own attributes: a metadata branch `meta`, a GNN-style
    `graph`, a parameter `code`."""

    def __init__(self):
        super().__init__()
        self.graph = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.meta = nn.Linear(2, 4)
        self.code = nn.Parameter(torch.randn(4))

    def forward(self, x, m):
        return self.graph(x).mean((2, 3)) + self.meta(m) * self.code


def test_children_named_like_graph_module_attributes_are_renamed_not_refused():
    torch.manual_seed(0)
    model = ReservedNames().eval()
    model.graph[1].running_var.uniform_(0.5, 2.0)
    rebuilt, why = normalized_factory_model(model, {"x": (1, 3, 8, 8), "m": (1, 2)}, {})
    assert why["rebuilt"] is True, why
    layers = {n: type(m) for n, m in rebuilt.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))}
    assert layers == {"graph_.0": nn.Conv2d, "graph_.1": nn.BatchNorm2d, "meta_": nn.Linear}
    x, m = torch.rand(3, 3, 8, 8), torch.rand(3, 2)
    torch.testing.assert_close(rebuilt(x, m), model(x, m))


def test_torchscript_with_children_named_like_graph_module_attributes_says_what_to_do(tmp_path):
    from sqexport.contracts.errors import ModelLoadError
    from sqexport.models.user_model import load_user_model
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(ReservedNames().eval(), (torch.rand(1, 3, 8, 8), torch.rand(1, 2))), str(path))
    with pytest.raises(ModelLoadError, match=r"named like a GraphModule's own \(code, graph, meta\): rename them"):
        load_user_model(str(path), {"x": (1, 3, 8, 8), "m": (1, 2)})
