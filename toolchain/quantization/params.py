"""Quantization parameters and the arithmetic that both torch and the ONNX writer share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ActQuant", "WeightQuant", "act_params_from_range", "quantize_weight_per_channel",
           "quantize_bias", "fake_quant_act", "quantize_per_tensor_symmetric"]

INT8_MAX = 127  # symmetric weights use [-127, 127] so that -w quantizes to -q exactly


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

    def dequantized(self) -> np.ndarray:
        shape = (-1,) + (1,) * (self.q.ndim - 1)
        return self.q.astype(np.float32) * self.scale.reshape(shape)


def act_params_from_range(rmin: float, rmax: float) -> ActQuant:
    """uint8 affine params covering [rmin, rmax] widened to include 0 (so 0 is exact)."""
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    scale = (rmax - rmin) / 255.0
    if scale <= 0.0 or not np.isfinite(scale):
        return ActQuant(scale=1.0, zero_point=0)
    scale = float(np.float32(scale))  # the value ONNX will store
    zero_point = int(np.clip(round(-rmin / scale), 0, 255))
    return ActQuant(scale=scale, zero_point=zero_point)


def quantize_weight_per_channel(weight: np.ndarray, qmax: int = INT8_MAX) -> WeightQuant:
    """scale_c = max|w_c| / qmax on the (pruned) weight; zeros map to q = 0 exactly.

    qmax is 127, or 63 ("reduce range") where the int8 kernels would saturate (runtime_check.isa)."""
    w = np.asarray(weight, dtype=np.float32)
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


def fake_quant_act(x: torch.Tensor, p: ActQuant) -> torch.Tensor:
    # Same rounding as ONNX QuantizeLinear (round half to even, saturate to [0, 255]).
    return torch.fake_quantize_per_tensor_affine(x, p.scale, p.zero_point, 0, 255)
