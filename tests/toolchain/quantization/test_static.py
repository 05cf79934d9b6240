"""Calibration in torch, per-channel weights, int32 biases and the fake-quant reference model."""
import numpy as np
import pytest
import torch
from torch import nn

from sqexport.contracts.quant import Anchor, act_params_from_range
from sqexport.toolchain.quantization import calibrate, fake_quant_model, quantize_weights
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.params import fake_quant_act
from sqexport.contracts.errors import ConfigError


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.relu(self.fc(x))


def _run(model, batch):
    return model(torch.from_numpy(batch["x"]))


BATCHES = [{"x": np.array([[-1.0, 0.0]], np.float32)}, {"x": np.array([[3.0, 1.0]], np.float32)}]


def test_minmax_calibration_of_inputs_and_rectified_outputs():
    ins, outs, _ = calibrate(_Tiny(), [Anchor("fc", True, True)], BATCHES, _run, "minmax")
    assert ins["fc"] == act_params_from_range(-1.0, 3.0)  # inputs seen: -1 .. 3
    assert ins["fc"].zero_point == 64
    assert outs["fc"] == act_params_from_range(0.0, 4.0)  # relu(fc(x)) seen: 0 and 4
    assert outs["fc"].zero_point == 0


def test_calibration_removes_its_hooks():
    model = _Tiny()
    calibrate(model, [Anchor("fc", True, True)], BATCHES, _run, "minmax")
    assert not model.fc._forward_pre_hooks and not model.fc._forward_hooks


def test_quantize_weights_and_bias():
    model = _Tiny()
    with torch.no_grad():
        model.fc.bias.fill_(0.5)
    ins, _, _ = calibrate(model, [Anchor("fc", True, True)], BATCHES, _run, "minmax")
    params = quantize_weights(model, [Anchor("fc", True, True)], ins)
    wq = params.weights["fc"]
    assert wq.q.tolist() == [[127, 127]]
    np.testing.assert_allclose(wq.scale, [1.0 / 127], rtol=1e-6)
    q, scale = params.biases["fc"]
    np.testing.assert_allclose(scale, [ins["fc"].scale / 127], rtol=1e-6)
    assert q.dtype == np.int32 and q.tolist() == [round(0.5 / float(scale[0]))]
    # without quantize_bias the bias stays float
    assert "fc" not in quantize_weights(model, [Anchor("fc", True, False)], ins).biases


def test_fake_quant_model_computes_the_quantized_graph_by_hand():
    model = _Tiny()
    anchors = [Anchor("fc", True, True)]
    ins, outs, _ = calibrate(model, anchors, BATCHES, _run, "minmax")
    params = quantize_weights(model, anchors, ins)
    params.outputs = outs
    fq = fake_quant_model(model, params)
    x = torch.tensor([[0.7, 1.3], [-0.3, 0.2], [5.0, 5.0]])
    w = torch.from_numpy(params.weights["fc"].dequantized())
    qb, sb = params.biases["fc"]
    b = torch.from_numpy(qb.astype(np.float32) * sb)
    expected = fake_quant_act(torch.relu(fake_quant_act(x, ins["fc"]) @ w.T + b), outs["fc"])
    torch.testing.assert_close(fq(x), expected)
    # the original model is untouched
    assert model.fc.weight.tolist() == [[1.0, 1.0]] and not model.fc._forward_pre_hooks


def test_int8_config_validation():
    with pytest.raises(ConfigError, match="unknown observer 'bogus'; known: auto, entropy, mean-minmax, minmax, mse, percentile"):
        Int8StaticConfig(observer="bogus")
    for bad in (50.0, 100.5, 10.0):
        with pytest.raises(ConfigError, match=rf"percentile must be in \(50, 100\], got {bad}"):
            Int8StaticConfig(percentile=bad)
