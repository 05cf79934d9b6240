"""Static int8: calibrate activation ranges in torch, quantize weights per channel, and build the
torch fake-quant model that the exported QDQ graph must reproduce."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from sqexport.contracts.quant import (
    UNIT_RANGE, ActQuant, Anchor, ObservedRanges, QuantParams, WeightQuant, act_params_from_range, quantize_bias,
    quantize_per_tensor_symmetric, quantize_weight_per_channel,
)
from sqexport.contracts.weight_grid import WeightGrid, as_grid
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.quantization.observers import RangeObserver, compute_range, observer_config
from sqexport.toolchain.quantization.params import fake_quant_act, fake_quant_dynamic, rectify

__all__ = ["calibrate", "calibrate_each", "shared_minmax_ranges", "quantize_weights", "quantize_embeddings", "fake_quant_model", "fake_quantized"]


def _within(p: ActQuant, hi: float) -> ActQuant:
    """Shrink the float32 scale by ulps until the top of the uint8 grid is <= hi: onnxruntime drops
    a Clip(0, hi) before a QuantizeLinear (and fuses QLinearConv) only if Q saturates inside it."""
    scale = np.float32(p.scale)
    while np.float32(255 - p.zero_point) * scale > np.float32(hi):
        scale = np.nextafter(scale, np.float32(0))
    return ActQuant(float(scale), p.zero_point)


def _rectified(bounds: tuple[float, float], rng: tuple[float, float]) -> tuple[float, float]:
    """(min, max) of rectify(out, bounds) from (min, max) of out: a clamp is monotonic."""
    lo, hi = bounds
    return min(max(rng[0], lo), hi), min(max(rng[1], lo), hi)


def _from_observed(anchors: list[Anchor], tensors: list[str], observed: ObservedRanges | None, method: Callable,
                   ) -> tuple[dict[str, ActQuant], dict[str, ActQuant], dict[str, ActQuant]] | None:
    """calibrate's result from ranges another pass observed on the same data (ObservedRanges), or
    None unless every anchor uses min-max and every range it needs is there."""
    if observed is None or tensors:
        return None
    if any(method(a.module) != "minmax" or a.module not in observed.inputs
           or (a.quantize_output and a.module not in observed.outputs) for a in anchors):
        return None
    observed.used = True
    ins = {a.module: act_params_from_range(*observed.inputs[a.module]) for a in anchors}
    outs = {a.module: _within(act_params_from_range(*_rectified(a.output_range, observed.outputs[a.module])),
                              a.output_range[1])
            for a in anchors if a.quantize_output}
    return ins, outs, {}


def shared_minmax_ranges(anchors: list[Anchor], tensors: Iterable[str], observed: ObservedRanges | None,
                         ) -> tuple[dict[str, ActQuant], dict[str, ActQuant], dict[str, ActQuant]] | None:
    """calibrate's min-max result from the ranges another pass observed, with no pass; None when
    they do not cover every anchor."""
    return _from_observed(anchors, list(tensors), observed, lambda name: "minmax")


def _method_of(observer: str | dict[str, str]) -> Callable[[str], str]:
    return (lambda name: observer.get(name, "minmax")) if isinstance(observer, dict) else (lambda name: observer)


def calibrate(model: nn.Module, anchors: list[Anchor], batches: Iterable, run: Callable,
              observer: str | dict[str, str] = "minmax", percentile: float = 99.99,
              tensors: Iterable[str] = (), observed: ObservedRanges | None = None,
              ) -> tuple[dict[str, ActQuant], dict[str, ActQuant], dict[str, ActQuant]]:
    """Observe anchor inputs (and rectified outputs) over `batches`; `run(model, batch)` runs one.

    `observer` is a registered observer name (kind "observer"), or a dict mapping module names to
    observer names (modules not in it use min-max). `tensors` names weightless modules whose
    outputs are quantized as they are (residual adds); the third dict holds their params.
    `observed`: min-max ranges of this model on the same batches from another stage's pass; when
    they cover every anchor (all min-max) the model is not run again (observed.used says so).
    """
    tensors = list(tensors)
    reused = _from_observed(anchors, tensors, observed, _method_of(observer))
    if reused is not None:
        return reused
    return calibrate_each(model, anchors, batches, run, [observer], percentile, tensors)[0]


def calibrate_each(model: nn.Module, anchors: list[Anchor], batches: Iterable, run: Callable,
                   observers: list[str | dict[str, str]], percentile: float = 99.99, tensors: Iterable[str] = (),
                   ) -> list[tuple[dict[str, ActQuant], dict[str, ActQuant], dict[str, ActQuant]]]:
    """calibrate's result for each of `observers`, from one pass over `batches`: the observers
    keep the samples any of the range methods reads."""
    tensors = list(tensors)
    methods = [_method_of(o) for o in observers]
    modules = dict(model.named_modules())

    def keeps(name):
        return any(observer_config(m(name), percentile=percentile).keeps_samples for m in methods)

    obs_in = {a.module: RangeObserver(keeps(a.module)) for a in anchors}
    obs_out = {a.module: RangeObserver(keeps(a.module)) for a in anchors if a.quantize_output}
    obs_t = {t: RangeObserver(keeps(t)) for t in tensors}
    bounds = {a.module: a.output_range for a in anchors}
    handles = [modules[t].register_forward_hook(lambda m, args, out, o=o: o.update(out.detach().numpy()))
               for t, o in obs_t.items()]
    for a in anchors:
        mod = modules[a.module]
        handles.append(mod.register_forward_pre_hook(
            lambda m, args, o=obs_in[a.module]: o.update(args[0].detach().numpy())))
        if a.quantize_output:
            handles.append(mod.register_forward_hook(
                lambda m, args, out, o=obs_out[a.module], b=a.output_range: o.update(rectify(out, b).detach().numpy())))
    run_with_hooks(model, handles, batches, run)

    results = []
    for method in methods:
        ins = {n: act_params_from_range(*compute_range(o, method(n), percentile)) for n, o in obs_in.items()}
        outs = {n: _within(act_params_from_range(*compute_range(o, method(n), percentile)), bounds[n][1])
                for n, o in obs_out.items()}
        done = {n: act_params_from_range(*compute_range(o, method(n), percentile)) for n, o in obs_t.items()}
        results.append((ins, outs, done))
    return results


def quantize_weights(model: nn.Module, anchors: list[Anchor], inputs: dict[str, ActQuant],
                     grid: int | WeightGrid = 127, biases: dict[str, np.ndarray] | None = None,
                     weights: dict[str, WeightQuant] | None = None) -> QuantParams:
    """`biases` overrides float biases by module name (bias correction), `weights` the nearest
    rounding (AdaRound: same scales); the model is not changed."""
    modules = dict(model.named_modules())
    biases, weights = biases or {}, weights or {}
    params = QuantParams(inputs=dict(inputs), anchors=list(anchors), weight_grid=as_grid(grid))
    for a in anchors:
        mod = modules[a.module]
        wq = weights.get(a.module) or quantize_weight_per_channel(mod.weight.detach().numpy(), grid)
        params.weights[a.module] = wq
        if a.quantize_bias and mod.bias is not None and a.module in inputs:
            bias = biases.get(a.module, mod.bias.detach().numpy())
            params.biases[a.module] = quantize_bias(bias, inputs[a.module].scale, wq.scale)
    return params


MIN_EMBEDDING_ROWS = 1024  # vocabulary-sized tables; position/segment tables are tiny and sensitive


def quantize_embeddings(model: nn.Module) -> dict[str, tuple[np.ndarray, float]]:
    """Per-tensor int8 for vocabulary-sized embedding tables (all-MiniLM-L6-v2: also quantizing the
    512-row position table cost 0.0009 mean cosine for 0.6 MB)."""
    return {name: quantize_per_tensor_symmetric(mod.weight.detach().numpy())
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Embedding) and mod.num_embeddings >= MIN_EMBEDDING_ROWS}


def _quantize_in_place(x: torch.Tensor, p) -> torch.Tensor:
    """The QDQ graph quantizes a skip-path tensor once, for the conv and the residual Add that both
    read it; in torch the Add reads the same tensor object later in forward (`out + x`), so
    quantizing it in place gives the Add the quantized values too (idempotent for a second reader
    with the same params)."""
    with torch.no_grad():
        x.copy_(fake_quant_act(x, p))
    return x


def _apply_fake_quant(model: nn.Module, params: QuantParams, saved: list, handles: list) -> None:
    """Swap int8 values into `model` and hook its activation quantizers, recording in `saved`
    (tensor, FP32 value) and `handles` what undoes it, as it goes."""
    modules = dict(model.named_modules())

    def swap(tensor: torch.Tensor, value: np.ndarray) -> None:
        saved.append((tensor, tensor.detach().clone()))
        tensor.copy_(torch.from_numpy(value))
    with torch.no_grad():
        for name, (q, scale) in params.embeddings.items():
            swap(modules[name].weight, q.astype(np.float32) * np.float32(scale))
        for a in params.anchors:
            mod = modules[a.module]
            swap(mod.weight, params.weights[a.module].dequantized())
            if a.module in params.biases:
                q, scale = params.biases[a.module]
                swap(mod.bias, q.astype(np.float32) * scale)
            if params.dynamic:
                handles.append(mod.register_forward_pre_hook(
                    lambda m, args: (fake_quant_dynamic(args[0]),) + tuple(args[1:])))
                continue
            p_in = params.inputs[a.module]
            quantize = _quantize_in_place if a.quantize_input_for_sum else fake_quant_act
            handles.append(mod.register_forward_pre_hook(
                lambda m, args, p=p_in, fq=quantize: (fq(args[0], p),) + tuple(args[1:])))
            if a.module in params.outputs:
                p_out = params.outputs[a.module]
                handles.append(mod.register_forward_hook(
                    lambda m, args, out, p=p_out, b=a.output_range: fake_quant_act(rectify(out, b), p)))
        for name, p_g in ([] if params.dynamic else params.gates.items()):
            _hook_gate(modules[name], p_g, handles)
        for name, p_t in ([] if params.dynamic else params.tensors.items()):
            handles.append(modules[name].register_forward_hook(lambda m, args, out, p=p_t: fake_quant_act(out, p)))


HARD_SWISH, HARD_SIGMOID = ("Hardswish", "HardSwish"), ("Hardsigmoid", "HardSigmoid")


def _gate(mod: nn.Module, x: torch.Tensor, p: ActQuant) -> torch.Tensor:
    """What the graph computes for the activation's gate (contracts.quant.QuantParams.gates): a
    hard gate is relu6(x + 3) quantized with `p` (HARD_GATE_RANGE) and read back on the unit grid
    (the same integers, scale 1/255: the division by 6); a SiLU's is its quantized sigmoid."""
    kind = type(mod).__name__
    if kind in HARD_SWISH or kind in HARD_SIGMOID:
        unit = act_params_from_range(*UNIT_RANGE)
        g = torch.round(fake_quant_act(x + 3.0, p) / p.scale) * unit.scale
        return x * g if kind in HARD_SWISH else g
    return x * fake_quant_act(torch.sigmoid(x), p)


def _hook_gate(mod: nn.Module, p: ActQuant, handles: list) -> None:
    """The activation as the graph computes it with its gate quantized (_gate). The input is kept
    by a pre-hook (an inplace activation overwrites it); the output hook (params.tensors) follows."""
    kept: list[torch.Tensor] = []

    def keep(m, args):
        kept.append(args[0].clone() if getattr(m, "inplace", False) else args[0])

    handles.append(mod.register_forward_pre_hook(keep))
    handles.append(mod.register_forward_hook(lambda m, args, out: _gate(m, kept.pop(), p)))


@contextmanager
def fake_quantized(model: nn.Module, params: QuantParams):
    """`model` itself computing what the QDQ graph computes, for the duration of the block: int8
    weights (and int32 biases, embedding tables) swapped in, activation quantizers hooked on; on
    exit the FP32 tensors and the model are exactly as before. No copy of the model is made
    (a BERT-base copy is 440 MB and, per fallback step, seconds)."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles: list = []
    try:
        _apply_fake_quant(model, params, saved, handles)
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for tensor, original in reversed(saved):
                tensor.copy_(original)


def fake_quant_model(model: nn.Module, params: QuantParams) -> nn.Module:
    """A fake-quantized copy of `model` that stays so (fake_quantized does it without a copy)."""
    fq = copy.deepcopy(model).eval()
    _apply_fake_quant(fq, params, [], [])
    return fq
