"""Accuracy-aware fallback: return the worst-quantized layers to FP32 until the gate would hold.

Which layers are worst: by what each does to the model's output, where that is affordable. Each
layer alone in int8 (every other quantizer off), the output's error against FP32 (1 - cosine),
on a few calibration samples: one fake-quant pass per layer (output_snr_db). It sees what a local
measure cannot, an early layer whose error every later layer carries: on torchvision's pretrained
MobileNetV2 it ranked the first depthwise conv and the stem worst (the layers NNCF's accuracy
control reverts), and 4 FP32 layers met the predicted gate where the local ranking needed 14
(1.94x FP32 instead of 1.38x). Where those passes would cost too much (counted in
multiply-accumulates, so the same on every run: large models), the *local* SNR ranks: each
anchor's int8 output (fake-quantized input, int8 weight) against its FP32 output on the same
FP32 input, so an early layer's error does not make every later layer look bad
(onnxruntime's qdq_loss_debug compares whole-model activations, which mixes the two). The
decision runs on calibration data in torch; extend_until then measures it on the evaluation split
(toolchain/fallback_confirm.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.quant import QuantParams
from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.quantization.params import energy, fake_quant_act, fake_quant_dynamic, rectify
from sqexport.toolchain.quantization.range_choice import output_error
from sqexport.toolchain.quantization.site_neighbors import without_orphan_sites
from sqexport.toolchain.quantization.static import fake_quantized

__all__ = ["FallbackPolicy", "MAX_PASSES", "MAX_CONFIRM_PASSES", "FIDELITY_PASSES", "local_snr_db", "output_snr_db",
           "layer_macs", "fallback_until", "fidelity_until", "extend_until", "without", "finite_db"]


@dataclass(frozen=True)
class FallbackPolicy:
    """Whether and how far a quantize method's layers may return to FP32 to meet the accuracy
    gate. Held by every quantize config that declares `supports_fallback = True`; in a recipe:
    `fallback: {enabled: true, max_fraction: 0.25, hard_max_fraction: 0.5}` (`fallback: false` is
    short for disabled). When the predicted gate still fails with `max_fraction` of the layers in
    FP32, the cap adapts up to `hard_max_fraction` (speed traded for accuracy; the report says so);
    set both equal for a fixed cap. `confirm`: the graph to be written is measured on the
    evaluation split (the gate's metric, in onnxruntime) and more of the ranking returns to FP32
    while it fails there (extend_until); `confirm: false` keeps the evaluation split unseen by
    every choice, so the gate stays a held-out measurement that may fail.

    `min_cosine`: the fidelity floor (fidelity_until). Once the gate's prediction holds, more of
    the ranking returns to FP32 while the int8 outputs on calibration data keep a mean cosine to
    the FP32 model's below it, if the floor is reached with at most `fidelity_mac_share` of the
    quantized layers' multiply-accumulates in FP32; otherwise nothing is added for it (speed is
    not spent on a floor it would not reach). 0 turns it off."""

    enabled: bool = True
    max_fraction: float = 0.25  # at most this share of the quantized layers falls back ...
    hard_max_fraction: float = 0.5  # ... unless the gate still fails: then up to this share
    confirm: bool = True  # measure the choice on the evaluation split; extend it while that fails
    min_cosine: float = 0.99
    fidelity_mac_share: float = 1 / 3

    def __post_init__(self):
        for key in ("enabled", "confirm"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"fallback.{key} must be true or false, got {getattr(self, key)!r}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ConfigError(f"fallback.max_fraction must be in [0, 1], got {self.max_fraction}")
        if not 0.0 <= self.hard_max_fraction <= 1.0:
            raise ConfigError(f"fallback.hard_max_fraction must be in [0, 1], got {self.hard_max_fraction}")
        for key in ("min_cosine", "fidelity_mac_share"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"fallback.{key} must be a number in [0, 1], got {value!r}")
        if self.hard_max_fraction < self.max_fraction:  # a recipe that only lowers max_fraction keeps it fixed
            object.__setattr__(self, "hard_max_fraction", self.max_fraction)

    @classmethod
    def coerce(cls, value) -> "FallbackPolicy":
        """A policy from what a recipe or a Python caller gives: a policy, a bool or a mapping."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, dict):
            known = ("enabled", "max_fraction", "hard_max_fraction", "confirm", "min_cosine", "fidelity_mac_share")
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ConfigError(f"fallback: unknown key(s) {', '.join(map(str, unknown))}; known: {', '.join(known)}")
            return cls(**value)
        raise ConfigError(f"fallback must be true, false or {{enabled, max_fraction}}, got {value!r}")

    def max_layers(self, n_layers: int) -> int:
        return int(n_layers * self.max_fraction) if self.enabled else 0

    def hard_max_layers(self, n_layers: int) -> int:
        return int(n_layers * self.hard_max_fraction) if self.enabled else 0


def _row_sample(x: torch.Tensor, out: torch.Tensor, fraction: float, generator: torch.Generator,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random `fraction` of the rows (tokens) of a Linear's input and output: each row is
    an independent input of the layer, so its local SNR needs no more than a subset of them. A
    fixed-seed random subset, not a stride: a stride would keep the same token positions of every
    sequence (e.g. always [CLS])."""
    x_rows, out_rows = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
    n = x_rows.shape[0]
    keep = max(1, math.ceil(n * fraction))
    if keep >= n:
        return x, out
    rows = torch.randperm(n, generator=generator)[:keep].sort().values
    return x_rows.index_select(0, rows), out_rows.index_select(0, rows)  # 4x faster than x_rows[rows]


@torch.no_grad()
def local_snr_db(model: nn.Module, params: QuantParams, batches: Iterable, run: Callable,
                 other_hooks: Iterable = (), row_fraction: float = 1.0, seed: int = 0) -> dict[str, float]:
    """10*log10(|y|^2 / |y - y_q|^2) per anchor, summed over `batches`. `other_hooks` (handles)
    ride along the same pass and are removed with these: one FP32 pass serves several statistics.
    `row_fraction` < 1: Linear anchors score that share of their input rows (tokens), drawn at
    random with `seed` (_row_sample): the int8 layer is run on those rows only, the costly part
    of this pass. Convolutions always score every position."""
    modules = dict(model.named_modules())
    bounds = {a.module: a.output_range for a in params.anchors}
    signal = {a.module: 0.0 for a in params.anchors}
    noise = dict(signal)
    generator = torch.Generator().manual_seed(seed)
    # each layer's int8 weights dequantized once per pass, not once per batch (BERT-base: 16
    # batches x 72 layers was 1.5 s); the cache peaks at one FP32 copy of the weights, as
    # fake_quantized's saved originals do, and is freed with the pass
    dequantized: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(mod, args, out):
            x = fake_quant_dynamic(args[0]) if params.dynamic else args[0]  # dynamic: the whole tensor's range
            if row_fraction < 1.0 and isinstance(mod, nn.Linear):
                x, out = _row_sample(x, out, row_fraction, generator)
            if not params.dynamic:
                x = fake_quant_act(x, params.inputs[name])
            w = dequantized.get(name)
            if w is None:
                w = dequantized[name] = torch.from_numpy(params.weights[name].dequantized())
            bias = mod.bias
            if name in params.biases:
                q, scale = params.biases[name]
                bias = torch.from_numpy(q.astype(np.float32) * scale)
            y = nn.functional.linear(x, w, bias) if isinstance(mod, nn.Linear) else mod._conv_forward(x, w, bias)
            if name in params.outputs:
                b = bounds[name]
                out, y = rectify(out, b), fake_quant_act(rectify(y, b), params.outputs[name])
            signal[name] += energy(out)
            noise[name] += energy(out - y)
        return fn

    handles = list(other_hooks) + [modules[a.module].register_forward_hook(hook(a.module)) for a in params.anchors]
    run_with_hooks(model, handles, batches, run)
    dequantized.clear()
    return {n: (10 * math.log10(signal[n] / noise[n]) if noise[n] > 0 else math.inf) for n in signal}


_MAC_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _macs(mod: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call: per output element, the weights that feed it."""
    if isinstance(mod, nn.Linear):
        return out.numel() * mod.in_features
    # convolutions (also transposed): the weights per output channel feed each output element
    return out.numel() * mod.weight.numel() // max(1, out.shape[1])


def _mac_hooks(model: nn.Module) -> tuple[list[int], list]:
    """Forward hooks summing the multiply-accumulates of every Conv / Linear module the pass runs."""
    total = [0]

    def hook(mod, args, out):
        total[0] += _macs(mod, out)
    return total, [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _MAC_LAYERS)]


@torch.no_grad()
def layer_macs(model: nn.Module, run_once: Callable[[nn.Module], object]) -> dict[str, int]:
    """Multiply-accumulates per Conv / Linear module (by name) of `run_once(model)`."""
    counts: dict[str, int] = {}

    def hook(name):
        def fn(mod, args, out):
            counts[name] = counts.get(name, 0) + _macs(mod, out)
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, _MAC_LAYERS)]
    try:
        run_once(model)
    finally:
        for h in handles:
            h.remove()
    return counts


@torch.no_grad()
def output_snr_db(model: nn.Module, params: QuantParams, outputs: Callable[[nn.Module], np.ndarray],
                  budget_macs: float, progress: Progress = NULL_PROGRESS) -> tuple[dict[str, float] | None, int]:
    """-10*log10(1 - cosine) of the model's outputs against FP32's, per anchor, with only that
    anchor in int8 (its weights and its own activation quantizers; shared tensors, gates and
    embedding tables off): lower = worse, as local_snr_db. `outputs(model)` runs the samples the
    ranking reads. Returns the scores and the multiply-accumulates of one pass (counted on the FP32
    reference pass); the scores are None when one pass per anchor would exceed `budget_macs`. A
    count, not a clock: the same model and data choose the same ranking on any machine and load
    (a timed estimate flipped between runs of one model)."""
    macs, handles = _mac_hooks(model)
    try:
        reference = outputs(model)
    finally:
        for h in handles:
            h.remove()
    names = [a.module for a in params.anchors]
    if macs[0] * len(names) > budget_macs:
        return None, macs[0]
    alone = replace(params, tensors={}, gates={}, embeddings={})
    scores: dict[str, float] = {}
    with progress.task("fallback ranking (output error per layer)", len(names), "layers") as task:
        for name in names:
            with fake_quantized(model, without(alone, set(names) - {name})):
                err = output_error(reference, outputs(model))
            scores[name] = -10 * math.log10(err) if err > 0 else math.inf
            task.advance()
    return scores, macs[0]


def without(params: QuantParams, modules: set[str]) -> QuantParams:
    """`params` with the layers `modules` in FP32, and the activation sites left with no int8
    layer next to them too (site_neighbors.py)."""
    keep = [a for a in params.anchors if a.module not in modules]
    tensors, gates = without_orphan_sites(params.tensors, params.gates, params.site_layers,
                                          {a.module for a in keep})
    return replace(params, anchors=keep,
                   inputs={k: v for k, v in params.inputs.items() if k not in modules},
                   outputs={k: v for k, v in params.outputs.items() if k not in modules},
                   weights={k: v for k, v in params.weights.items() if k not in modules},
                   biases={k: v for k, v in params.biases.items() if k not in modules},
                   tensors=tensors, gates=gates)


MAX_PASSES = 8  # fake-quant predictions one fallback may run, the first (all int8) included


def _bisect(failing: int, holding: int, holds: Callable[[int], bool], may_pass: Callable[[], bool]) -> int:
    """The smallest count found between a failing and a holding one while passes remain."""
    while holding - failing > 1 and may_pass():
        mid = (failing + holding) // 2
        if holds(mid):
            holding = mid
        else:
            failing = mid
    return holding


def _counts(cap: int, soft: int) -> list[int]:
    """How many of the worst layers to return, tried in this order until the limit holds: a
    geometric ladder up to the soft cap, then the hard cap (the ladder leaves passes for bisection)."""
    ladder = {1, max(1, soft // 4), max(1, soft // 2), soft, (soft + cap) // 2, cap}
    return sorted(k for k in ladder if 1 <= k <= cap)


def fallback_until(params: QuantParams, snr: dict[str, float], predicted_drop: Callable[[QuantParams], float],
                   limit: float, max_layers: int, progress: Progress = NULL_PROGRESS,
                   hard_max_layers: int | None = None,
                   rank: Callable[[], dict[str, float] | None] | None = None,
                   ) -> tuple[QuantParams, list[dict], list[float]]:
    """Return the k worst-SNR layers to FP32, for the smallest k (found in at most MAX_PASSES
    predictions) whose predicted drop is within `limit`: k climbs a ladder (1, a quarter, half of
    max_layers, max_layers, then up to hard_max_layers: the adaptive cap), then bisects between
    the last failing and the first holding k. Each prediction is a fake-quant pass, so one layer
    per pass cost one pass per layer (37 passes on a 110M encoder). When no k up to the cap holds,
    the cap's k is kept: the most the policy allows, the gate then reports the failure.

    `rank`: scores by which to order the layers instead of `snr` (lower = worse, output_snr_db),
    called only once a layer has to fall back; None from it keeps the `snr` order.

    Returns the final params, the fallen layers (worst first, with their SNR) and the predictions
    made, in order; the last entry is the chosen k's prediction."""
    cap = max(max_layers, hard_max_layers or 0)
    order = sorted(snr, key=snr.get)
    ranked: dict[str, float] = {}
    cap = min(cap, len(order))
    soft = min(max_layers, cap)
    predictions: dict[int, float] = {}
    trace: list[float] = []
    made: list[int] = []  # k of every prediction, in order

    with progress.task("fallback (predicted drop)", MAX_PASSES, "passes") as task:
        def predict(k: int) -> float:
            if k not in predictions:
                predictions[k] = predicted_drop(without(params, set(order[:k])) if k else params)
                trace.append(predictions[k])
                made.append(k)
                task.advance()
            return predictions[k]

        chosen = 0
        if predict(0) > limit and cap > 0:
            ranked = (rank() if rank is not None else None) or {}
            if ranked:
                order = sorted(ranked, key=ranked.get)
            failing, holding = 0, None
            for k in _counts(cap, soft):  # at most 6 rungs: with the first pass, within MAX_PASSES
                if predict(k) <= limit:
                    holding = k
                    break
                failing = k
            if holding is None:
                chosen = failing  # the cap: the most the policy allows
            else:
                chosen = _bisect(failing, holding, lambda k: predict(k) <= limit, lambda: len(made) < MAX_PASSES)
    if made[-1] != chosen:
        trace.append(predictions[chosen])  # the chosen k's prediction last (no extra pass)
    final = without(params, set(order[:chosen])) if chosen else params
    fallen = [{"layer": n, "snr_db": round(snr[n], 2)} | ({"output_snr_db": finite_db(ranked[n])} if ranked else {})
              for n in order[:chosen]]
    return final, fallen, trace


# fake-quant passes the fidelity floor may add: the budget's count, a ladder 1, 2, 4, 8, 16 and bisection
# after it (EfficientNet-Lite0, random weights: 8 layers missed the floor, 16 held it, and 6 passes
# left none to look between)
FIDELITY_PASSES = 10


def fidelity_until(params: QuantParams, fallen: list[str], ranking: Callable[[], list[str]],
                   measure: Callable[[QuantParams], tuple[float, float]], limit: float, floor: float,
                   macs: dict[str, int], max_mac_share: float, progress: Progress = NULL_PROGRESS,
                   ) -> tuple[list[str], dict]:
    """The fidelity floor: with `fallen` in FP32 (the gate's choice, which holds), more layers
    return to FP32 in the order of `ranking()` (worst first; called only if needed) while the
    outputs' cosine to FP32 stays below `floor`: first the most the budget allows (if that misses
    the floor, nothing more is tried), then len(fallen) + 1, + 2, + 4, ... and bisection, at most
    FIDELITY_PASSES passes. `measure(params)` gives (predicted drop, cosine); a count holds
    when the cosine reaches the floor and the drop stays within `limit`. Counts are limited to the
    longest run of the order whose layers hold at most `max_mac_share` of the multiply-accumulates
    of `params`' layers (`macs`): the floor is worth some speed, not an FP32 model. When no count
    within that holds, nothing is added: speed is not spent on a floor it would not reach.

    Why a floor at all: the gate reads what a user's data decides (top-1 of a few classes, a
    threshold), which can hold while the int8 outputs drift from FP32's; randomly initialized
    networks, whose early layers' rounding every later layer amplifies, are the extreme case
    (EfficientNet-Lite0: cosine 0.973 with every layer int8, 0.991 with its 16 earliest in FP32).

    Returns the layers in FP32 (worst first) and the report's record."""
    start = len(fallen)
    measured: dict[int, tuple[float, float]] = {}
    order = list(fallen)

    def at(k: int) -> tuple[float, float]:
        if k not in measured:
            measured[k] = measure(without(params, set(order[:k])) if k else params)
        return measured[k]

    def holds(k: int) -> bool:
        drop, cosine = at(k)
        return cosine >= floor and drop <= limit

    total = sum(macs.get(a.module, 0) for a in params.anchors) or 1
    # the gate's chosen count was predicted already: no pass
    record = {"min_cosine": floor, "max_mac_share": round(max_mac_share, 4), "cosine_before": round(at(start)[1], 6)}
    chosen = start
    if not holds(start):
        with progress.task("fidelity floor (output cosine)", FIDELITY_PASSES, "passes") as task:
            order += [n for n in ranking() if n not in set(fallen)]
            cap, used = start, sum(macs.get(n, 0) for n in order[:start])
            while cap < len(order) and used + macs.get(order[cap], 0) <= max_mac_share * total:
                used += macs.get(order[cap], 0)
                cap += 1
            # the most the budget allows first: when even that misses the floor, one pass said so
            # (the ladder would spend all its passes finding it out)
            passes = 1 if cap > start else 0
            task.advance(passes)
            if passes and holds(cap):
                failing, holding, step = start, cap, 1
                while start + step < cap and passes < FIDELITY_PASSES:
                    k = start + step
                    step *= 2
                    passes += 1
                    task.advance()
                    if holds(k):
                        holding = k
                        break
                    failing = k

                def may_pass() -> bool:
                    nonlocal passes
                    passes += 1
                    task.advance()
                    return passes <= FIDELITY_PASSES
                chosen = _bisect(failing, holding, holds, may_pass)
    share = sum(macs.get(n, 0) for n in order[:chosen]) / total
    record.update(cosine=round(at(chosen)[1], 6), reached=at(chosen)[1] >= floor, added_layers=chosen - start,
                  fp32_mac_share=round(share, 4),
                  measured=[{"fallback_layers": k, "cosine": round(c, 6), "predicted_drop": round(d, 6)}
                            for k, (d, c) in sorted(measured.items())])
    if chosen > start:
        record["why"] = (f"the int8 outputs' cosine to FP32 on calibration data was {record['cosine_before']:.4f} < "
                         f"{floor:g}: {chosen - start} more layer(s) in FP32 ({share:.0%} of the multiply-accumulates) "
                         f"bring it to {record['cosine']:.4f}")
    elif not record["reached"]:
        record["why"] = (f"the int8 outputs' cosine to FP32 on calibration data is {record['cosine_before']:.4f} < "
                         f"{floor:g}, and no measured count of FP32 layers within {max_mac_share:.0%} of the "
                         "multiply-accumulates reached it: none added for it")
    return order[:chosen], record


MAX_CONFIRM_PASSES = 8  # measured passes over the evaluation split one confirmation may run


def extend_until(params: QuantParams, fallen: list[str], ranking: Callable[[], list[str]],
                 measured_drop: Callable[[QuantParams], float], limit: float, cap: int,
                 progress: Progress = NULL_PROGRESS) -> tuple[list[str], list[tuple[int, float]]]:
    """The fallback's choice (`fallen` in FP32) measured with `measured_drop` (the gate's metric on
    the evaluation split); while that exceeds `limit`, more layers return to FP32 in the order of
    `ranking()` (worst first; called only then): len(fallen) + 1, + 2, + 4, ... up to `cap`, then
    bisection between the last failing and the first holding count, at most MAX_CONFIRM_PASSES
    measurements in all.

    Why: the prediction reads calibration data only, and a small evaluation split turns on single
    samples it cannot foresee (16 crops of 2 photos: one changed prediction of a sample FP32 itself
    barely decides costs 1.3 points). When no count holds, the one with the lowest measured drop
    is kept (the fewest layers among equals). Returns the layers in FP32 (worst first) and the
    (count, drop) pairs measured, in order."""
    start = len(fallen)
    order = list(fallen)
    measured: dict[int, float] = {}
    trace: list[tuple[int, float]] = []

    with progress.task("fallback confirmation (evaluation split)", MAX_CONFIRM_PASSES, "passes") as task:
        def measure(k: int) -> float:
            if k not in measured:
                measured[k] = measured_drop(without(params, set(order[:k])) if k else params)
                trace.append((k, measured[k]))
                task.advance()
            return measured[k]

        if measure(start) <= limit:
            return order, trace
        order += [n for n in ranking() if n not in set(fallen)]
        cap = min(cap, len(order))
        failing, holding, step = start, None, 1
        while failing < cap and len(trace) < MAX_CONFIRM_PASSES:
            k = min(cap, start + step)
            step *= 2
            if measure(k) <= limit:
                holding = k
                break
            failing = k
        if holding is None:
            best = min(measured, key=lambda c: (measured[c], c))
            return order[:best], trace
        holding = _bisect(failing, holding, lambda k: measure(k) <= limit, lambda: len(trace) < MAX_CONFIRM_PASSES)
    return order[:holding], trace


def finite_db(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None  # JSON has no infinity
