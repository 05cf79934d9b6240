"""Quantization methods; importing this package registers them."""
from __future__ import annotations

from dataclasses import dataclass

from toolchain.errors import ConfigError
from toolchain.quantization.observers import OBSERVERS
from toolchain.quantization.static import (
    QuantParams, calibrate, fake_quant_model, quantize_embeddings, quantize_weights,
)
from toolchain.registry import register

__all__ = ["Int8StaticConfig", "QuantParams", "quantize_static"]


@dataclass(frozen=True)
class Int8StaticConfig:
    """Static QDQ int8: weights per-channel symmetric int8, activations per-tensor uint8.

    `observer` picks the activation range method; `percentile` is used by the percentile observer.
    """

    observer: str = "percentile"
    percentile: float = 99.99
    embeddings: bool = True  # int8 embedding tables (per-tensor, gathered as int8 by onnxruntime)
    VERSION = 1

    def __post_init__(self):
        if self.observer not in OBSERVERS:
            raise ConfigError(f"unknown observer '{self.observer}'; known: {', '.join(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")


@register("quantize", "int8", Int8StaticConfig,
          "static QDQ int8: per-channel symmetric weights, calibrated per-tensor uint8 activations")
def quantize_static(model, config: Int8StaticConfig, ctx) -> QuantParams:
    """ctx: .anchors (from the exported graph), .calib_batches, .run(model, batch)."""
    ins, outs = calibrate(model, ctx.anchors, ctx.calib_batches, ctx.run, config.observer, config.percentile)
    params = quantize_weights(model, ctx.anchors, ins)
    params.outputs = outs
    if config.embeddings:
        params.embeddings = quantize_embeddings(model)
    return params


__all__ += ["calibrate", "fake_quant_model", "quantize_weights"]
