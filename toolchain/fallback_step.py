"""The accuracy-aware fallback step of quantization: rank the int8 layers, return the worst to
FP32 until the gate's predicted drop holds (quantization/fallback.py, prediction.py), and hand back
the confirmation that measures the choice on the evaluation split once the speed check has had
its say (fallback_confirm.py)."""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from sqexport.contracts.progress import NULL_PROGRESS, Progress, track
from sqexport.contracts.quant import QuantParams
from sqexport.contracts.tasks import get_task
from sqexport.models.spec import ModelSpec, first_samples, leading_samples
from sqexport.runtime_check.accuracy import drop_in_unit, task_metrics
from sqexport.toolchain.fallback_confirm import ExportedGraphs, confirm_on_eval
from sqexport.toolchain.quantization.fallback import (
    FallbackPolicy, fallback_until, fidelity_until, finite_db, layer_macs, local_snr_db, output_snr_db, without,
)
from sqexport.toolchain.quantization.range_choice import output_error
from sqexport.toolchain.quantization.prediction import (
    EvalView, layer_noise, noise_hooks, predict_drop, shift_factor, weight_noise,
)
from sqexport.toolchain.quantization.smoothing import public_name
from sqexport.toolchain.quantization.static import fake_quantized

__all__ = ["apply_fallback", "model_outputs"]

FALLBACK_SAMPLES = 512  # calibration samples scored per fallback step (fewer if the data has fewer)
# share of each Linear's input rows (tokens) its local SNR scores (fallback.local_snr_db): the int8
# re-run of every layer was over half the cost of the SNR pass (all-MiniLM-L6-v2: 8.6 CPU s, a plain
# FP32 pass 3.9). Half the rows: 6.5 CPU s, every layer within 0.22 dB (RMS 0.06 dB) of all rows
# and the same 8 worst layers; a quarter saved only 0.25 s more for up to 0.6 dB
SNR_ROW_FRACTION = 0.5
# the fallback ranks layers by their output error alone in int8 (fallback.output_snr_db) on this many
# calibration samples (pretrained MobileNetV2: 16 crops ranked worse than 32, 14 FP32 layers instead of 4
# for the same predicted gate), unless one pass per layer would exceed the budget; then by local SNR.
# The budget counts multiply-accumulates, so the choice is the same on every run: the MobileNetV2
# ranking (53 layers x 32 crops x 0.3 GMAC, 5.1e11) took 42 s on 2 cores, ~12 GMAC/s with the
# fake-quant overhead; 1.5e12 is about two minutes there (EfficientNet-Lite0 6.4e11 and -B0 1.0e12
# rank by output error; DeiT-Tiny, ResNet-50 and BERT-size encoders by local SNR)
RANK_SAMPLES = 32
RANK_BUDGET_MACS = 1.5e12


def model_outputs(spec: ModelSpec, model: torch.nn.Module, batches: list[dict], progress: Progress = NULL_PROGRESS,
                  what: str = "") -> np.ndarray:
    """The model's postprocessed outputs over `batches`; `what` names a progress bar."""
    batches = track(progress, batches, what, "batches") if what else batches
    return np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in batches])


def _fallback_batches(spec: ModelSpec) -> list[dict]:
    return first_samples(spec.calib_batches, FALLBACK_SAMPLES)


class _Predictor:
    """predicted drop on the evaluation data for a candidate set of params (prediction.py): the
    FP32 statistics of calibration and evaluation inputs are gathered once, then each call runs the
    fake-quantized model (in place, no copy) on the calibration samples only."""

    def __init__(self, work, spec: ModelSpec, params: QuantParams, calib_noise: dict, fp32_calib: np.ndarray,
                 progress: Progress, work_fp32: np.ndarray | None = None):
        self.work, self.spec, self.task = work, spec, get_task(spec.task)
        self.batches = _fallback_batches(spec)
        self.dense = fp32_calib
        # `work` itself in FP32 on the same samples: the fidelity floor measures quantization's own
        # error, not pruning's
        self.reference = fp32_calib if work_fp32 is None else work_fp32
        self.measured: dict[frozenset, tuple[float, float]] = {}  # int8 layers -> (predicted drop, cosine)
        self.labels = spec.calib_labels[:len(self.dense)] if spec.calib_labels is not None else None
        self.calib_noise = calib_noise
        eval_out: list[np.ndarray] = []

        def run(model, batch):  # FP32 outputs of the evaluation inputs, collected while the hooks observe
            eval_out.append(spec.postprocess(spec.torch_outputs(model, batch), batch))
        self.eval_noise = layer_noise(work, params, track(progress, spec.eval_batches, "evaluation inputs (FP32)",
                                                          "batches"), run)
        self.view = EvalView(np.concatenate(eval_out))
        self.weight_noise = weight_noise(work, params)
        self.last: dict = {}

    def factor(self, params: QuantParams) -> float:
        return shift_factor(self.calib_noise, self.eval_noise, self.weight_noise, [a.module for a in params.anchors])

    def __call__(self, params: QuantParams) -> float:
        with fake_quantized(self.work, params):
            q = model_outputs(self.spec, self.work, self.batches)
        self.last = predict_drop(self.task, self.dense, q, self.view, self.labels, self.factor(params))
        self.measured[_key(params)] = (self.last["predicted"], 1.0 - output_error(self.reference[:len(q)], q))
        return self.last["predicted"]

    def with_cosine(self, params: QuantParams) -> tuple[float, float]:
        """(predicted drop, mean output cosine to FP32) of `params`; a pass only if not yet run."""
        key = _key(params)
        if key not in self.measured:
            self(params)
        return self.measured[key]


def _key(params: QuantParams) -> frozenset:
    return frozenset(a.module for a in params.anchors)


def apply_fallback(work: torch.nn.Module, spec: ModelSpec, params: QuantParams, policy: FallbackPolicy,
                   accuracy_limit: float, progress: Progress = NULL_PROGRESS,
                   work_is_dense: bool = False,
                   exported: ExportedGraphs | None = None,
                   ) -> tuple[QuantParams, dict, Callable | None]:
    """Rank layers by local SNR (always reported); with an enabled policy, return the worst to
    FP32 until the gate's drop predicted for the evaluation data holds (prediction.py).
    Returns the params, the report's fallback fields (SNRs, prediction, what fell back) and, with
    `exported` (the graphs the gate will run, on the evaluation split in onnxruntime) and
    `policy.confirm`, `confirm(kept_for_speed)`: the choice measured on the evaluation split with
    the layers the speed check keeps in FP32, extended while the gate fails there
    (fallback_confirm.py); it returns the final params and the report fields it updates.

    One FP32 pass over the calibration data serves the SNR ranking, the calibration-side noise
    statistics and the FP32 outputs; with `work_is_dense` (no pruning: smoothing and folding keep
    the function) those outputs are the dense reference too, so the dense model is not run again."""
    info: dict = {}
    calib_noise, noise_handles = noise_hooks(work, params)
    n_fallback = sum(len(next(iter(b.values()))) for b in _fallback_batches(spec))
    fp32: list[np.ndarray] = []

    def run(model, batch):
        out = spec.torch_outputs(model, batch)
        if sum(len(o) for o in fp32) < n_fallback:
            fp32.append(spec.postprocess(out, batch))
    snr = local_snr_db(work, params, track(progress, spec.calib_batches, "local SNR per layer", "batches"), run,
                       noise_handles, row_fraction=SNR_ROW_FRACTION)
    info["snr_sample"] = {"calibration_samples": sum(len(next(iter(b.values()))) for b in spec.calib_batches),
                          "linear_row_fraction": SNR_ROW_FRACTION,
                          "how": "Linear layers: a fixed-seed random share of the token rows of every batch; "
                                 "convolutions: every position"}
    public = public_name(work)
    info["worst_layers_snr_db"] = [{"layer": public(n), "snr_db": round(v, 2)}
                                   for n, v in sorted(snr.items(), key=lambda kv: kv[1])[:8]]
    # every layer in model order, for the report's SNR plot; an exact layer (no noise) has no finite
    # SNR and JSON has no infinity, so it is null
    info["layers_snr_db"] = {public(n): (round(v, 2) if math.isfinite(v) else None) for n, v in snr.items()}
    if not policy.enabled:
        return params, info, None
    if not spec.calib_batches:
        info["fallback_skipped"] = "no calibration data to predict the gate on; pass --calib-data"
        return params, info, None
    work_fp32 = np.concatenate(fp32)
    dense = work_fp32 if work_is_dense else model_outputs(spec, spec.model, _fallback_batches(spec), progress,
                                                          "FP32 outputs for fallback")
    predictor = _Predictor(work, spec, params, calib_noise, dense, progress, work_fp32)
    # Measured against the dense model, as the gate is; if pruning alone already exceeds the
    # limit, returning layers to FP32 cannot help and would only cost speed.
    task = get_task(spec.task)
    pruned_drop = drop_in_unit(task, task_metrics(task, dense, work_fp32, predictor.labels))
    info.update(predicted_drop_limit=accuracy_limit, predicted_drop_fp32_pruned=round(pruned_drop, 6))
    # pruning alone using the whole budget (within float noise) leaves nothing for int8 to spend:
    # returning layers to FP32 could not make the gate hold, it would only cost speed
    if pruned_drop > 0 and pruned_drop >= accuracy_limit * (1 - 1e-9):
        info["fallback_skipped"] = "the pruned FP32 model alone exceeds the accuracy limit"
        return params, info, None
    n, cap, hard = len(params.anchors), policy.max_layers(len(params.anchors)), policy.hard_max_layers(len(params.anchors))
    first: dict = {}

    passes = [0]

    def predict(p: QuantParams) -> float:
        value = predictor(p)
        passes[0] += 1
        first.setdefault("details", predictor.last)
        return value
    ranking: dict = {}
    scores: dict[str, float] = {}

    def rank() -> dict[str, float] | None:
        if ranking:  # computed once: the prediction's search and the confirmation share it
            return scores or None
        batches = leading_samples(spec.calib_batches, RANK_SAMPLES)
        start = time.perf_counter()
        found, macs = output_snr_db(work, params, lambda model: model_outputs(spec, model, batches),
                                    RANK_BUDGET_MACS, progress)
        scores.update(found or {})
        ranking.update(by="output error of each layer alone in int8" if scores else "local SNR",
                       samples=sum(len(next(iter(b.values()))) for b in batches),
                       seconds=round(time.perf_counter() - start, 2), macs_per_pass=macs)
        if not scores:
            ranking["why"] = (f"one pass per layer ({len(params.anchors)} x {macs:.3g} multiply-accumulates) "
                              f"would exceed the ranking's budget of {RANK_BUDGET_MACS:.3g}")
        return scores or None
    computed = params
    params, fallen, trace = fallback_until(params, snr, predict, accuracy_limit, cap, progress, hard, rank)
    if policy.min_cosine > 0 and trace[-1] <= accuracy_limit:
        params, fallen, info["fidelity_floor"] = _fidelity_floor(work, spec, computed, fallen, policy, accuracy_limit,
                                                                 predictor, lambda: _ranking(rank() or snr), snr,
                                                                 scores, progress)
        passes[0] += len(info["fidelity_floor"]["measured"]) - 1
        if info["fidelity_floor"]["added_layers"]:
            trace.append(predictor.measured[_key(params)][0])  # the chosen count's prediction stays last
    if ranking:
        info["fallback_ranking"] = ranking
    info.update(fallback=[{**f, "layer": public(f["layer"])} for f in fallen],
                predicted_drop_trace=[round(t, 6) for t in trace], quantized_layers=len(params.anchors),
                fallback_passes=passes[0],
                prediction={"before_fallback": _rounded(first["details"]), "final": _rounded(predictor.last),
                            "uses": "calibration outputs (FP32 and fake-quant); evaluation inputs through the "
                                    "FP32 model only (activation statistics, output margins); no evaluation labels"},
                fallback_cap={"layers": n, "max_layers": cap, "hard_max_layers": hard, "used": len(fallen),
                              "raised": _for_gate(fallen) > cap, "holds": trace[-1] <= accuracy_limit})
    if not (policy.confirm and exported is not None and spec.eval_batches):
        return params, info, None

    def confirm(kept_for_speed: set[str]) -> tuple[QuantParams, dict]:
        """The choice measured on the evaluation split once the speed check has kept its layers in
        FP32 (the graph the gate will run), extended while the gate fails there."""
        dense_eval = exported.baseline()
        if dense_eval is None:
            dense_eval = predictor.view.fp32_outputs if work_is_dense else model_outputs(
                spec, spec.model, spec.eval_batches, progress, "FP32 evaluation outputs (fallback confirmation)")
        base = without(computed, kept_for_speed)
        chosen, record = confirm_on_eval(task, spec, base, fallen,
                                         lambda: [m for m in _ranking(rank() or snr) if m not in kept_for_speed],
                                         snr, exported, dense_eval, accuracy_limit, max(cap, hard), progress)
        chosen = [f | ({"output_snr_db": finite_db(scores[f["layer"]])} if scores and "output_snr_db" not in f
                       else {}) for f in chosen]
        updates = {"fallback": [{**f, "layer": public(f["layer"])} for f in chosen],
                   "quantized_layers": n - len(chosen), "fallback_confirmation": record,
                   # measured now, no longer predicted
                   "fallback_cap": {**info["fallback_cap"], "used": len(chosen), "raised": _for_gate(chosen) > cap,
                                    "holds": record["holds"]}}
        return without(base, {f["layer"] for f in chosen}), updates
    return params, info, confirm


def _fidelity_floor(work: torch.nn.Module, spec: ModelSpec, computed: QuantParams, fallen: list[dict],
                    policy: FallbackPolicy, accuracy_limit: float, predictor: _Predictor,
                    ranking: Callable[[], list[str]], snr: dict[str, float], scores: dict[str, float],
                    progress: Progress) -> tuple[QuantParams, list[dict], dict]:
    """fallback.fidelity_until after the gate's choice: the params, the fallen layers (those it
    adds marked `chosen_by: fidelity floor`) and the report's record."""
    first = first_samples(spec.calib_batches, 1)
    macs = layer_macs(work, lambda model: model_outputs(spec, model, first))
    names, record = fidelity_until(computed, [f["layer"] for f in fallen], ranking, predictor.with_cosine,
                                   accuracy_limit, policy.min_cosine, macs, policy.fidelity_mac_share, progress)
    record["samples"] = sum(len(next(iter(b.values()))) for b in predictor.batches)
    record["measure"] = ("mean cosine of the outputs to the FP32 model's on calibration samples, "
                         "the fake-quantized model in torch")
    added = [{"layer": n, "snr_db": round(snr[n], 2), "chosen_by": "fidelity floor"}
             | ({"output_snr_db": finite_db(scores[n])} if scores else {}) for n in names[len(fallen):]]
    return without(computed, set(names)), list(fallen) + added, record


def _for_gate(fallen: list[dict]) -> int:
    """How many of the fallen layers the gate needed (the fidelity floor's are not the cap's)."""
    return sum(f.get("chosen_by") != "fidelity floor" for f in fallen)


def _ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=scores.get)  # worst first, as fallback_until orders them


def _rounded(d: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}
