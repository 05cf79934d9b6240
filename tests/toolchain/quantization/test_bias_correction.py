"""Bias correction removes the mean output shift that weight rounding causes."""
import numpy as np
import torch
from torch import nn

from sqexport.toolchain.quantization.bias_correction import bias_corrections
from sqexport.contracts.quant import quantize_weight_per_channel


def _run(model, batch):
    with torch.no_grad():
        return [model(torch.from_numpy(batch["x"])).numpy()]


def test_bias_correction_cancels_the_mean_error_of_a_coarse_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    model = nn.Sequential(conv)
    rng = np.random.default_rng(0)
    # positive-mean inputs (post-ReLU-like): weight rounding then shifts the output mean
    batches = [{"x": rng.uniform(0, 2, (8, 4, 10, 10)).astype(np.float32)} for _ in range(3)]
    wq = quantize_weight_per_channel(conv.weight.detach().numpy(), 7)  # coarse: visible error
    corrected = bias_corrections(model, {"0": wq}, batches, _run)["0"]
    x = torch.from_numpy(np.concatenate([b["x"] for b in batches]))
    w_q = torch.from_numpy(wq.dequantized())
    with torch.no_grad():
        ref = conv(x)
        plain = nn.functional.conv2d(x, w_q, conv.bias, padding=1)
        fixed = nn.functional.conv2d(x, w_q, torch.from_numpy(corrected), padding=1)
    err_plain = (plain - ref).mean(dim=(0, 2, 3)).abs()
    err_fixed = (fixed - ref).mean(dim=(0, 2, 3)).abs()
    assert float(err_plain.max()) > 1e-2
    assert float(err_fixed.max()) < 1e-5  # same data: the correction is exact on average
    np.testing.assert_array_equal(conv.bias.detach().numpy(), model[0].bias.detach().numpy())  # model untouched


def test_linear_layers_use_the_mean_input_vector():
    torch.manual_seed(1)
    fc = nn.Linear(5, 3).eval()
    rng = np.random.default_rng(1)
    batches = [{"x": rng.normal(1.0, 1.0, (16, 5)).astype(np.float32)}]
    wq = quantize_weight_per_channel(fc.weight.detach().numpy(), 3)
    corrected = bias_corrections(nn.Sequential(fc), {"0": wq}, batches, _run)["0"]
    dw = wq.dequantized().astype(np.float64) - fc.weight.detach().numpy()
    want = fc.bias.detach().numpy() - dw @ batches[0]["x"].astype(np.float64).mean(0)
    np.testing.assert_allclose(corrected, want, rtol=1e-5, atol=1e-6)
