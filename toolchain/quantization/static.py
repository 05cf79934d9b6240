"""Static int8: calibrate activation ranges in torch, quantize weights per channel, and build the
torch fake-quant model that the exported QDQ graph must reproduce."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from toolchain.hooks import run_with_hooks
from toolchain.quantization.observers import RangeObserver, compute_range
from toolchain.quantization.params import (
    ActQuant, WeightQuant, act_params_from_range, fake_quant_act, quantize_bias,
    quantize_per_tensor_symmetric, quantize_weight_per_channel,
)
from toolchain.quantization.plan import Anchor, rectify

__all__ = ["QuantParams", "calibrate", "quantize_weights", "quantize_embeddings", "fake_quant_model"]


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
    dynamic: bool = False  # activations quantized at run time (per tensor, min/max of each input)


def _within(p: ActQuant, hi: float) -> ActQuant:
    """Shrink the float32 scale by ulps until the top of the uint8 grid is <= hi: onnxruntime drops
    a Clip(0, hi) before a QuantizeLinear (and fuses QLinearConv) only if Q saturates inside it."""
    scale = np.float32(p.scale)
    while np.float32(255 - p.zero_point) * scale > np.float32(hi):
        scale = np.nextafter(scale, np.float32(0))
    return ActQuant(float(scale), p.zero_point)


def calibrate(model: nn.Module, anchors: list[Anchor], batches: Iterable, run: Callable,
              observer: str | dict[str, str] = "minmax", percentile: float = 99.99,
              tensors: Iterable[str] = (),
              ) -> tuple[dict[str, ActQuant], dict[str, ActQuant]] | tuple[dict, dict, dict]:
    """Observe anchor inputs (and rectified outputs) over `batches`; `run(model, batch)` runs one.

    `observer` is a method of observers.OBSERVERS, or a dict mapping module names to methods
    (modules not in it use min-max). With `tensors` (module names whose outputs are quantized as
    they are), a third dict holds their params.
    """
    modules = dict(model.named_modules())

    def method(name):
        return observer.get(name, "minmax") if isinstance(observer, dict) else observer

    obs_in = {a.module: RangeObserver(method(a.module) != "minmax") for a in anchors}
    obs_out = {a.module: RangeObserver(method(a.module) != "minmax") for a in anchors if a.quantize_output}
    tensors = list(tensors)
    obs_t = {t: RangeObserver(method(t) != "minmax") for t in tensors}
    bounds = {a.module: a.output_range for a in anchors}
    handles = [modules[t].register_forward_hook(lambda m, args, out, o=obs_t[t]: o.update(out.detach().numpy()))
               for t in tensors]
    for a in anchors:
        mod = modules[a.module]
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, o=obs_in[a.module]: o.update(args[0].detach().numpy())))
        if a.quantize_output:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, o=obs_out[a.module], b=a.output_range: o.update(rectify(out, b).detach().numpy())))
    run_with_hooks(model, handles, batches, run)

    ins = {n: act_params_from_range(*compute_range(o, method(n), percentile)) for n, o in obs_in.items()}
    outs = {n: _within(act_params_from_range(*compute_range(o, method(n), percentile)), bounds[n][1])
            for n, o in obs_out.items()}
    if not tensors:
        return ins, outs
    return ins, outs, {n: act_params_from_range(*compute_range(o, method(n), percentile)) for n, o in obs_t.items()}


def quantize_weights(model: nn.Module, anchors: list[Anchor], inputs: dict[str, ActQuant],
                     qmax: int = 127, biases: dict[str, np.ndarray] | None = None) -> QuantParams:
    """`biases` overrides float biases by module name (bias correction); the model is not changed."""
    modules = dict(model.named_modules())
    biases = biases or {}
    params = QuantParams(inputs=dict(inputs), anchors=list(anchors))
    for a in anchors:
        mod = modules[a.module]
        wq = quantize_weight_per_channel(mod.weight.detach().numpy(), qmax)
        params.weights[a.module] = wq
        if a.quantize_bias and mod.bias is not None and a.module in inputs:
            bias = biases.get(a.module, mod.bias.detach().numpy())
            params.biases[a.module] = quantize_bias(bias, inputs[a.module].scale, wq.scale)
    return params


def fake_quant_dynamic(x: torch.Tensor) -> torch.Tensor:
    """What DynamicQuantizeLinear does: uint8 over [min(x, 0), max(x, 0)] of this very tensor."""
    p = act_params_from_range(float(x.min()), float(x.max()))
    return fake_quant_act(x, p)


MIN_EMBEDDING_ROWS = 1024  # vocabulary-sized tables; position/segment tables are tiny and sensitive


def quantize_embeddings(model: nn.Module) -> dict[str, tuple[np.ndarray, float]]:
    """Per-tensor int8 for vocabulary-sized embedding tables (all-MiniLM-L6-v2: also quantizing the
    512-row position table cost 0.0009 mean cosine for 0.6 MB)."""
    return {name: quantize_per_tensor_symmetric(mod.weight.detach().numpy())
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Embedding) and mod.num_embeddings >= MIN_EMBEDDING_ROWS}


def fake_quant_model(model: nn.Module, params: QuantParams) -> nn.Module:
    """A copy of `model` computing exactly what the QDQ graph computes (up to int8 kernel rounding):
    dequantized int8 weights and int32 biases, fake-quantized inputs and rectified outputs."""
    fq = copy.deepcopy(model).eval()
    modules = dict(fq.named_modules())
    with torch.no_grad():
        for name, (q, scale) in params.embeddings.items():
            modules[name].weight.copy_(torch.from_numpy(q.astype(np.float32) * np.float32(scale)))
        for a in params.anchors:
            mod = modules[a.module]
            mod.weight.copy_(torch.from_numpy(params.weights[a.module].dequantized()))
            if a.module in params.biases:
                q, scale = params.biases[a.module]
                mod.bias.copy_(torch.from_numpy(q.astype(np.float32) * scale))
            if params.dynamic:
                mod.register_forward_pre_hook(lambda m, args: (fake_quant_dynamic(args[0]),) + tuple(args[1:]))
                continue
            p_in = params.inputs[a.module]
            mod.register_forward_pre_hook(lambda m, args, p=p_in: (fake_quant_act(args[0], p),) + tuple(args[1:]))
            if a.module in params.outputs:
                p_out = params.outputs[a.module]
                mod.register_forward_hook(
                    lambda m, args, out, p=p_out, b=a.output_range: fake_quant_act(rectify(out, b), p))
        for name, p_t in ([] if params.dynamic else params.tensors.items()):
            modules[name].register_forward_hook(lambda m, args, out, p=p_t: fake_quant_act(out, p))
    return fq
