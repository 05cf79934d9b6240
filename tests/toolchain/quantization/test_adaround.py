"""AdaRound (Nagel et al. 2020): learned rounding stays within one step of nearest, keeps zeros and
the weight range, lowers the layer output error on the calibration data, and exports unchanged."""
import dataclasses

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.quant import Anchor, quantize_weight_per_channel
from sqexport.exporters.export import export_model
from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.folding import copy_for_compression, fold_batchnorm
from sqexport.toolchain.builtin_methods import config_from_dict, config_to_dict
from sqexport.toolchain.quantization.adaround import AdaRoundConfig, _Geometry, adaround_weights
from sqexport.toolchain.quantization.int8 import Int8StaticConfig
from sqexport.toolchain.quantization.static import calibrate, quantize_weights
from sqexport.toolchain.quantize_step import quantize_to_onnx
from sqexport.toolchain.recipe import Stage

QMAX = 7  # a coarse grid: rounding choices matter, so the comparison with nearest is sharp
# every pixel of the 16 calibration inputs: the error is then compared on exactly the data AdaRound saw
CONFIG = AdaRoundConfig(enabled=True, iterations=200, samples=16, positions=1600, batch=400)
SHORT = AdaRoundConfig(enabled=True, iterations=40, samples=8, positions=256, batch=64)  # plumbing only


class _Net(nn.Module):
    """conv 3x3 -> ReLU -> global mean -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.conv.weight[0, 0] = 0.0  # pruned weights: must stay exactly zero
            self.fc.weight[1, :3] = 0.0

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


def _batches(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, 3, 10, 10)).astype(np.float32)} for _ in range(n)]


def _run(model, batch):
    with torch.no_grad():
        return [model(torch.from_numpy(batch["x"])).numpy()]


ANCHORS = [Anchor("conv", quantize_output=True, quantize_bias=True), Anchor("fc", quantize_bias=True)]


def _params(model, batches):
    ins, outs, _ = calibrate(model, ANCHORS, batches, _run)
    params = quantize_weights(model, ANCHORS, ins, QMAX)
    params.outputs = outs
    return params


def _rounded(model, batches, config=CONFIG):
    return adaround_weights(model, _params(model, batches), batches, _run, QMAX, config)


@pytest.fixture(scope="module")
def net_and_rounded():
    model, batches = _Net().eval(), _batches()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    return model, batches, _rounded(model, batches), before


def test_q_within_one_step_of_nearest_zeros_kept_range_held(net_and_rounded):
    model, batches, rounded, before = net_and_rounded
    for name in ("conv", "fc"):
        w = getattr(model, name).weight.detach().numpy()
        nearest = quantize_weight_per_channel(w, QMAX)
        q = rounded[name].q
        assert q.dtype == np.int8 and q.shape == w.shape
        np.testing.assert_array_equal(rounded[name].scale, nearest.scale)  # the scales are the nearest ones
        assert np.abs(q.astype(int) - nearest.q.astype(int)).max() <= 1
        assert np.abs(q).max() <= QMAX
        assert np.all(q[w == 0] == 0)
    assert np.any(rounded["conv"].q != quantize_weight_per_channel(model.conv.weight.detach().numpy(), QMAX).q)
    for n, p in model.state_dict().items():  # the model is left as it was
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_layer_output_error_not_above_nearest_rounding(net_and_rounded):
    model, batches, rounded, _ = net_and_rounded
    x = torch.from_numpy(np.concatenate([b["x"] for b in batches]))
    nearest = quantize_weight_per_channel(model.conv.weight.detach().numpy(), QMAX)
    rounded = rounded["conv"]
    # the first layer's input is the quantized model input: compare both roundings on it
    p_in = _params(model, batches).inputs["conv"]
    xq = torch.fake_quantize_per_tensor_affine(x, p_in.scale, p_in.zero_point, 0, 255)
    with torch.no_grad():
        ref = torch.relu(model.conv(x))

    @torch.no_grad()
    def err(wq):
        out = nn.functional.conv2d(xq, torch.from_numpy(wq.dequantized()), model.conv.bias, padding=1)
        return float((torch.relu(out) - ref).pow(2).mean())
    assert err(rounded) <= err(nearest)


def test_deterministic_with_the_seed():
    model, batches = _Net().eval(), _batches()
    a, b = _rounded(model, batches, SHORT), _rounded(model, batches, SHORT)
    for name in a:
        np.testing.assert_array_equal(a[name].q, b[name].q)


def test_default_is_one_pass_per_layer():
    """passes 0 (the default) rounds each layer on inputs collected after the ones before it were
    rounded: for this two-layer net, the same integers as two explicit passes; one pass (both
    layers' inputs collected at nearest rounding) fits the second layer to other inputs."""
    model, batches = _Net().eval(), _batches()
    assert AdaRoundConfig().passes == 0
    sequential = _rounded(model, batches, dataclasses.replace(SHORT, passes=0))
    two = _rounded(model, batches, dataclasses.replace(SHORT, passes=2))
    one = _rounded(model, batches, dataclasses.replace(SHORT, passes=1))
    for name in ("conv", "fc"):
        np.testing.assert_array_equal(sequential[name].q, two[name].q)
    np.testing.assert_array_equal(sequential["conv"].q, one["conv"].q)  # the first layer's inputs are the same


@pytest.mark.parametrize("bad, words", [
    ({"iterations": 0}, "adaround.iterations must be an integer >= 1, got 0"),
    ({"samples": -1}, "adaround.samples must be an integer >= 1, got -1"),
    ({"reg_weight": -0.1}, "adaround.reg_weight must be a finite number >= 0, got -0.1"),
    ({"batch": 1.5}, "adaround.batch must be an integer >= 1, got 1.5"),
    ({"enabled": "yes"}, "adaround.enabled must be true or false, got 'yes'"),
    ({"unknown": 1}, r"adaround: unknown key\(s\) unknown"),
    ({"passes": -1}, "adaround.passes must be an integer >= 0, got -1"),
])
def test_bad_config_is_a_config_error(bad, words):
    with pytest.raises(ConfigError, match=words):
        Int8StaticConfig(adaround={"enabled": True, **bad})


def test_recipe_forms_coerce():
    assert Int8StaticConfig(adaround=True).adaround == AdaRoundConfig(enabled=True)
    assert Int8StaticConfig(adaround={"iterations": 10}).adaround.iterations == 10
    with pytest.raises(ConfigError, match="adaround must be true, false or a mapping .*, got 'on'"):
        Int8StaticConfig(adaround="on")


class _Depthwise(nn.Module):
    """conv-BN-ReLU6 -> depthwise 3x3 -> ReLU6 -> 1x1 -> mean: the MobileNetV2 pattern."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_qdq_export_matches_torch_fake_quant(tmp_path):
    model = _Depthwise().eval()
    batches = _batches(3)
    spec = ModelSpec(name="tiny", model=model, task="image-classification", input_names=["x"], output_names=["y"],
                     example_inputs={"x": batches[0]["x"][:1]}, calib_batches=batches, eval_batches=batches,
                     dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    work, _ = fold_batchnorm(copy_for_compression(spec.model))
    prepared = export_model(spec, work, tmp_path / "prepared.onnx")
    config = Int8StaticConfig(fallback=False, bias_correction=True, adaround=SHORT)
    reference, info = quantize_to_onnx(work, spec, Stage("quantize", "int8", config), prepared,
                                       tmp_path / "model.onnx", 1.0)
    assert info["weight_range"]["max_abs_q"] <= weight_grid("cpu").qmax
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in spec.eval_batches:
        np.testing.assert_allclose(sess.run(None, batch)[0], reference(batch)[0], atol=2e-3)


def test_recipe_round_trip():
    config = Int8StaticConfig(adaround={"enabled": True, "iterations": 50, "passes": 2})
    assert config_from_dict(config_to_dict("quantize", "int8", config)) == ("quantize", "int8", config)


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.Conv2d(4, 6, 3, padding="same", dilation=2), nn.Conv1d(4, 6, 3, padding=1)])
def test_patches_at_sampled_positions_reproduce_the_conv(conv):
    torch.manual_seed(0)
    x = torch.randn((3, conv.in_channels, 11, 11)[:conv.weight.dim()])
    with torch.no_grad():
        out = conv(x)
    geometry = _Geometry(conv)
    pos = geometry.positions(out, 20, torch.Generator().manual_seed(0))
    got = geometry.apply(conv.weight.detach().reshape(conv.out_channels, -1), geometry.gather_input(x, pos))
    torch.testing.assert_close(got + conv.bias.detach(), geometry.gather_output(out, pos), rtol=0, atol=1e-5)


def test_on_the_pair_limited_grid_the_learned_integers_keep_the_limit():
    from sqexport.contracts.weight_grid import WeightGrid, pair_violations, reduction_pairs

    grid = WeightGrid(127, pair_limit=128)
    model, batches = _Net().eval(), _batches()
    with torch.no_grad():  # large same-sign neighbours in every input-channel pair of the conv: channels
        # take qmax near 64, where learned up-rounding could cross the limit (enforce_grid moves it back)
        model.conv.weight[:, :2] = model.conv.weight[:, :2].abs() + 0.5
    ins, outs, _ = calibrate(model, ANCHORS, batches, _run)
    params = quantize_weights(model, ANCHORS, ins, grid)
    params.outputs = outs
    rounded = adaround_weights(model, params, batches, _run, grid, SHORT)
    for name in ("conv", "fc"):
        q, w = rounded[name].q, getattr(model, name).weight.detach().numpy()
        assert not pair_violations(reduction_pairs(q)).any()
        assert np.all(q[w == 0] == 0)
        np.testing.assert_array_equal(rounded[name].scale, params.weights[name].scale)
