import numpy as np
import pytest

from runtime_check.agreement import per_sample_agreement


def test_relative_error_and_cosine_by_hand():
    ref = np.array([[3.0, 4.0], [1.0, 0.0]])
    got = np.array([[3.0, 4.5], [0.0, 1.0]])
    a = per_sample_agreement(ref, got)
    # row 0: |(0, .5)| / 5 = 0.1; cos = (9 + 18) / (5 * sqrt(9 + 20.25)); row 1: sqrt(2) / 1, cos 0
    assert a["max_rel_error"] == pytest.approx(np.sqrt(2))
    assert a["mean_rel_error"] == pytest.approx((0.1 + np.sqrt(2)) / 2)
    assert a["min_cosine"] == pytest.approx(0.0)
    assert a["mean_cosine"] == pytest.approx(27 / (5 * np.sqrt(29.25)) / 2)
    assert a["argmax_agreement"] == pytest.approx(0.5)


def test_identical_outputs_agree_exactly_and_shapes_must_match():
    x = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    a = per_sample_agreement(x, x.copy())
    assert a["max_rel_error"] == 0.0 and a["min_cosine"] == pytest.approx(1.0) and "argmax_agreement" not in a
    with pytest.raises(ValueError):
        per_sample_agreement(x, x[:3])


def test_near_zero_row_is_judged_against_the_median_norm():
    ref = np.array([[10.0, 0.0], [10.0, 0.0], [1e-9, 0.0]])
    got = ref + np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.01]])
    # floor = 0.1 * median norm 10 = 1: row 2's error is 0.01 / 1, not 0.01 / 1e-9
    assert per_sample_agreement(ref, got)["max_rel_error"] == pytest.approx(0.01)
