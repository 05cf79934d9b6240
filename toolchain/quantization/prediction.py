"""Predict the accuracy gate on data the fallback never scores: smooth statistics on calibration
data, a margin for the sample size, and a factor for how far the evaluation inputs differ.

What the prediction reads (and what it never reads):
- calibration data: FP32 outputs and the fake-quantized model's outputs (the quantization error);
- evaluation *inputs* through the FP32 model only: its activation statistics at every quantized
  layer and its output margins. Never labels of the evaluation data, never outputs of a quantized
  model on it: the gate measured there stays held out.

Embeddings (unit 1 - cosine): d_i = 1 - cos_i per calibration sample; the prediction is
(mean d + z * std d / sqrt(n)) * F. Logits (unit points): the quantization noise on the FP32
top-1-vs-runner-up margin is measured per calibration sample (Delta_i = quantized margin - FP32
margin), margins and noise relative to each sample's logit spread, the noise scaled by
k = sqrt(F) * (1 + z / sqrt(2n)) (z-sided upper bound of a spread from n samples); an evaluation
sample with FP32 margin m flips with probability P(k * Delta < -m) over the calibration samples
whose margins are nearest to m (a smooth quantity: a share of max(10, n/10) neighbours per sample).
Without labels the gate reads the top-1 FP32's softmax expects (runtime_check.accuracy.expected_top1),
so a flip costs what FP32 believes it does: the prediction is 100 * the mean over the evaluation
inputs of flip probability * (p_top - p_runner_up) of FP32's softmax, and never below the cost of
the flips seen on calibration data. With calibration labels a flip costs a point where FP32 was right.

F, the shift factor: the analytic noise-to-signal ratio the quantizers add at each quantized layer,
sum over layers on evaluation inputs / the same sum on calibration inputs (at least 1). Per layer:
activation noise = step^2 / 12 plus the energy clipped off by the calibrated range (static), or
step^2 / 12 of each tensor's own run-time range (dynamic), over the mean square input; weight noise
= |W_q - W|^2 / |W|^2 (the same on both, so it damps F where weights dominate the error).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from sqexport.contracts.quant import QuantParams
from sqexport.contracts.tasks import Task
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.quantization.params import energy

__all__ = ["Z", "LayerNoise", "layer_noise", "noise_hooks", "weight_noise", "shift_factor", "EvalView", "predict_drop"]

Z = 1.645  # one-sided 95%


@dataclass
class LayerNoise:
    """Sums over the inputs a layer saw: quantization noise energy, signal energy, element count."""

    noise: float = 0.0
    signal: float = 0.0

    def ratio(self) -> float:
        return self.noise / self.signal if self.signal > 0 else 0.0


def _static_noise(x: torch.Tensor, scale: float, zero_point: int) -> float:
    lo, hi = (0 - zero_point) * scale, (255 - zero_point) * scale
    clipped = energy(x - x.clamp(lo, hi))
    return scale * scale / 12.0 * x.numel() + clipped


def _dynamic_noise(x: torch.Tensor) -> float:
    step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255.0
    return step * step / 12.0 * x.numel()


@torch.no_grad()
def layer_noise(model: nn.Module, params: QuantParams, batches: Iterable, run: Callable) -> dict[str, LayerNoise]:
    """Analytic activation quantization noise of every anchor of `params` over FP32 `batches`."""
    stats, handles = noise_hooks(model, params)
    run_with_hooks(model, handles, batches, run)
    return stats


def noise_hooks(model: nn.Module, params: QuantParams) -> tuple[dict[str, LayerNoise], list]:
    """The hooks of layer_noise, to ride along another pass over the same data; the caller removes
    the handles (run_with_hooks does)."""
    modules = dict(model.named_modules())
    stats = {a.module: LayerNoise() for a in params.anchors}

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().float()
            st = stats[name]
            st.signal += energy(x)
            if params.dynamic:
                st.noise += _dynamic_noise(x)
            else:
                p = params.inputs[name]
                st.noise += _static_noise(x, p.scale, p.zero_point)
        return fn

    return stats, [modules[a.module].register_forward_pre_hook(hook(a.module)) for a in params.anchors]


def weight_noise(model: nn.Module, params: QuantParams) -> dict[str, float]:
    modules = dict(model.named_modules())
    out = {}
    for a in params.anchors:
        w = modules[a.module].weight.detach().numpy().astype(np.float64)
        err = params.weights[a.module].dequantized().astype(np.float64) - w
        denom = float((w * w).sum())
        out[a.module] = float((err * err).sum()) / denom if denom > 0 else 0.0
    return out


def shift_factor(calib: dict[str, LayerNoise], evals: dict[str, LayerNoise], weights: dict[str, float],
                 layers: Iterable[str]) -> float:
    """sum(NSR on eval inputs) / sum(NSR on calibration inputs) over `layers`, at least 1."""
    layers = list(layers)
    num = sum(evals[n].ratio() + weights.get(n, 0.0) for n in layers)
    den = sum(calib[n].ratio() + weights.get(n, 0.0) for n in layers)
    return max(1.0, num / den) if den > 0 else 1.0


@dataclass
class EvalView:
    """What the prediction may know of the evaluation data: FP32 outputs (postprocessed) only."""

    fp32_outputs: np.ndarray


def _margins(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP32 top-1 class, runner-up class, and the margin between them, per sample."""
    order = np.argsort(-logits, axis=-1)
    top, second = order[:, 0], order[:, 1]
    rows = np.arange(len(logits))
    return top, second, logits[rows, top] - logits[rows, second]


def _spread(logits: np.ndarray) -> np.ndarray:
    """Per sample: the RMS of the logits about their mean (how large this sample's logits are)."""
    return np.maximum(logits.std(-1), 1e-12)


def _flip_probability(margins: np.ndarray, noise: np.ndarray, calib_margins: np.ndarray) -> np.ndarray:
    """Per evaluation margin m: the share of the margin noise of the calibration samples with the
    nearest margins that would cancel it (noise < -m). Neighbours, not all samples: the noise
    depends on the margin (on digits-mlp, pairing every margin with every sample's noise
    overstated the flips 4x), and the empirical distribution, not a Gaussian of its RMS, keeps the
    heavy tail of quantization noise."""
    k = min(len(noise), max(10, len(noise) // 10))
    order = np.argsort(calib_margins)
    sorted_m, sorted_noise = calib_margins[order], noise[order]
    pos = np.clip(np.searchsorted(sorted_m, margins) - k // 2, 0, len(sorted_m) - k)
    windows = sorted_noise[pos[:, None] + np.arange(k)]  # (n_eval, k): the k nearest-ranked margins
    return (windows < -margins[:, None]).mean(1)


def _predict_embeddings(fp: np.ndarray, q: np.ndarray, factor: float) -> dict:
    b = fp / np.maximum(np.linalg.norm(fp, axis=-1, keepdims=True), 1e-12)
    m = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    d = 1.0 - (b.astype(np.float64) * m).sum(-1)
    n = len(d)
    upper = float(d.mean() + Z * d.std(ddof=1) / math.sqrt(n)) if n > 1 else float(d.mean())
    return {"predicted": upper * factor, "calib_mean": float(d.mean()), "calib_p95": float(np.percentile(d, 95)),
            "sample_margin": upper - float(d.mean()), "shift_factor": factor, "samples": n}


def _predict_logits(fp: np.ndarray, q: np.ndarray, view: EvalView, labels: np.ndarray | None,
                    factor: float) -> dict:
    n = len(fp)
    top, second, margin = _margins(fp.astype(np.float64))
    rows = np.arange(n)
    qd = q.astype(np.float64)
    delta = (qd[rows, top] - qd[rows, second]) - margin
    sigma = float(np.sqrt((delta ** 2).mean()))
    scale = math.sqrt(factor) * (1.0 + Z / math.sqrt(2.0 * n))
    e_top, e_second, eval_margin = _margins(view.fp32_outputs.astype(np.float64))
    # noise grows with the logits' own spread: compare margins and noise relative to it
    relative_noise = delta / _spread(fp.astype(np.float64))
    flips = _flip_probability(eval_margin / _spread(view.fp32_outputs.astype(np.float64)), relative_noise * scale,
                              margin / _spread(fp.astype(np.float64)))
    q_top = q.argmax(-1)
    observed_flips = q_top != top
    if labels is not None:  # calibration labels: a flip costs only where FP32 was right
        observed = 100.0 * float((observed_flips & (top == labels)).mean() - (observed_flips & (q_top == labels)).mean())
        smooth = 100.0 * float(flips.mean())
    else:  # what each flip costs in the top-1 FP32's softmax expects (the gate's metric)
        p_calib = np.exp(_log_softmax(fp))
        observed = 100.0 * float((observed_flips * (p_calib[rows, top] - p_calib[rows, q_top])).mean())
        p_eval = np.exp(_log_softmax(view.fp32_outputs))
        eval_rows = np.arange(len(p_eval))
        smooth = 100.0 * float((flips * (p_eval[eval_rows, e_top] - p_eval[eval_rows, e_second])).mean())
    log_p, log_q = _log_softmax(fp), _log_softmax(q)
    kl = float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())
    return {"predicted": max(smooth, observed), "smooth_flip_points": smooth, "calib_observed_points": observed,
            "margin_noise_rms": sigma, "kl_calib": kl, "shift_factor": factor, "samples": n,
            "eval_samples": int(len(eval_margin))}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def predict_drop(task: Task, fp_calib: np.ndarray, q_calib: np.ndarray, view: EvalView,
                 labels: np.ndarray | None, factor: float) -> dict:
    """The gate's drop expected on the evaluation data, in the gate's unit (`predicted`), with the
    quantities it came from."""
    if task.output == "embeddings":
        return _predict_embeddings(fp_calib, q_calib, factor)
    return _predict_logits(fp_calib, q_calib, view, labels, factor)
