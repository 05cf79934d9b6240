"""Accuracy-aware fallback: return the worst-quantized layers to FP32 until the gate would hold.

Layers are ranked by their *local* SNR: each anchor's int8 output (fake-quantized input, int8
weight) against its FP32 output on the same FP32 input, so an early layer's error does not make
every later layer look bad (onnxruntime's qdq_loss_debug compares whole-model activations, which
mixes the two). The decision runs on calibration data in torch, so the eval split stays held out
for the final gate.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from contracts.progress import NULL_PROGRESS, Progress
from toolchain.hooks import run_with_hooks
from toolchain.quantization.params import fake_quant_act
from toolchain.quantization.static import QuantParams

__all__ = ["local_snr_db", "fallback_until"]


@torch.no_grad()
def local_snr_db(model: nn.Module, params: QuantParams, batches: Iterable, run: Callable) -> dict[str, float]:
    """10*log10(|y|^2 / |y - y_q|^2) per anchor, summed over `batches`."""
    modules = dict(model.named_modules())
    signal = {a.module: 0.0 for a in params.anchors}
    noise = dict(signal)

    def hook(name):
        def fn(mod, args, out):
            x = fake_quant_act(args[0], params.inputs[name])
            w = torch.from_numpy(params.weights[name].dequantized())
            bias = mod.bias
            if name in params.biases:
                q, scale = params.biases[name]
                bias = torch.from_numpy(q.astype(np.float32) * scale)
            y = nn.functional.linear(x, w, bias) if isinstance(mod, nn.Linear) else mod._conv_forward(x, w, bias)
            if name in params.outputs:
                out, y = torch.relu(out), fake_quant_act(torch.relu(y), params.outputs[name])
            signal[name] += float((out.double() ** 2).sum())
            noise[name] += float(((out.double() - y.double()) ** 2).sum())
        return fn

    handles = [modules[a.module].register_forward_hook(hook(a.module)) for a in params.anchors]
    run_with_hooks(model, handles, batches, run)
    return {n: (10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else math.inf) for n in signal}


def without(params: QuantParams, modules: set[str]) -> QuantParams:
    keep = [a for a in params.anchors if a.module not in modules]
    return replace(params, anchors=keep,
                   inputs={k: v for k, v in params.inputs.items() if k not in modules},
                   outputs={k: v for k, v in params.outputs.items() if k not in modules},
                   weights={k: v for k, v in params.weights.items() if k not in modules},
                   biases={k: v for k, v in params.biases.items() if k not in modules})


def fallback_until(params: QuantParams, snr: dict[str, float], predicted_drop: Callable[[QuantParams], float],
                   limit: float, max_layers: int, progress: Progress = NULL_PROGRESS,
                   ) -> tuple[QuantParams, list[dict], list[float]]:
    """Drop anchors worst-SNR-first while predicted_drop(params) > limit, at most max_layers.

    Returns the final params, the fallen layers (with their SNR) and the drop trace
    (before any fallback, then after each)."""
    # one step = one prediction on calibration data; the first is before any fallback, and the
    # total is the most that can happen (the loop usually stops earlier)
    with progress.task("fallback (predicted drop)", min(max_layers, len(snr)) + 1, "steps") as task:
        trace = [predicted_drop(params)]
        task.advance()
        fallen: list[dict] = []
        for name in sorted(snr, key=snr.get):
            if trace[-1] <= limit or len(fallen) >= max_layers:
                break
            params = without(params, {name})
            fallen.append({"layer": name, "snr_db": round(snr[name], 2)})
            trace.append(predicted_drop(params))
            task.advance()
    return params, fallen, trace
