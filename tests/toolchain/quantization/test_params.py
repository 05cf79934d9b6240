"""Quantization arithmetic against hand-computed numbers."""
import numpy as np
import pytest
import torch

from sqexport.contracts.quant import ActQuant, WeightQuant, act_params_from_range, quantize_bias, quantize_weight_per_channel
from sqexport.toolchain.quantization.params import fake_quant_act

F32 = np.float32


def test_per_channel_scale_is_absmax_over_127_and_q_values():
    w = np.array([[0.5, -1.27, 0.0],
                  [2.54, 1.0, -0.02],
                  [0.0, 0.0, 0.0]], dtype=F32)
    wq = quantize_weight_per_channel(w)
    assert wq.scale.dtype == np.float32 and wq.scale.shape == (3,)
    np.testing.assert_allclose(wq.scale, [1.27 / 127, 2.54 / 127, 1.0], rtol=1e-6)  # all-zero row: scale 1
    assert wq.q.dtype == np.int8
    assert wq.q.tolist() == [[50, -127, 0], [127, 50, -1], [0, 0, 0]]
    np.testing.assert_allclose(wq.dequantized(), [[0.5, -1.27, 0.0], [2.54, 1.0, -0.02], [0, 0, 0]], atol=1e-6)


def test_conv_weight_scale_spans_all_but_the_output_axis():
    w = np.zeros((2, 1, 2, 2), F32)
    w[0] = [[[0.254, -0.127], [0.0, 0.001]]]
    w[1] = [[[-6.35, 0.05], [3.175, 0.0]]]
    wq = quantize_weight_per_channel(w)
    np.testing.assert_allclose(wq.scale, [0.002, 0.05], rtol=1e-6)
    assert wq.q[0].ravel().tolist() == [127, -64, 0, 0]  # -0.127/0.002 = -63.5 -> -64 (half to even); 0.5 -> 0
    assert wq.q[1].ravel().tolist() == [-127, 1, 64, 0]  # 3.175/0.05 = 63.5 -> 64
    assert wq.dequantized().shape == w.shape


def test_zeros_stay_exactly_zero_and_symmetry():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8, 3, 3)).astype(F32)
    w[rng.random(w.shape) < 0.5] = 0.0
    wq = quantize_weight_per_channel(w)
    assert (wq.q[w == 0] == 0).all()
    assert (wq.dequantized()[w == 0] == 0.0).all()
    assert np.abs(wq.q).max() == 127 and wq.q.min() >= -127
    assert (np.abs(wq.q).reshape(16, -1).max(1) == 127).all()  # every channel uses the full range
    neg = quantize_weight_per_channel(-w)
    np.testing.assert_array_equal(neg.q, -wq.q)
    np.testing.assert_array_equal(neg.scale, wq.scale)


def test_weight_error_is_at_most_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 10)).astype(F32)
    wq = quantize_weight_per_channel(w)
    err = np.abs(wq.dequantized() - w)
    assert (err <= wq.scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rmin, rmax, scale, zero_point", [
    (-1.0, 3.0, 4.0 / 255, 64),  # -rmin/scale = 63.75 -> 64
    (0.5, 2.0, 2.0 / 255, 0),  # widened to [0, 2]
    (-2.0, -1.0, 2.0 / 255, 255),  # widened to [-2, 0]
    (0.0, 5.1, 0.02, 0),
    (-0.51, 0.0, 0.002, 255),
    (-1.0, 1.55, 0.01, 100),
])
def test_act_params_from_range(rmin, rmax, scale, zero_point):
    p = act_params_from_range(rmin, rmax)
    assert isinstance(p, ActQuant)
    assert p.scale == float(np.float32(scale))  # stored as the float32 ONNX will hold
    assert p.zero_point == zero_point
    assert 0 <= p.zero_point <= 255


def test_act_params_degenerate_range():
    assert act_params_from_range(0.0, 0.0) == ActQuant(1.0, 0)


def test_act_params_cover_the_range_and_zero_is_exact():
    p = act_params_from_range(-1.0, 3.0)
    x = torch.tensor([0.0, -1.0, 3.0])
    y = fake_quant_act(x, p)
    assert y[0].item() == 0.0
    assert abs(y[1].item() + 1.0) <= p.scale / 2 + 1e-7
    assert abs(y[2].item() - 3.0) <= p.scale / 2 + 1e-7


def test_bias_quantization_int32():
    q, scale = quantize_bias(np.array([0.1, -0.2, 0.0], F32), 0.5, np.array([0.01, 0.02, 0.04], F32))
    assert q.dtype == np.int32 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, [0.005, 0.01, 0.02], rtol=1e-6)
    assert q.tolist() == [20, -20, 0]


def test_bias_quantization_saturates_without_wrapping():
    """A bias far outside the int32 grid (tiny weight scale after pruning) saturates, keeping its sign."""
    q, _ = quantize_bias(np.array([1e10, -1e10], F32), 1e-3, np.array([1e-3, 1e-3], F32))
    assert q.tolist() == [2**31 - 1, -(2**31)]


def test_fake_quant_act_rounds_and_saturates_like_quantize_linear():
    p = ActQuant(scale=0.1, zero_point=10)
    x = torch.tensor([0.26, -2.0, 30.0, 0.0, -1.0])
    # 0.26 -> 3 + 10 = 13 -> 0.3 ; -2 -> -20 + 10 -> clip 0 -> -1.0 ; 30 -> clip 255 -> 24.5 ; -1 -> 0 -> -1.0
    np.testing.assert_allclose(fake_quant_act(x, p).numpy(), [0.3, -1.0, 24.5, 0.0, -1.0], atol=1e-6)


def test_weight_quant_dequantized_layout():
    wq = WeightQuant(q=np.array([[1, -2], [3, 0]], np.int8), scale=np.array([0.5, 2.0], F32))
    np.testing.assert_array_equal(wq.dequantized(), [[0.5, -1.0], [6.0, 0.0]])


def test_energy_matches_a_float64_sum():
    from sqexport.toolchain.quantization.params import energy
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 7, 300)).astype(F32)) * 1000
    exact = float((x.double() ** 2).sum())
    assert energy(x) == pytest.approx(exact, rel=1e-6)  # float32 row norms: ~1e-7 relative
    assert energy(torch.tensor([3.0, 4.0])) == 25.0 and energy(torch.tensor(2.0)) == 4.0
    assert energy(torch.zeros(0, 5)) == 0.0
