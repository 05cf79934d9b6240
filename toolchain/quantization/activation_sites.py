"""Activation modules whose outputs the int8 graph quantizes, so that onnxruntime runs them (and
the elementwise ops reading them) as int8 kernels instead of in float between a DequantizeLinear
and a QuantizeLinear (exporters.elementwise says which ops it fuses):

- sigmoid and hard sigmoid modules (squeeze-excitation gates): the output has Q/DQ with the
  function's whole range [0, 1] (UNIT_RANGE), not a calibrated one: it cannot clip on any input,
  and the gating Mul reads two int8 tensors (QLinearMul);
- SiLU modules whose input is already quantized: Q/DQ on the inner Sigmoid (UNIT_RANGE) and on
  the output (calibrated), so SiLU runs as QLinearSigmoid + QLinearMul.

Each module is matched to its ONNX tensor by value (exporters.tensor_sites), as residual adds
are; a module without exactly one match keeps its float op (slower, still correct).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from torch import nn

from sqexport.exporters.elementwise import silu_gate
from sqexport.exporters.tensor_sites import find_tensor_sites

__all__ = ["ActivationSites", "activation_modules", "match_activation_sites"]

GATES = ("Sigmoid", "Hardsigmoid", "HardSigmoid")  # class names: torch's and timm's own
SILU = ("SiLU", "Swish")


@dataclass
class ActivationSites:
    tensors: dict[str, str] = field(default_factory=dict)  # module -> ONNX tensor of its output
    gates: dict[str, str] = field(default_factory=dict)  # SiLU module -> its Sigmoid's output tensor
    bounded: set[str] = field(default_factory=set)  # modules quantized over UNIT_RANGE


def activation_modules(model: nn.Module) -> dict[str, str]:
    """module name -> "gate" or "silu", for the activation modules worth a quantization point."""
    found = {}
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind in GATES:
            found[name] = "gate"
        elif kind in SILU:
            found[name] = "silu"
    return found


def match_activation_sites(prepared: onnx.ModelProto, kinds: dict[str, str], values: dict[str, np.ndarray],
                           feed: dict, quantized: set[str]) -> ActivationSites:
    """`values`: each module's output on `feed`; `quantized`: tensors that already get Q/DQ (a
    SiLU whose input is float would gain nothing from int8 kernels)."""
    sites = ActivationSites()
    gates = find_tensor_sites(prepared, {m: v for m, v in values.items() if kinds[m] == "gate"}, feed,
                              ("Sigmoid", "HardSigmoid"))
    sites.tensors.update(gates)
    sites.bounded.update(gates)
    silus = find_tensor_sites(prepared, {m: v for m, v in values.items() if kinds[m] == "silu"}, feed, ("Mul",))
    for module, tensor in silus.items():
        inner = silu_gate(prepared, tensor)
        if inner is not None and inner[0] in quantized:
            sites.tensors[module] = tensor
            sites.gates[module] = inner[1]
    return sites
