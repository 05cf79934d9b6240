"""Activation range observers for per-tensor calibration.

Each observer keeps the exact min/max plus a bounded, deterministic subsample of the values it
saw; the range methods (min-max, percentile, entropy, MSE) then work on that sample. A strided
subsample (no RNG) keeps calibration reproducible run to run.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["RangeObserver", "OBSERVERS", "compute_range"]

OBSERVERS = ("minmax", "percentile", "entropy", "mse")
PER_CALL_SAMPLES = 1 << 16
MAX_SAMPLES = 1 << 21


class RangeObserver:
    """`keep_samples=False` (enough for min-max) tracks only the extremes."""

    def __init__(self, keep_samples: bool = True):
        self.min = math.inf
        self.max = -math.inf
        self._chunks: list[np.ndarray] = []
        self._count = 0 if keep_samples else MAX_SAMPLES

    def update(self, values: np.ndarray) -> None:
        flat = np.asarray(values, dtype=np.float32).ravel()
        if flat.size == 0:
            return
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        if self._count < MAX_SAMPLES:
            stride = max(1, math.ceil(flat.size / PER_CALL_SAMPLES))
            chunk = flat[::stride].copy()
            self._chunks.append(chunk)
            self._count += chunk.size

    def samples(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros(1, np.float32)


def _percentile_range(x: np.ndarray, pct: float) -> tuple[float, float]:
    lo, hi = np.percentile(x, [100.0 - pct, pct])
    return float(lo), float(hi)


def _quant_error(x: np.ndarray, lo: float, hi: float, levels: int = 255) -> float:
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / levels or 1.0
    zp = round(-lo / scale)
    q = np.clip(np.round(x / scale) + zp, 0, levels)
    return float(np.mean(((q - zp) * scale - x) ** 2))


def _mse_range(x: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Shrink the min-max range by a common factor; keep the factor with the least quantization MSE."""
    best = (math.inf, lo, hi)
    for alpha in np.linspace(0.3, 1.0, 36):
        err = _quant_error(x, alpha * lo, alpha * hi)
        if err < best[0]:
            best = (err, alpha * lo, alpha * hi)
    return best[1], best[2]


def _kl_threshold(x: np.ndarray, bins: int = 2048, target: int = 128) -> float:
    """TensorRT-style entropy calibration on |x|: the clip threshold whose 128-level quantized
    histogram has the least KL divergence from the reference histogram."""
    mags = np.abs(x)
    top = float(mags.max())
    if top == 0.0:
        return 0.0
    hist, edges = np.histogram(mags, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    best_kl, best_i = math.inf, bins
    for i in range(target, bins + 1, 16):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # outliers clip into the last kept bin
        chunks = np.array_split(hist[:i], target)
        quant = np.concatenate([
            np.where(c > 0, c.sum() / max(np.count_nonzero(c), 1), 0.0) for c in chunks
        ])
        p = ref / ref.sum()
        q = quant / quant.sum() if quant.sum() > 0 else quant
        valid = p > 0
        kl = float(np.sum(p[valid] * np.log(p[valid] / np.maximum(q[valid], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def compute_range(obs: RangeObserver, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """(rmin, rmax) for `method`; never wider than the observed min/max."""
    if obs.min > obs.max:  # never observed
        return 0.0, 0.0
    if method == "minmax":
        return obs.min, obs.max
    x = obs.samples()
    if method == "percentile":
        lo, hi = _percentile_range(x, percentile)
    elif method == "mse":
        lo, hi = _mse_range(x, obs.min, obs.max)
    elif method == "entropy":
        t = _kl_threshold(x)
        lo, hi = max(obs.min, -t), min(obs.max, t)
    else:
        raise ValueError(f"unknown observer '{method}'; known: {', '.join(OBSERVERS)}")
    return max(lo, obs.min), min(hi, obs.max)
