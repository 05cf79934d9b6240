"""Activation range observers for per-tensor calibration, registered like methods (kind "observer").

Each RangeObserver keeps the exact min/max plus a bounded, deterministic subsample of the values it
saw; the registered range methods (min-max, percentile, entropy, MSE) then work on that sample. A
strided subsample (no RNG) keeps calibration reproducible run to run.

An observer = a frozen config class (its parameters; `keeps_samples` says whether it needs more
than the extremes) plus `range_fn(observed, config) -> (lo, hi)` registered for it. The returned
range is clamped to the observed min/max by `compute_range`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.registry import lookup, register

__all__ = ["RangeObserver", "compute_range", "observer_config", "MinMaxObserver", "PercentileObserver",
           "EntropyObserver", "MSEObserver", "MeanMinMaxObserver"]

PER_CALL_SAMPLES = 1 << 16
MAX_SAMPLES = 1 << 21


class RangeObserver:
    """`keep_samples=False` (enough for min-max) tracks only the extremes."""

    def __init__(self, keep_samples: bool = True):
        self.min = math.inf
        self.max = -math.inf
        self._chunks: list[np.ndarray] = []
        self._count = 0 if keep_samples else MAX_SAMPLES
        # each sample's own extremes (first axis = samples): the mean-min-max range reads them
        self.sample_min: list[np.ndarray] = []
        self.sample_max: list[np.ndarray] = []

    def update(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        flat = values.ravel()
        if flat.size == 0:
            return
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        if values.ndim >= 2:
            per_sample = values.reshape(len(values), -1)
            self.sample_min.append(per_sample.min(1))
            self.sample_max.append(per_sample.max(1))
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


class _Observer:
    kind: ClassVar[str] = "observer"
    requires_calibration: ClassVar[bool] = True
    keeps_samples: ClassVar[bool] = True  # False: the exact min/max is all the method reads
    VERSION: ClassVar[int] = 1


@dataclass(frozen=True)
class MinMaxObserver(_Observer):
    keeps_samples: ClassVar[bool] = False


@dataclass(frozen=True)
class PercentileObserver(_Observer):
    percentile: float = 99.99

    def __post_init__(self):
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")


@dataclass(frozen=True)
class EntropyObserver(_Observer):
    pass


@dataclass(frozen=True)
class MSEObserver(_Observer):
    pass


@register("observer", "minmax", MinMaxObserver, "exact min/max of everything observed")
def minmax_range(obs: RangeObserver, config: MinMaxObserver) -> tuple[float, float]:
    return obs.min, obs.max


@register("observer", "percentile", PercentileObserver, "clip to the `percentile` / 100 - `percentile` quantiles")
def percentile_range(obs: RangeObserver, config: PercentileObserver) -> tuple[float, float]:
    return _percentile_range(obs.samples(), config.percentile)


@register("observer", "entropy", EntropyObserver, "TensorRT-style KL-divergence clip threshold on |x|")
def entropy_range(obs: RangeObserver, config: EntropyObserver) -> tuple[float, float]:
    t = _kl_threshold(obs.samples())
    return max(obs.min, -t), min(obs.max, t)


@register("observer", "mse", MSEObserver, "shrunk min-max range with the least quantization MSE")
def mse_range(obs: RangeObserver, config: MSEObserver) -> tuple[float, float]:
    return _mse_range(obs.samples(), obs.min, obs.max)


@dataclass(frozen=True)
class MeanMinMaxObserver(_Observer):
    keeps_samples: ClassVar[bool] = False


@register("observer", "mean-minmax", MeanMinMaxObserver,
          "mean over calibration samples of each sample's min and max (robust to rare outliers)")
def mean_minmax_range(obs: RangeObserver, config: MeanMinMaxObserver) -> tuple[float, float]:
    if not obs.sample_min:  # scalars only: nothing per sample
        return obs.min, obs.max
    return float(np.concatenate(obs.sample_min).mean()), float(np.concatenate(obs.sample_max).mean())


def observer_config(method: str, **settings):
    """The registered observer's config; `settings` (e.g. a quantize config's `percentile`) go to
    the observers that declare them and are ignored by the others."""
    cls = lookup("observer", method).config_cls
    return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})


def compute_range(obs: RangeObserver, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """(rmin, rmax) for `method`; never wider than the observed min/max."""
    entry = lookup("observer", method)
    if obs.min > obs.max:  # never observed
        return 0.0, 0.0
    lo, hi = entry.handler(obs, observer_config(method, percentile=percentile))
    return max(lo, obs.min), min(hi, obs.max)
