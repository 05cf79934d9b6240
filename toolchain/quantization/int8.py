"""int8 quantization methods (static QDQ and dynamic): configs and handlers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.progress import track
from sqexport.contracts.quant import QuantParams
from sqexport.contracts.weight_grid import PAIR_SUM_LIMIT, WeightGrid
from sqexport.runtime_check.isa import FULL_QMAX, REDUCED_QMAX
from sqexport.toolchain.quantization.adaround import AdaRoundConfig, adaround_weights
from sqexport.toolchain.quantization.bias_correction import bias_corrections
from sqexport.toolchain.quantization.fallback import FallbackPolicy
from sqexport.toolchain.quantization.range_choice import AUTO, CANDIDATES, choose_range
from sqexport.toolchain.quantization.static import (
    calibrate, calibrate_each, quantize_embeddings, quantize_weights, shared_minmax_ranges,
)
from sqexport.toolchain.registry import names, register
from sqexport.toolchain.stages import QuantContext

__all__ = ["Int8StaticConfig", "Int8DynamicConfig", "quantize_static", "quantize_dynamic"]


@dataclass(frozen=True)
class Int8StaticConfig:
    """Static QDQ int8: weights per-channel symmetric int8, activations per-tensor uint8.

    `observer` picks the activation range method: a registered observer (minmax, percentile,
    entropy, mse, mean-minmax) or `auto`, the default: min-max, or the `percentile` clip where it
    clearly keeps the calibration outputs closer to FP32 (range_choice.py; one calibration pass
    serves both). Clipping transformer activations (percentile, entropy) cut the mean cosine of
    all-MiniLM-L6-v2 from 0.992 to 0.906 / 0.947, because BERT's few huge channels matter; it
    lifted RepVGG-A0's from 0.72 to 0.93. Without a way to score outputs (a direct handler call
    with no `ctx.output_error`), `auto` is min-max. Activation outliers of token sequences are
    handled by the `transform.smoothquant` stage before this one.
    """

    observer: str = AUTO
    percentile: float = 99.99
    embeddings: bool = True  # int8 embedding tables (per-tensor, gathered as int8 by onnxruntime)
    # accuracy-aware fallback of the worst layers to FP32 (see fallback.py)
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    # the weights' integer grid; None = the target's (runtime_check.isa: x86 without VNNI gets 8-bit
    # weights whose int16 pairs stay within the limit, contracts.weight_grid). reduce_range: True
    # forces 7 bits (|q| <= 63). pair_limit: True forces the pair limit (building on a VNNI machine
    # for x86 CPUs without it), False lifts it
    reduce_range: bool | None = None
    pair_limit: bool | None = None
    # subtract the expected quantization error E[(W_q - W) x] from each bias (bias_correction.py).
    # On by default: per-channel scales do not stop a few rounded weights (a 3x3 depthwise kernel
    # has 9) from shifting a channel's mean; pretrained EfficientNet-Lite0, 8 photos, KL to FP32 on
    # photos outside the folder 0.073 -> 0.016 (one calibration pass, ~3 s)
    bias_correction: bool = True
    # learned up/down rounding of the weights (adaround.py); bias correction, if on, runs after it
    # and removes the mean of the error AdaRound leaves
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    # layers whose int8 kernels measured slower than FP32 inside the whole model stay FP32
    # (speed_check.py); the choice rests on timing this host, false makes it timing-free
    speed_check: bool = True
    VERSION: ClassVar[int] = 3  # 2: smoothquant became its own stage, fallback a policy; 3: bias correction on
    kind: ClassVar[str] = "quantize"
    requires_calibration: ClassVar[bool] = True
    supports_fallback: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "fallback", FallbackPolicy.coerce(self.fallback))
        object.__setattr__(self, "adaround", AdaRoundConfig.coerce(self.adaround))
        known = [AUTO] + names("observer")
        if self.observer not in known:
            raise ConfigError(f"unknown observer '{self.observer}'; known: {', '.join(known)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if not isinstance(self.speed_check, bool):
            raise ConfigError(f"speed_check must be true or false, got {self.speed_check!r}")


def _grid(config, ctx) -> WeightGrid:
    host = ctx.weight_grid
    qmax = host.qmax if config.reduce_range is None else REDUCED_QMAX if config.reduce_range else FULL_QMAX
    limit = host.pair_limit if config.pair_limit is None else PAIR_SUM_LIMIT if config.pair_limit else None
    if qmax <= REDUCED_QMAX:  # 7-bit pairs never reach the limit
        limit = None
    return WeightGrid(qmax, limit)


@register("quantize", "int8", Int8StaticConfig,
          "static QDQ int8: per-channel symmetric weights, calibrated per-tensor uint8 activations")
def quantize_static(model, config: Int8StaticConfig, ctx: QuantContext) -> QuantParams:
    batches = track(ctx.progress, ctx.calib_batches, "calibration", "batches")
    grid = _grid(config, ctx)
    shared = shared_minmax_ranges(ctx.anchors, ctx.tensors, ctx.observed_ranges) if config.observer == AUTO else None
    if shared is not None:
        ins, outs, tensors = shared
        ctx.decisions["range_choice"] = {
            "chosen": "minmax", "output_error": {},
            "why": f"min-max ranges shared with {ctx.observed_ranges.source}: its scales are set for min-max ranges "
                   "(on all-MiniLM-L6-v2 a percentile clip cut the mean cosine from 0.992 to 0.906), and sharing them "
                   "saves a calibration pass"}
    elif config.observer == AUTO and ctx.output_error is not None:
        ins, outs, tensors = _chosen_ranges(model, config, ctx, batches, grid)
    else:
        observer = "minmax" if config.observer == AUTO else config.observer
        ins, outs, tensors = calibrate(model, ctx.anchors, batches, ctx.run, observer, config.percentile,
                                       ctx.tensors, ctx.observed_ranges)
    params = quantize_weights(model, ctx.anchors, ins, grid)
    params.outputs = outs
    params.tensors = tensors
    if config.adaround.enabled:  # needs the activation params: layers learn from quantized inputs
        rounded = adaround_weights(model, params, ctx.calib_batches, ctx.run, grid, config.adaround, ctx.progress)
        params = replace(params, weights=rounded)
    if config.bias_correction:
        corrected = bias_corrections(model, params.weights, ctx.calib_batches, ctx.run)
        params = replace(quantize_weights(model, ctx.anchors, ins, grid, corrected, params.weights),
                         outputs=outs, tensors=tensors)
    if config.embeddings:
        params.embeddings = quantize_embeddings(model)
    return params


def _chosen_ranges(model, config: Int8StaticConfig, ctx: QuantContext, batches, grid: WeightGrid):
    """The activation ranges of the range method whose plain int8 model (nearest-rounded weights)
    keeps the outputs closest to FP32 (range_choice.choose_range); ctx.decisions records it."""
    ranged = calibrate_each(model, ctx.anchors, batches, ctx.run, list(CANDIDATES), config.percentile, ctx.tensors)
    errors = {}
    for name, (ins, outs, tensors) in zip(CANDIDATES, ranged):
        params = quantize_weights(model, ctx.anchors, ins, grid)
        params.outputs, params.tensors = outs, tensors
        if config.embeddings:
            params.embeddings = quantize_embeddings(model)
        errors[name] = ctx.output_error(params)
    chosen, record = choose_range(errors, config.percentile)
    ctx.decisions["range_choice"] = record
    return ranged[CANDIDATES.index(chosen)]


@dataclass(frozen=True)
class Int8DynamicConfig:
    """Dynamic int8 for MatMul/Gemm (transformer Linears): weights per-channel symmetric int8
    computed here, activations quantized per tensor at run time. Convolutions stay FP32: use
    static int8 for CNNs. A `transform.smoothquant` stage before it helps the per-tensor scale."""

    embeddings: bool = True  # int8 embedding tables, as in static int8
    reduce_range: bool | None = None  # as in static int8
    pair_limit: bool | None = None  # as in static int8
    # the same accuracy-aware fallback as static int8; its prediction scores calibration data
    fallback: FallbackPolicy = field(default_factory=FallbackPolicy)
    VERSION: ClassVar[int] = 2  # 2: smoothquant became its own stage
    kind: ClassVar[str] = "quantize"
    requires_calibration: ClassVar[bool] = False  # weights only; activations are ranged at run time
    supports_fallback: ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "fallback", FallbackPolicy.coerce(self.fallback))


@register("quantize", "int8-dynamic", Int8DynamicConfig,
          "dynamic int8 for MatMul/Gemm: per-channel int8 weights, activations quantized at run time")
def quantize_dynamic(model, config: Int8DynamicConfig, ctx: QuantContext) -> QuantParams:
    anchors = [a for a in ctx.anchors if a.dynamic_ok]
    params = quantize_weights(model, [replace(a, quantize_bias=False, quantize_output=False, quantize_input_for_sum=False)
                                      for a in anchors], {},
                              _grid(config, ctx))
    params.dynamic = True
    if config.embeddings:
        params.embeddings = quantize_embeddings(model)
    return params

