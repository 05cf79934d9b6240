"""Quantization parameters and the numpy arithmetic that both torch and the ONNX writers share.

Plain data only (numpy, no torch, no onnx): the algorithms in toolchain compute these, the writers
in exporters store them, and neither has to import the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from sqexport.contracts.weight_grid import WeightGrid, as_grid, pair_limited_per_channel

__all__ = [
    "INT8_MAX", "RELU", "LINEAR", "UNIT_RANGE", "HARD_GATE_RANGE", "ActQuant", "WeightQuant", "Anchor", "QuantParams", "ObservedRanges",
    "act_params_from_range",
    "quantize_weight_per_channel", "quantize_per_tensor_symmetric", "quantize_bias",
]

INT8_MAX = 127  # symmetric weights use [-127, 127] so that -w quantizes to -q exactly
# what lies between a layer and its quantized output: Relu (0, inf) or ReLU6's Clip (0, 6);
# LINEAR for a Conv whose plain output is quantized
RELU = (0.0, math.inf)
LINEAR = (-math.inf, math.inf)
UNIT_RANGE = (0.0, 1.0)  # the outputs of sigmoid and hard sigmoid: bounded, whatever the input
HARD_GATE_RANGE = (0.0, 6.0)  # relu6(x + 3): hard sigmoid times 6, quantized on this range


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor asymmetric uint8: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int

    def to_dict(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class WeightQuant:
    """Per-output-channel symmetric int8 (zero point 0): real = q * scale[c]."""

    q: np.ndarray  # int8, torch weight layout (out, ...)
    scale: np.ndarray  # float32, (out,)
    limited_pairs: int = 0  # pairs moved to the int16 pair limit (contracts.weight_grid)

    def dequantized(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        return self.q.astype(np.float32) * self.scale.reshape(shape)


@dataclass(frozen=True)
class Anchor:
    """A layer whose weight becomes int8, and where its activations get quantized.

    Anchors come from the exported FP32 graph (exporters.qdq.find_sites), so torch and ONNX agree
    on every quantization point: the anchor's activation input, and its output: for Conv/Linear +
    ReLU or ReLU6 (Clip) the rectified output, for a Conv without one its plain output (what lets
    onnxruntime fuse the node into QLinearConv, which needs a QuantizeLinear right after it)."""

    module: str  # qualified torch module name
    quantize_output: bool = False  # quantize the output too (after its rectifier, see output_range)
    quantize_bias: bool = False  # bias as int32 with scale s_in * s_w (Conv / Gemm)
    dynamic_ok: bool = False  # MatMul / Gemm: can take run-time (dynamic) activation quantization
    output_range: tuple[float, float] = RELU  # bounds of the rectifier before the output's Q
    # the input is also read by a plain residual Add (the skip path): that Add reads the same
    # quantized tensor, so both its inputs are int8 and onnxruntime runs it as QLinearAdd
    quantize_input_for_sum: bool = False


@dataclass
class QuantParams:
    """Everything the QDQ writer needs; keyed by torch module name."""

    inputs: dict[str, ActQuant] = field(default_factory=dict)
    outputs: dict[str, ActQuant] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)
    biases: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # int32 q, scale
    embeddings: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)  # int8 q, scale
    anchors: list[Anchor] = field(default_factory=list)
    # outputs of weightless modules (a residual add's FloatFunctional.activation_post_process),
    # quantized so that onnxruntime runs the add as QLinearAdd and its readers stay int8
    tensors: dict[str, ActQuant] = field(default_factory=dict)
    # activation modules computed through an int8 gate, with the gate's params: SiLU (x * sigmoid(x):
    # the sigmoid output over UNIT_RANGE; onnxruntime runs QLinearSigmoid + QLinearMul), hard swish
    # and hard sigmoid (relu6(x + 3) on HARD_GATE_RANGE, read back / 6: QLinearAdd (+ QLinearMul))
    gates: dict[str, ActQuant] = field(default_factory=dict)
    # tensor / gate site -> the weight layers next to it in the graph: a site keeps its Q/DQ only
    # while one of them is int8 (toolchain/quantization/site_neighbors.py)
    site_layers: dict[str, frozenset[str]] = field(default_factory=dict)
    dynamic: bool = False  # activations quantized at run time (per tensor, min/max of each input)
    weight_grid: WeightGrid | None = None  # the grid the weights were quantized on


@dataclass
class ObservedRanges:
    """Exact min/max of layer inputs and outputs over the calibration data, observed by a stage's
    own pass over the model (transform.smoothquant) and keyed by module name in the model that
    stage returns: min-max calibration reads them instead of running the model once more.

    `inputs` / `outputs`: module -> (min, max) of the tensor the module reads / returns (outputs
    before any rectifier). `samples`: how many calibration samples were observed. `used` is set
    by the calibration that read them (the report says so)."""

    inputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    outputs: dict[str, tuple[float, float]] = field(default_factory=dict)
    samples: int = 0
    source: str = ""  # the stage that observed them
    used: bool = False


def act_params_from_range(rmin: float, rmax: float) -> ActQuant:
    """uint8 affine params covering [rmin, rmax] widened to include 0 (so 0 is exact)."""
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    scale = (rmax - rmin) / 255.0
    if scale <= 0.0 or not np.isfinite(scale):
        return ActQuant(scale=1.0, zero_point=0)
    scale = float(np.float32(scale))  # the value ONNX will store
    zero_point = int(np.clip(round(-rmin / scale), 0, 255))
    return ActQuant(scale=scale, zero_point=zero_point)


def quantize_weight_per_channel(weight: np.ndarray, grid: int | WeightGrid = INT8_MAX) -> WeightQuant:
    """scale_c = max|w_c| / qmax on the (pruned) weight; zeros map to q = 0 exactly.

    `grid` is a qmax (127; 63 = "reduce range") or a WeightGrid: on the pair-limited grid each
    channel picks its qmax and same-sign pairs the kernel adds into one int16 stay within the limit
    (contracts.weight_grid)."""
    grid = as_grid(grid)
    w = np.asarray(weight, dtype=np.float32)
    if grid.pair_limit is not None:
        q, scale, moved = pair_limited_per_channel(w, grid.pair_limit)
        return WeightQuant(q=q, scale=scale, limited_pairs=moved)
    qmax = grid.qmax
    absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    shape = (-1,) + (1,) * (w.ndim - 1)
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return WeightQuant(q=q, scale=scale)


def quantize_per_tensor_symmetric(weight: np.ndarray) -> tuple[np.ndarray, float]:
    """int8 with one scale = max|w| / 127 (embedding tables: onnxruntime gathers int8 rows only
    when the DequantizeLinear before Gather and the QuantizeLinear after it share one scale)."""
    w = np.asarray(weight, dtype=np.float32)
    absmax = float(np.abs(w).max()) if w.size else 0.0
    scale = float(np.float32(absmax / INT8_MAX)) if absmax > 0 else 1.0
    return np.clip(np.rint(w / np.float32(scale)), -INT8_MAX, INT8_MAX).astype(np.int8), scale


def quantize_bias(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int32 bias with scale = input_scale * weight_scale[c] (what QLinearConv/QGemm consume)."""
    scale = (np.float32(input_scale) * weight_scale).astype(np.float32)
    # float64: 2**31 - 1 is not representable in float32 and would wrap to -2**31 on the cast
    q = np.clip(np.rint(np.asarray(bias, np.float64) / scale.astype(np.float64)), -(2**31), 2**31 - 1)
    q = q.astype(np.int32)
    return q, scale
