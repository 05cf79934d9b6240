"""Activation modules whose outputs the int8 graph quantizes, so that onnxruntime runs them (and
the elementwise ops reading them) as int8 kernels instead of in float between a DequantizeLinear
and a QuantizeLinear (exporters.elementwise says which ops it fuses):

- sigmoid and hard sigmoid modules (squeeze-excitation gates): the output has Q/DQ with the
  function's whole range [0, 1] (UNIT_RANGE), not a calibrated one: it cannot clip on any input,
  and the gating Mul reads two int8 tensors (QLinearMul);
- SiLU modules whose input is already quantized: Q/DQ on the inner Sigmoid (UNIT_RANGE) and on
  the output (calibrated), so SiLU runs as QLinearSigmoid + QLinearMul;
- hard swish and hard sigmoid modules whose input is quantized: written around an int8 gate,
  relu6(x + 3) on HARD_GATE_RANGE read back on the unit grid (exporters.elementwise.write_hard_gate),
  so they run as QLinearAdd (+ QLinearMul for hard swish); hard swish's output is quantized
  (calibrated), hard sigmoid's is that unit grid itself. A hard sigmoid whose input is float is
  a plain bounded gate (Q/DQ over UNIT_RANGE on its output).

Each module is matched to its ONNX tensor by value (exporters.tensor_sites), as residual adds
are; a module without exactly one match keeps its float op (slower, still correct).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from torch import nn

from sqexport.exporters.elementwise import hard_gate_node, silu_gate
from sqexport.exporters.tensor_sites import find_tensor_sites

__all__ = ["ActivationSites", "activation_modules", "match_activation_sites"]

# class names: torch's and timm's own
GATES = ("Sigmoid",)
HARD_GATES = ("Hardsigmoid", "HardSigmoid")
HARD_SWISH = ("Hardswish", "HardSwish")
SILU = ("SiLU", "Swish")
SUMS, CONCATS = ("AddTensors",), ("ConcatTensors",)  # models.graph_module's, in rebuilt models
RECTIFIERS = ("Relu", "Clip", "LeakyRelu")


@dataclass
class ActivationSites:
    tensors: dict[str, str] = field(default_factory=dict)  # module -> ONNX tensor of its output
    gates: dict[str, str] = field(default_factory=dict)  # SiLU module -> its Sigmoid's output tensor
    bounded: set[str] = field(default_factory=set)  # modules quantized over UNIT_RANGE
    hard: dict[str, str] = field(default_factory=dict)  # hard swish / sigmoid module -> its node's output


def activation_modules(model: nn.Module) -> dict[str, str]:
    """module name -> "gate", "hard_gate", "hard_swish", "silu", "sum" or "concat", for the
    modules worth a quantization point."""
    kinds = {**{c: "gate" for c in GATES}, **{c: "hard_gate" for c in HARD_GATES},
             **{c: "hard_swish" for c in HARD_SWISH}, **{c: "silu" for c in SILU},
             **{c: "sum" for c in SUMS}, **{c: "concat" for c in CONCATS}}
    return {name: kinds[type(mod).__name__] for name, mod in model.named_modules() if type(mod).__name__ in kinds}


def match_activation_sites(prepared: onnx.ModelProto, kinds: dict[str, str], values: dict[str, np.ndarray],
                           feed: dict, quantized: set[str]) -> ActivationSites:
    """`values`: each module's output on `feed`; `quantized`: tensors that already get Q/DQ (a
    SiLU whose input is float would gain nothing from int8 kernels)."""
    sites = ActivationSites()

    def of(kind: str) -> dict[str, np.ndarray]:
        return {m: v for m, v in values.items() if kinds[m] == kind}
    gates = find_tensor_sites(prepared, of("gate"), feed, ("Sigmoid",))
    sites.tensors.update(gates)
    sites.bounded.update(gates)
    for module, tensor in find_tensor_sites(prepared, of("hard_gate"), feed, ("HardSigmoid",)).items():
        node = hard_gate_node(prepared.graph.node, tensor)
        if node is not None and node.input[0] in quantized:
            sites.hard[module] = tensor
        else:
            sites.tensors[module] = tensor
            sites.bounded.add(module)
    for module, tensor in find_tensor_sites(prepared, of("hard_swish"), feed, ("HardSwish",)).items():
        node = hard_gate_node(prepared.graph.node, tensor)
        if node is not None and node.input[0] in quantized:
            sites.tensors[module] = tensor
            sites.hard[module] = tensor
    for module, tensor in find_tensor_sites(prepared, of("silu"), feed, ("Mul",)).items():
        inner = silu_gate(prepared, tensor)
        if inner is not None and inner[0] in quantized:
            sites.tensors[module] = tensor
            sites.gates[module] = inner[1]
    _joins(prepared, of, feed, quantized | set(sites.tensors.values()), sites)
    return sites


def _joins(prepared: onnx.ModelProto, of, feed: dict, quantized: set[str], sites: ActivationSites) -> None:
    """Concatenations and sums whose inputs are all quantized, and whose readers take int8 too: their
    outputs get Q/DQ, so onnxruntime runs QLinearConcat / QLinearAdd and the readers stay int8
    (GhostNet's ghost modules: a concat of two conv outputs added to the block's input). Not where
    a rectifier reads the output (a ResNet sum before its ReLU: the QuantizeLinear after the ReLU
    already makes it QLinearAdd, a point before it would only add a requantization), nor where a
    sum or concat left in float does (RepVGG's conv branches summed, then added to a float
    BatchNorm branch: a point there costs error and buys no kernel). Found as a fixpoint: a join
    dropped can leave another without int8 inputs or readers."""
    joins: dict[str, str] = {}
    for kind, op in (("concat", "Concat"), ("sum", "Add")):
        joins.update(find_tensor_sites(prepared, of(kind), feed, (op,)))
    producers = {o: n for n in prepared.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in prepared.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    chosen = dict(joins)
    while True:
        ints = quantized | set(chosen.values())
        keep = {m: t for m, t in chosen.items()
                if all(i in ints for i in producers[t].input)
                and all(r.op_type not in RECTIFIERS and (r.op_type not in ("Add", "Concat") or r.output[0] in ints)
                        for r in readers.get(t, []))}
        if keep == chosen:
            break
        chosen = keep
    sites.tensors.update(chosen)
