"""The pair-limited int8 grid: full 8-bit weights that onnxruntime's AVX2 u8s8 kernels add exactly."""
import numpy as np
import pytest

from sqexport.contracts.quant import quantize_weight_per_channel
from sqexport.contracts.weight_grid import (
    PAIR_SUM_LIMIT, WeightGrid, enforce_grid, from_reduction_pairs, limit_pairs, pair_violations, reduction_pairs,
)

PAIRS = WeightGrid(127, pair_limit=PAIR_SUM_LIMIT)


def test_reduction_order_of_a_linear_is_its_input_features():
    w = np.arange(10).reshape(2, 5)
    p = reduction_pairs(w)
    assert p.shape == (2, 3, 2)
    assert p[0].tolist() == [[0, 1], [2, 3], [4, 0]]  # an odd last feature pairs with padding
    assert np.array_equal(from_reduction_pairs(p, w.shape), w)


def test_reduction_order_of_a_conv_is_kernel_row_column_then_input_channel():
    w = np.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)  # (out, in, kh, kw)
    p = reduction_pairs(w)
    # out 0: (kh0,kw0): c0=0, c1=4, c2=8; (kh0,kw1): c0=1 ...
    assert p[0].ravel().tolist() == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert np.array_equal(from_reduction_pairs(p, w.shape), w)
    depthwise = np.arange(3 * 1 * 3 * 3).reshape(3, 1, 3, 3)
    assert reduction_pairs(depthwise)[1].ravel().tolist() == list(range(9, 18)) + [0]
    assert np.array_equal(from_reduction_pairs(reduction_pairs(depthwise), depthwise.shape), depthwise)


def test_only_same_sign_pairs_above_the_limit_violate():
    q = np.array([[[127, 1], [127, -127], [64, 64], [65, 64], [-100, -29], [0, 127]]])
    assert pair_violations(q)[0].tolist() == [False, False, False, True, True, False]


def test_a_violating_pair_moves_to_the_nearest_pair_on_the_limit():
    u = np.array([[[100.2, 40.6], [-90.4, -60.1], [3.0, 4.0]]])
    q = np.rint(u)
    fixed, moved = limit_pairs(q, u, 127)
    assert moved == 2
    # (100.2 - 40.6 + 128) / 2 = 93.8 -> 94, 128 - 94 = 34: error 6.2^2 + 6.6^2 = 82.0 (93/35 gives 83.2)
    assert fixed[0, 0].tolist() == [94, 34]
    assert fixed[0, 1].tolist() == [-79, -49]  # (90.4 - 60.1 + 128) / 2 = 79.15
    assert fixed[0, 2].tolist() == [3, 4]


def test_pair_limited_weights_never_violate_keep_zeros_and_beat_seven_bits():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0  # pruned
    wq = quantize_weight_per_channel(w, PAIRS)
    assert not pair_violations(reduction_pairs(wq.q)).any()
    assert np.all(wq.q[w == 0] == 0)  # zeros stay exact zeros
    assert wq.limited_pairs > 0 and np.abs(wq.q).max() <= 127
    err = ((wq.dequantized() - w) ** 2).sum()
    seven = ((quantize_weight_per_channel(w, 63).dequantized() - w) ** 2).sum()
    full = ((quantize_weight_per_channel(w, 127).dequantized() - w) ** 2).sum()
    assert full < err < seven


def test_a_channel_without_violations_keeps_the_full_range_scale():
    w = np.zeros((2, 8), np.float32)
    w[0] = [1.0, 0.0, 0.5, -0.5, 0.25, 0.0, -1.0, 0.0]  # no same-sign pair above 128
    w[1] = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # every pair is 127 + 127 at full range
    wq = quantize_weight_per_channel(w, PAIRS)
    assert wq.scale[0] == pytest.approx(1.0 / 127)
    assert wq.q[0].tolist() == [127, 0, 64, -64, 32, 0, -127, 0]
    assert wq.q[1].tolist() == [64] * 8  # qmax 64: exact, and the pairs meet the limit
    assert wq.scale[1] == pytest.approx(1.0 / 64)


def test_enforce_grid_moves_another_rounding_onto_the_limit():
    w = np.array([[1.0, 0.9, -1.0, 0.2]], np.float32)
    scale = np.array([1.0 / 127], np.float32)
    q = np.array([[127, 114, -127, 25]], np.int8)
    fixed, moved = enforce_grid(q, w, scale, PAIRS)
    assert moved == 1 and fixed[0, 2:].tolist() == [-127, 25]
    assert int(fixed[0, 0]) + int(fixed[0, 1]) == PAIR_SUM_LIMIT
    assert enforce_grid(q, w, scale, WeightGrid(127))[0] is q
