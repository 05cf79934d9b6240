"""A factory model rebuilt from torch.export keeps its batch dimension dynamic in the ONNX export:
a ViT's class token (a parameter read by `expand(batch, -1, -1)`) and a positional encoding built
with `torch.zeros(batch, h, w)` (EdgeNeXt) trace with the batch symbolic, and a rebuilt graph whose
trace would freeze the batch is not used (the model as written is)."""
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
