"""Quantization methods; importing this package registers them."""
from __future__ import annotations

from dataclasses import dataclass, replace

from contracts.errors import ConfigError
from contracts.progress import track
from toolchain.quantization.observers import OBSERVERS
from toolchain.quantization.static import (
    QuantParams, calibrate, fake_quant_model, quantize_embeddings, quantize_weights,
)
from toolchain.registry import register
from runtime_check.isa import FULL_QMAX, REDUCED_QMAX

ACT_OBSERVERS = OBSERVERS

__all__ = ["Int8StaticConfig", "QuantParams", "quantize_static"]


@dataclass(frozen=True)
class Int8StaticConfig:
    """Static QDQ int8: weights per-channel symmetric int8, activations per-tensor uint8.

    `observer` picks the activation range method (minmax, percentile, entropy, mse). Min-max is
    the default: clipping transformer activations (percentile, entropy) cut the mean cosine of
    all-MiniLM-L6-v2 from 0.992 to 0.906 / 0.947, because BERT's few huge channels matter.
    `percentile` is used by the percentile observer. `smoothquant` (alpha) moves activation
    outliers of token-sequence Linears into their weights first (see smoothing.py); 0 disables.
    """

    observer: str = "minmax"
    percentile: float = 99.99
    embeddings: bool = True  # int8 embedding tables (per-tensor, gathered as int8 by onnxruntime)
    smoothquant: float = 0.85  # SmoothQuant alpha for Linears on token sequences; 0 disables
    fallback: bool = True  # accuracy-aware fallback of the worst layers to FP32 (see fallback.py)
    max_fallback_fraction: float = 0.25  # at most this share of the quantized layers falls back
    # 7-bit weights (|q| <= 63): None = decided by the target (runtime_check.isa: x86 without VNNI
    # saturates full-range int8 sums); True/False force it
    reduce_range: bool | None = None
    VERSION = 1

    def __post_init__(self):
        if self.observer not in ACT_OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}'; known: {', '.join(ACT_OBSERVERS)}")
        if not 0.0 <= self.smoothquant <= 1.0:
            raise ConfigError(f"smoothquant alpha must be in [0, 1], got {self.smoothquant}")
        if not 0.0 <= self.max_fallback_fraction <= 1.0:
            raise ConfigError(f"max_fallback_fraction must be in [0, 1], got {self.max_fallback_fraction}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")


def _qmax(config, ctx) -> int:
    reduce = ctx.reduce_range if config.reduce_range is None else config.reduce_range
    return REDUCED_QMAX if reduce else FULL_QMAX


@register("quantize", "int8", Int8StaticConfig,
          "static QDQ int8: per-channel symmetric weights, calibrated per-tensor uint8 activations")
def quantize_static(model, config: Int8StaticConfig, ctx) -> QuantParams:
    """ctx: .anchors (from the exported graph), .calib_batches, .run(model, batch), .progress."""
    batches = track(ctx.progress, ctx.calib_batches, "calibration", "batches")
    ins, outs = calibrate(model, ctx.anchors, batches, ctx.run, config.observer, config.percentile)
    params = quantize_weights(model, ctx.anchors, ins, _qmax(config, ctx))
    params.outputs = outs
    if config.embeddings:
        params.embeddings = quantize_embeddings(model)
    return params


@dataclass(frozen=True)
class Int8DynamicConfig:
    """Dynamic int8 for MatMul/Gemm (transformer Linears): weights per-channel symmetric int8
    computed here, activations quantized per tensor at run time. Convolutions stay FP32: use
    static int8 for CNNs. `smoothquant` as in static int8 (helps the per-tensor activation scale)."""

    smoothquant: float = 0.85
    embeddings: bool = True  # int8 embedding tables, as in static int8
    reduce_range: bool | None = None  # as in static int8
    VERSION = 1

    def __post_init__(self):
        if not 0.0 <= self.smoothquant <= 1.0:
            raise ConfigError(f"smoothquant alpha must be in [0, 1], got {self.smoothquant}")


@register("quantize", "int8-dynamic", Int8DynamicConfig,
          "dynamic int8 for MatMul/Gemm: per-channel int8 weights, activations quantized at run time")
def quantize_dynamic(model, config: Int8DynamicConfig, ctx) -> QuantParams:
    anchors = [a for a in ctx.anchors if a.dynamic_ok]
    params = quantize_weights(model, [replace(a, quantize_bias=False, quantize_output=False) for a in anchors], {},
                              _qmax(config, ctx))
    params.dynamic = True
    if config.embeddings:
        params.embeddings = quantize_embeddings(model)
    return params


__all__ += ["calibrate", "fake_quant_model", "quantize_weights", "Int8DynamicConfig"]
