"""Every weight layer of an exported graph is counted: recurrent layers (LSTM, GRU) are named FP32
with the runtime's reason instead of being left out of the count."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from sqexport.exporters.coverage import weight_layer_coverage


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.proj = nn.Linear(4, 8)
        self.rnn = cell(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.rnn(torch.relu(self.proj(x)))
        return self.head(out[:, -1])


@pytest.mark.parametrize("cell, op", [(nn.LSTM, "LSTM"), (nn.GRU, "GRU"), (nn.RNN, "RNN")])
def test_recurrent_layers_are_named_fp32(tmp_path, cell, op):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    torch.onnx.export(Recurrent(cell).eval(), (torch.rand(1, 5, 4),), str(path), opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    gemms = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    cov = weight_layer_coverage(model, {f"layer{i}": name for i, name in enumerate(gemms)})
    assert (cov["weight_layers"], cov["int8"]) == (len(gemms) + 1, len(gemms))
    assert [f["op"] for f in cov["fp32"]] == [op]
    assert cov["fp32"][0]["reason"].startswith(f"{op}: onnxruntime has no static (QDQ) int8 recurrent kernel")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        a = (q @ k.transpose(1, 2)).softmax(-1) @ v
        e = torch.einsum("bnc,bmc->bnm", a, a).softmax(-1)
        return self.out(torch.einsum("bnm,bmc->bnc", e, a).mean(1))


def test_activation_products_are_each_named_with_the_reason(tmp_path):
    path = tmp_path / "a.onnx"
    torch.onnx.export(Attention().eval(), (torch.rand(1, 5, 8),), str(path), opset_version=17, dynamo=False)
    model = onnx.load(str(path))
    weights = {n.name: n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")
               and any(i.name == n.input[1] for i in model.graph.initializer)}
    cov = weight_layer_coverage(model, weights)
    products = cov["activation_matmuls_fp32"]
    assert cov["activation_matmuls"] == len(products) == 4
    assert sorted(p["op"] for p in products) == ["Einsum", "Einsum", "MatMul", "MatMul"]
    assert all(p["reason"].startswith("activation x activation product (attention): kept FP32") for p in products)
    assert cov["fp32"] == [] and cov["int8"] == cov["weight_layers"] == len(weights)
