"""Activation range observers."""
import numpy as np
import pytest

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.builtin_methods import names
from sqexport.toolchain.quantization.observers import RangeObserver, _quant_error, compute_range

OBSERVERS = names("observer")


def _observer(*chunks):
    obs = RangeObserver()
    for c in chunks:
        obs.update(np.asarray(c, np.float32))
    return obs


def test_minmax_is_exact_over_several_updates():
    obs = _observer([1.0, -2.0, 3.0], [[0.5], [7.0]], [])
    assert (obs.min, obs.max) == (-2.0, 7.0)
    assert compute_range(obs, "minmax") == (-2.0, 7.0)


def test_percentile_on_a_known_array():
    obs = _observer(np.arange(1001))  # 0, 1, ..., 1000
    assert compute_range(obs, "percentile", 99.0) == pytest.approx((10.0, 990.0))
    assert compute_range(obs, "percentile", 90.0) == pytest.approx((100.0, 900.0))
    assert compute_range(obs, "percentile", 100.0) == pytest.approx((0.0, 1000.0))


def test_never_observed_gives_an_empty_range():
    assert compute_range(RangeObserver(), "minmax") == (0.0, 0.0)
    assert compute_range(RangeObserver(), "mse") == (0.0, 0.0)


def test_unknown_method():
    with pytest.raises(ConfigError, match="minmax"):
        compute_range(_observer([1.0]), "bogus")


@pytest.fixture(scope="module")
def outlier_data():
    """2^19 standard normal values (8 updates of 65536, so nothing is subsampled away) + one 1000."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=2**19).astype(np.float32)
    x[1234] = 1000.0
    return x, _observer(*np.split(x, 8))


@pytest.mark.parametrize("method", OBSERVERS)
def test_no_method_is_wider_than_min_max(outlier_data, method):
    x, obs = outlier_data
    lo, hi = compute_range(obs, method)
    assert obs.min <= lo <= 0.0 <= hi <= obs.max
    assert (obs.min, obs.max) == (float(x.min()), 1000.0)


@pytest.mark.parametrize("method", ["mse", "entropy", "percentile"])
def test_clipping_methods_cut_a_big_outlier(outlier_data, method):
    x, obs = outlier_data
    lo, hi = compute_range(obs, method)
    assert hi < 0.9 * 1000.0


def test_mse_range_has_no_more_error_than_min_max(outlier_data):
    x, obs = outlier_data
    mse = compute_range(obs, "mse")
    assert _quant_error(x, *mse) <= _quant_error(x, obs.min, obs.max)


def test_mse_and_entropy_on_well_behaved_data_stay_inside_min_max():
    obs = _observer(np.linspace(-1.0, 2.0, 3001))
    for method in ("mse", "entropy"):
        lo, hi = compute_range(obs, method)
        assert -1.0 <= lo <= 0.0 <= hi <= 2.0


def test_large_updates_are_subsampled_but_min_max_stay_exact():
    x = np.zeros(1_000_000, np.float32)
    x[999_999] = 5.0  # not on the sampling stride
    x[1] = -3.0
    obs = _observer(x)
    assert (obs.min, obs.max) == (-3.0, 5.0)
    assert obs.samples().size < x.size


def test_mean_minmax_is_the_mean_of_each_samples_extremes():
    obs = RangeObserver(keep_samples=False)
    obs.update(np.array([[0.0, 1.0, -2.0], [4.0, 0.5, 1.0]], np.float32))  # sample extremes (-2, 1), (0.5, 4)
    obs.update(np.array([[10.0, -1.0, 0.0]], np.float32))  # (-1, 10): a rare extreme moves the mean only
    lo, hi = compute_range(obs, "mean-minmax")
    assert lo == pytest.approx((-2.0 + 0.5 - 1.0) / 3) and hi == pytest.approx((1.0 + 4.0 + 10.0) / 3)
    assert compute_range(obs, "minmax") == (-2.0, 10.0)
