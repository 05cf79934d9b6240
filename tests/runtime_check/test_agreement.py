import numpy as np
import pytest

from sqexport.runtime_check.agreement import per_sample_agreement


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
    with pytest.raises(ValueError, match="differ in shape"):
        per_sample_agreement(x, x[:3])


def test_near_zero_row_is_judged_against_the_median_norm():
    ref = np.array([[10.0, 0.0], [10.0, 0.0], [1e-9, 0.0]])
    got = ref + np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.01]])
    # floor = 0.1 * median norm 10 = 1: row 2's error is 0.01 / 1, not 0.01 / 1e-9
    assert per_sample_agreement(ref, got)["max_rel_error"] == pytest.approx(0.01)


def test_arm64_is_judged_per_sample_against_the_closer_x86_computation():
    """Two legitimate x86 computations part on two samples (a rounding boundary); ARM follows the
    exact arithmetic on one and the kernels on the other: per sample it matches, while either
    reference alone would be 3% off somewhere."""
    from sqexport.runtime_check.arm64_check import _closer_per_sample

    rng = np.random.default_rng(0)
    exact = rng.normal(size=(4, 16))
    exact /= np.linalg.norm(exact, axis=1, keepdims=True)
    kernels = exact.copy()
    kernels[1] += 0.03 * rng.normal(size=16) / 4.0
    kernels[2] += 0.03 * rng.normal(size=16) / 4.0
    arm = exact.copy()
    arm[2] = kernels[2]  # sample 2 rounds as x86's kernels do, sample 1 as the exact arithmetic
    assert per_sample_agreement(exact, arm)["max_rel_error"] > 0.02
    assert per_sample_agreement(kernels, arm)["max_rel_error"] > 0.02
    closer = _closer_per_sample(exact, kernels, arm)
    assert closer["max_rel_error"] == 0.0 and closer["mostly"] == "exact QDQ arithmetic"
    assert closer["samples_closer_to"] == {"exact QDQ arithmetic": 3, "x86 int8 kernels": 1}
    wrong = arm * 0.9  # a scaled output is 10% from both
    assert _closer_per_sample(exact, kernels, wrong)["max_rel_error"] == pytest.approx(0.1)
