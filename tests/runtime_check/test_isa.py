"""Where full-range int8 weights are unsafe: hand-checked against onnxruntime's kernel families."""
from sqexport.runtime_check.isa import FULL_QMAX, REDUCED_QMAX, int8_saturates, weight_qmax


def test_x86_without_vnni_saturates():
    assert int8_saturates("x86_64", frozenset({"avx2", "fma"}))
    assert int8_saturates("x86_64", frozenset({"avx512f", "avx512bw"}))  # AVX-512 without VNNI too


def test_vnni_and_arm_do_not():
    assert not int8_saturates("x86_64", frozenset({"avx2", "avx512_vnni"}))
    assert not int8_saturates("x86_64", frozenset({"avx2", "avx_vnni"}))
    assert not int8_saturates("aarch64", frozenset())


def test_seven_bit_sums_fit_in_int16():
    # vpmaddubsw adds two u8*s8 products into a saturating int16
    assert 2 * 255 * FULL_QMAX > 2**15 - 1
    assert 2 * 255 * REDUCED_QMAX <= 2**15 - 1


def test_mobile_target_is_full_range():
    assert weight_qmax("mobile") == FULL_QMAX
    assert weight_qmax("cpu") == (REDUCED_QMAX if int8_saturates() else FULL_QMAX)
