"""Where full-range int8 weights are unsafe: hand-checked against onnxruntime's kernel families."""
import pytest

import sqexport.runtime_check.isa as isa
from sqexport.contracts.weight_grid import PAIR_SUM_LIMIT, WeightGrid
from sqexport.runtime_check.isa import FULL_QMAX, REDUCED_QMAX, int8_saturates, weight_grid

HASWELL = frozenset({"sse4_2", "avx", "avx2", "fma"})
ICELAKE = HASWELL | {"avx512f", "avx512bw", "avx512_vnni"}


def test_x86_without_vnni_saturates():
    assert int8_saturates("x86_64", frozenset({"avx2", "fma"}))
    assert int8_saturates("x86_64", frozenset({"avx512f", "avx512bw"}))  # AVX-512 without VNNI too


def test_vnni_and_arm_do_not():
    assert not int8_saturates("x86_64", frozenset({"avx2", "avx512_vnni"}))
    assert not int8_saturates("x86_64", frozenset({"avx2", "avx_vnni"}))
    assert not int8_saturates("aarch64", frozenset())


def test_int16_pair_arithmetic():
    # vpmaddubsw adds two u8*s8 products into a saturating int16
    assert 2 * 255 * FULL_QMAX > 2**15 - 1
    assert 2 * 255 * REDUCED_QMAX <= 2**15 - 1
    assert 255 * PAIR_SUM_LIMIT <= 2**15 - 1 < 255 * (PAIR_SUM_LIMIT + 1)
    assert 255 * FULL_QMAX <= 2**15 - 1  # one full-range weight with a zero (or opposite-sign) partner fits


@pytest.mark.parametrize("machine, flags, grid", [
    ("x86_64", HASWELL, WeightGrid(127, pair_limit=128)),
    ("x86_64", ICELAKE, WeightGrid(127)),
    ("aarch64", frozenset(), WeightGrid(127)),
])
def test_the_host_picks_its_grid(monkeypatch, machine, flags, grid):
    monkeypatch.setattr(isa.platform, "machine", lambda: machine)
    monkeypatch.setattr(isa, "cpu_flags", lambda: flags)
    assert weight_grid("cpu") == grid
    assert weight_grid("mobile") == WeightGrid(FULL_QMAX)  # ARM kernels widen before adding
