"""What the CPU that runs the model can do, where it changes how int8 must be built.

onnxruntime's x86 int8 kernels (QLinearConv, QGemm, MatMulInteger, DynamicQuantizeMatMul) use
u8 x s8 multiply-adds. Without VNNI (AVX2, or AVX-512 without VNNI) they go through vpmaddubsw,
which adds two u8*s8 products into a *saturating* int16: 2 * 255 * 127 = 64770 overflows, so a
model with full-range int8 weights silently computes something else than its QDQ graph says.
With 7-bit weights (|q| <= 63: 2 * 255 * 63 = 32130) the sums fit and the result is exact, but
the weights lose a bit; full 8-bit weights whose same-sign adjacent pairs keep |q_a| + |q_b| <= 128
are exact too (contracts.weight_grid), and that is what such a host gets.
VNNI (vpdpbusd) accumulates in int32 and ARM kernels widen before adding: full range is safe.
"""
from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

from sqexport.contracts.targets import get_target
from sqexport.contracts.weight_grid import PAIR_SUM_LIMIT, WeightGrid

__all__ = ["cpu_flags", "int8_saturates", "weight_grid", "FULL_QMAX", "REDUCED_QMAX", "describe_cpu"]

FULL_QMAX = 127  # symmetric int8 weights in [-127, 127]
REDUCED_QMAX = 63  # "reduce_range": 7-bit weights, safe for non-VNNI x86 kernels
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def int8_saturates(machine: str | None = None, flags: frozenset[str] | None = None) -> bool:
    """True where onnxruntime's int8 GEMM can saturate: x86-64 without VNNI. Unknown x86 CPUs
    (no /proc/cpuinfo) count as saturating: 7-bit weights are correct everywhere."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = cpu_flags() if flags is None else flags
    return not (VNNI_FLAGS & set(flags))


def weight_grid(target: str = "cpu") -> WeightGrid:
    """The integers int8 weights may take on `target`: ARM kernels never saturate; a host target is
    this machine's CPU, and one without VNNI gets full 8-bit weights with limited int16 pairs."""
    if get_target(target).int8_kernels == "arm" or not int8_saturates():
        return WeightGrid(FULL_QMAX)
    return WeightGrid(FULL_QMAX, pair_limit=PAIR_SUM_LIMIT)


def describe_cpu() -> str:
    vnni = sorted(VNNI_FLAGS & cpu_flags())
    return f"{platform.machine()}" + (f" ({', '.join(vnni)})" if vnni else
                                      " (no VNNI)" if platform.machine().lower() in ("x86_64", "amd64") else "")
