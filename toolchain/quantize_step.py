"""The quantization step of the pipeline, in four parts:
plan (where the exported graph takes int8) -> compute params in torch (the registered method)
-> fallback (worst layers back to FP32, if the method supports it) -> write the ONNX model."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from torch.ao.nn.quantized import FloatFunctional

from sqexport.contracts.errors import DataError, ExportError, first_line
from sqexport.contracts.progress import NULL_PROGRESS, Progress, track
from sqexport.contracts.quant import HARD_GATE_RANGE, UNIT_RANGE, Anchor, ObservedRanges, QuantParams, act_params_from_range
from sqexport.contracts.targets import get_target
from sqexport.contracts.tasks import LABELS_KEY, get_task
from sqexport.exporters.coverage import weight_layer_coverage
from sqexport.exporters.dynamic import insert_dynamic
from sqexport.exporters.elementwise import pools_from_means
from sqexport.exporters.graph import merge_duplicate_nodes, own_weights, set_metadata
from sqexport.exporters.qdq import Site, anchors_for, find_embedding_sites, find_sites, insert_qdq
from sqexport.exporters.tensor_sites import find_tensor_sites
from sqexport.models.spec import ModelSpec, first_samples, leading_samples
from sqexport.runtime_check.accuracy import drop_in_unit, task_metrics
from sqexport.contracts.weight_grid import WeightGrid
from sqexport.runtime_check.isa import FULL_QMAX, REDUCED_QMAX, weight_grid
from sqexport.runtime_check.verify import fidelity_batches
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.pruning import prunable_layers
from sqexport.toolchain.quantization.activation_sites import ActivationSites, activation_modules, match_activation_sites
from sqexport.toolchain.quantization.static import fake_quantized
from sqexport.toolchain.quantization.fallback import (
    FallbackPolicy, fallback_until, finite_db, local_snr_db, output_snr_db, without,
)
from sqexport.toolchain.quantization.range_choice import CHOICE_SAMPLES, output_error
from sqexport.toolchain.fallback_confirm import confirm_on_eval, exported_outputs
from sqexport.toolchain.quantization.prediction import (
    EvalView, layer_noise, noise_hooks, predict_drop, shift_factor, weight_noise,
)
from sqexport.toolchain.quantization.smoothing import SmoothedLinear
from sqexport.toolchain.quantization.speed_check import SpeedCheck, keep_fp32_where_faster
from sqexport.toolchain.recipe import Stage
from sqexport.toolchain.stages import QuantContext

__all__ = ["QuantPlan", "plan_quantization", "public_name", "compute_params", "apply_fallback", "settle_params", "write_model",
           "quantize_to_onnx", "torch_reference", "weight_range_info"]

FALLBACK_SAMPLES = 512  # calibration samples scored per fallback step (fewer if the data has fewer)
# share of each Linear's input rows (tokens) its local SNR scores (fallback.local_snr_db): the int8
# re-run of every layer was over half the cost of the SNR pass (all-MiniLM-L6-v2: 8.6 CPU s, a plain
# FP32 pass 3.9). Half the rows: 6.5 CPU s, every layer within 0.22 dB (RMS 0.06 dB) of all rows
# and the same 8 worst layers; a quarter saved only 0.25 s more for up to 0.6 dB
SNR_ROW_FRACTION = 0.5
# the fallback ranks layers by their output error alone in int8 (fallback.output_snr_db) on this many
# calibration samples, unless that would take longer than the budget (pretrained MobileNetV2: 53
# layers x 32 crops, 42 s on 2 cores; 16 crops took 18 s but ranked worse: 14 FP32 layers instead of 4
# for the same predicted gate); then by local SNR
RANK_SAMPLES = 32
RANK_BUDGET_S = 60.0


@dataclass
class QuantPlan:
    """Where int8 goes in the exported FP32 graph, matched to the torch modules by content."""

    sites: dict[str, Site]  # torch module -> the Conv/Gemm/MatMul consuming its weight
    anchors: list[Anchor]
    embedding_sites: dict[str, tuple[str, str]]  # embedding module -> (Gather node, table)
    merged_duplicate_nodes: int
    # weightless modules whose outputs get Q/DQ (residual adds) -> the ONNX tensor holding them
    tensor_sites: dict[str, str] = field(default_factory=dict)
    # every weight layer of the graph: int8 or FP32 with the reason (exporters.coverage)
    coverage: dict = field(default_factory=dict)
    # SiLU module -> its inner Sigmoid's output tensor, quantized too (activation_sites.py)
    gate_sites: dict[str, str] = field(default_factory=dict)
    bounded: set[str] = field(default_factory=set)  # tensor-site modules quantized over UNIT_RANGE
    # hard swish / hard sigmoid module -> its node's output, written around an int8 gate
    hard_sites: dict[str, str] = field(default_factory=dict)
    # tensor-site module -> the anchor that reads its tensor as input: both take the same params
    # (one Q/DQ pair in the graph, the same rounding in torch)
    tensor_aliases: dict[str, str] = field(default_factory=dict)
    pools_from_means: int = 0  # ReduceMean over (H, W) rewritten as GlobalAveragePool

    def coverage_after(self, computed: QuantParams, final: QuantParams,
                       public: Callable[[str], str] = str, faster_fp32: set[str] = frozenset(),
                       fallen: list[dict] = ()) -> dict:
        """The coverage once the params are final: sites the method left out (int8-dynamic takes
        MatMul/Gemm only), layers the fallback returned (`fallen`: the report's fallback entries)
        and layers measured faster in FP32 (`faster_fp32`, speed_check.py) are FP32 too, each with
        its reason."""
        taken, kept = {a.module for a in computed.anchors}, {a.module for a in final.anchors}
        returned_by = {f["layer"]: _fallback_reason(f) for f in fallen}
        why = {m: ("kept FP32 for speed: the whole model measured faster with it in FP32 on this host (speed check)"
                   if m in faster_fp32 else returned_by.get(public(m), "returned to FP32 by the accuracy fallback"))
               for m in taken - kept}
        why.update({m: "the quantize method does not take this op (int8-dynamic: MatMul/Gemm only)"
                    for m in set(self.sites) - taken})
        returned = [{"node": s.node, "op": s.op_type, "layer": public(m), "reason": why[m]}
                    for m, s in self.sites.items() if m in why]
        base = self.coverage or {"weight_layers": len(self.sites), "int8": len(self.sites), "fp32": []}
        return {**base, "int8": base["int8"] - len(returned), "fp32": base["fp32"] + returned}


def _fallback_reason(fallen: dict) -> str:
    ranked = "its output error alone in int8" if "output_snr_db" in fallen else "its local SNR"
    if fallen.get("chosen_by") == "evaluation split":
        return (f"returned to FP32 by the accuracy fallback: next by {ranked} while the evaluation split "
                "measured the gate failing")
    return f"returned to FP32 by the accuracy fallback: among the worst by {ranked}"


def _tensor_sites(work: torch.nn.Module, spec: ModelSpec, prepared: onnx.ModelProto,
                  sites: dict[str, Site]) -> tuple[dict[str, str], ActivationSites]:
    """Residual adds written with torch's FloatFunctional (its activation_post_process sees the
    sum), and activation modules worth a quantization point (activation_sites.py): module -> the
    ONNX tensor holding the same values on the example input. FloatFunctional types are read on
    the user's model: BN folding (torch.fx) keeps only the observer's path in `work`."""
    original = dict(spec.model.named_modules())
    modules = dict(work.named_modules())
    wanted = [n for n in modules if n.endswith(".activation_post_process")
              and isinstance(original.get(n.rpartition(".")[0]), FloatFunctional)]
    kinds = activation_modules(work)
    if not wanted and not kinds:
        return {}, ActivationSites()
    values: dict[str, np.ndarray] = {}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: values.__setitem__(n, out.detach().numpy()))
               for n in [*wanted, *kinds]]
    run_with_hooks(work, handles, [spec.example_inputs], spec.torch_outputs)
    adds = find_tensor_sites(prepared, {n: values[n] for n in wanted if n in values}, spec.example_inputs)
    quantized = set(adds.values()) | {s.activation for s in sites.values()} | {s.output for s in sites.values() if s.output}
    acts = match_activation_sites(prepared, kinds, {n: values[n] for n in kinds if n in values}, spec.example_inputs,
                                  quantized)
    return adds, acts


def plan_quantization(work: torch.nn.Module, prepared: onnx.ModelProto, spec: ModelSpec | None = None) -> QuantPlan:
    """`spec` (optional) lets residual adds and activation modules of the model be quantized too
    (_tensor_sites)."""
    merged = merge_duplicate_nodes(prepared)
    own_weights(prepared)
    pools = pools_from_means(prepared)
    weights = {n: m.weight.detach().numpy() for n, m in prunable_layers(work).items()}
    sites = find_sites(prepared, weights)
    if not sites:
        raise ExportError("no Conv/Linear weights found in the exported graph to quantize")
    tensors, acts = _tensor_sites(work, spec, prepared, sites) if spec is not None else ({}, ActivationSites())
    tensors.update(acts.tensors)
    skip_quantized = set(tensors.values())  # already one Q/DQ for every reader (FloatFunctional adds)
    anchors = anchors_for(sites, skip_quantized)
    readers = {s.activation: m for m, s in sites.items()}
    aliases = {m: readers[t] for m, t in tensors.items() if t in readers}
    tables = {n: m.weight.detach().numpy() for n, m in work.named_modules() if isinstance(m, torch.nn.Embedding)}
    coverage = weight_layer_coverage(prepared, {m: s.node for m, s in sites.items()})
    unmatched = sorted(set(weights) - set(sites))
    if unmatched:
        coverage["torch_layers_not_in_graph"] = unmatched
    return QuantPlan(sites, anchors, find_embedding_sites(prepared, tables), merged, tensors, coverage,
                     acts.gates, acts.bounded, acts.hard, aliases, pools)


def _shared_activation_params(plan: QuantPlan, params: QuantParams) -> QuantParams:
    """Bounded outputs take their whole range, SiLU and hard gates theirs, and a tensor an anchor
    also reads takes that anchor's input params (one Q/DQ pair for every reader)."""
    if params.dynamic:
        return params
    unit = act_params_from_range(*UNIT_RANGE)
    for m in plan.bounded & set(params.tensors):
        params.tensors[m] = unit
    for m, anchor in plan.tensor_aliases.items():
        if m in params.tensors and anchor in params.inputs:
            params.tensors[m] = params.inputs[anchor]
    params.gates = {m: unit for m in plan.gate_sites if m in params.tensors}
    hard = act_params_from_range(*HARD_GATE_RANGE)
    params.gates.update({m: hard for m in plan.hard_sites})
    return params


def compute_params(work: torch.nn.Module, spec: ModelSpec, stage: Stage, plan: QuantPlan,
                   target: str = "cpu", progress: Progress = NULL_PROGRESS,
                   observed_ranges: ObservedRanges | None = None) -> tuple[QuantParams, dict]:
    """Run the registered quantize method; it reads calibration data only if it says it does.
    `observed_ranges`: min-max ranges of `work` on the calibration data from a transform's pass.
    Returns the params and what the method decided on the way (QuantContext.decisions), for the
    report."""
    if stage.config.requires_calibration and not spec.calib_batches:
        raise DataError(f"{stage.qualified} needs calibration data; pass --calib-data")
    scorer = _OutputError(work, spec, plan)
    ctx = QuantContext(plan.anchors, spec.calib_batches, spec.torch_outputs,
                       weight_grid=weight_grid(target), progress=progress,
                       tensors=list(plan.tensor_sites), observed_ranges=observed_ranges,
                       output_error=scorer if spec.calib_batches else None)
    params = _shared_activation_params(plan, lookup("quantize", stage.name).handler(work, stage.config, ctx))
    if "range_choice" in ctx.decisions:
        ctx.decisions["range_choice"].update(samples=scorer.samples, measure=scorer.measure)
    return params, ctx.decisions


class _OutputError:
    """range_choice.output_error of a candidate's fake-quantized model against `work` in FP32, on
    the first CHOICE_SAMPLES calibration samples; the FP32 outputs are computed once, when first
    needed."""

    def __init__(self, work: torch.nn.Module, spec: ModelSpec, plan: QuantPlan):
        self.work, self.spec, self.plan = work, spec, plan
        self.measure = "mean 1 - cosine of the outputs to FP32"
        self.batches = leading_samples(spec.calib_batches, CHOICE_SAMPLES)
        self.samples = sum(len(next(iter(b.values()))) for b in self.batches)
        self._fp32: np.ndarray | None = None

    def __call__(self, params: QuantParams) -> float:
        if self._fp32 is None:
            with torch.no_grad():
                self._fp32 = _outputs(self.spec, self.work, self.batches)
        with fake_quantized(self.work, _shared_activation_params(self.plan, params)):
            quantized = _outputs(self.spec, self.work, self.batches)
        return output_error(self._fp32, quantized)


def _calibration_record(stage: Stage, spec: ModelSpec, observed: ObservedRanges | None) -> dict | None:
    """Where the activation ranges came from: the stage's own pass, or ranges observed earlier."""
    if not stage.config.requires_calibration:
        return None
    samples = sum(len(next(iter(b.values()))) for b in spec.calib_batches)
    if observed is not None and observed.used:
        return {"pass": f"shared with {observed.source}", "samples": observed.samples,
                "why": "min-max ranges of the smoothed model follow from the smoothing pass's per-channel "
                       "min/max and the positive smoothing scales: no separate calibration pass"}
    return {"pass": "own", "samples": samples}


def weight_range_info(params: QuantParams) -> dict:
    """Which integers the weights use and why (report `quantization.weight_range`)."""
    qmax = max((int(abs(w.q.astype(np.int16)).max()) for w in params.weights.values()), default=0)
    grid = params.weight_grid or WeightGrid(FULL_QMAX if qmax > REDUCED_QMAX else REDUCED_QMAX)
    info = {"scheme": grid.scheme, "reduce_range": grid.qmax <= REDUCED_QMAX, "max_abs_q": qmax}
    if grid.pair_limit is not None:
        pairs = sum(w.q.size // 2 for w in params.weights.values())
        info |= {"pair_limit": grid.pair_limit, "limited_pairs": sum(w.limited_pairs for w in params.weights.values()),
                 "pairs": pairs,
                 "why": "x86 without VNNI: onnxruntime's u8s8 kernels add two adjacent products into a saturating "
                        f"int16, so same-sign adjacent weights keep |q_a| + |q_b| <= {grid.pair_limit} (exact on that "
                        "kernel); each channel picks the scale with the least weight error"}
    elif grid.qmax <= REDUCED_QMAX:
        info["why"] = "7-bit weights (reduce_range: true)"
    else:
        info["why"] = "full int8 range: the target's int8 kernels accumulate without saturation"
    return info


def _fallback_batches(spec: ModelSpec) -> list[dict]:
    return first_samples(spec.calib_batches, FALLBACK_SAMPLES)


def _outputs(spec: ModelSpec, model: torch.nn.Module, batches: list[dict], progress: Progress = NULL_PROGRESS,
             what: str = "") -> np.ndarray:
    batches = track(progress, batches, what, "batches") if what else batches
    return np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in batches])


def public_name(work: torch.nn.Module) -> Callable[[str], str]:
    """Report layers by their model names: a smoothed Linear lives at `<name>.linear`."""
    modules = dict(work.named_modules())

    def name_of(module: str) -> str:
        parent = module.rpartition(".")[0]
        return parent if isinstance(modules.get(parent), SmoothedLinear) else module
    return name_of


class _Predictor:
    """predicted drop on the evaluation data for a candidate set of params (prediction.py): the
    FP32 statistics of calibration and evaluation inputs are gathered once, then each call runs the
    fake-quantized model (in place, no copy) on the calibration samples only."""

    def __init__(self, work, spec: ModelSpec, params: QuantParams, calib_noise: dict, fp32_calib: np.ndarray,
                 progress: Progress):
        self.work, self.spec, self.task = work, spec, get_task(spec.task)
        self.batches = _fallback_batches(spec)
        self.dense = fp32_calib
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
            q = _outputs(self.spec, self.work, self.batches)
        self.last = predict_drop(self.task, self.dense, q, self.view, self.labels, self.factor(params))
        return self.last["predicted"]


def apply_fallback(work: torch.nn.Module, spec: ModelSpec, params: QuantParams, policy: FallbackPolicy,
                   accuracy_limit: float, progress: Progress = NULL_PROGRESS,
                   work_is_dense: bool = False,
                   exported: Callable[[QuantParams], np.ndarray] | None = None,
                   ) -> tuple[QuantParams, dict, Callable | None]:
    """Rank layers by local SNR (always reported); with an enabled policy, return the worst to
    FP32 until the gate's drop predicted for the evaluation data holds (prediction.py).
    Returns the params, the report's fallback fields (SNRs, prediction, what fell back) and, with
    `exported` (the evaluation outputs in onnxruntime of the graph a set of params exports) and
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
    dense = work_fp32 if work_is_dense else _outputs(spec, spec.model, _fallback_batches(spec), progress,
                                                     "FP32 outputs for fallback")
    predictor = _Predictor(work, spec, params, calib_noise, dense, progress)
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
        scores.update(output_snr_db(work, params, lambda model: _outputs(spec, model, batches), RANK_BUDGET_S,
                                    progress) or {})
        ranking.update(by="output error of each layer alone in int8" if scores else "local SNR",
                       samples=sum(len(next(iter(b.values()))) for b in batches),
                       seconds=round(time.perf_counter() - start, 2))
        if not scores:
            ranking["why"] = f"ranking by output error would take over {RANK_BUDGET_S:g} s on this model"
        return scores or None
    computed = params
    params, fallen, trace = fallback_until(params, snr, predict, accuracy_limit, cap, progress, hard, rank)
    if ranking:
        info["fallback_ranking"] = ranking
    info.update(fallback=[{**f, "layer": public(f["layer"])} for f in fallen],
                predicted_drop_trace=[round(t, 6) for t in trace], quantized_layers=len(params.anchors),
                fallback_passes=passes[0],
                prediction={"before_fallback": _rounded(first["details"]), "final": _rounded(predictor.last),
                            "uses": "calibration outputs (FP32 and fake-quant); evaluation inputs through the "
                                    "FP32 model only (activation statistics, output margins); no evaluation labels"},
                fallback_cap={"layers": n, "max_layers": cap, "hard_max_layers": hard, "used": len(fallen),
                              "raised": len(fallen) > cap, "holds": trace[-1] <= accuracy_limit})
    if not (policy.confirm and exported is not None and spec.eval_batches):
        return params, info, None

    def confirm(kept_for_speed: set[str]) -> tuple[QuantParams, dict]:
        """The choice measured on the evaluation split once the speed check has kept its layers in
        FP32 (the graph the gate will run), extended while the gate fails there."""
        dense_eval = predictor.view.fp32_outputs if work_is_dense else _outputs(
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
                   "fallback_cap": {**info["fallback_cap"], "used": len(chosen), "raised": len(chosen) > cap,
                                    "holds": record["holds"]}}
        return without(base, {f["layer"] for f in chosen}), updates
    return params, info, confirm


def _ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=scores.get)  # worst first, as fallback_until orders them


def _rounded(d: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the quantized model fails the ONNX checker: {first_line(exc)}") from exc


def write_model(prepared: onnx.ModelProto, plan: QuantPlan, params: QuantParams, out_path: Path,
                consume: bool = False, labels: list[str] | None = None) -> None:
    """The QDQ graph (or, for dynamic params, int8 tables + DynamicQuantizeLinear/MatMulInteger).
    `consume`: `prepared` is rewritten in place (the caller no longer needs the FP32 graph).
    `labels`: a classifier's class names, kept in the model's metadata (LABELS_KEY) so that
    `sqexport check` can read labelled data by name."""
    if params.dynamic:
        with_tables = insert_qdq(prepared, plan.sites, QuantParams(embeddings=params.embeddings), plan.embedding_sites,
                                 inplace=consume)
        model = insert_dynamic(with_tables, plan.sites, params, inplace=True)  # with_tables: ours either way
    else:
        model = insert_qdq(prepared, plan.sites, params, plan.embedding_sites, plan.tensor_sites, inplace=consume,
                           gate_sites=plan.gate_sites, hard_sites=plan.hard_sites)
    if labels:
        set_metadata(model, {LABELS_KEY: json.dumps([str(x) for x in labels])})
    onnx.save(model, str(out_path))
    del model, prepared
    _check(out_path)


def quantize_to_onnx(work: torch.nn.Module, spec: ModelSpec, stage: Stage, prepared: onnx.ModelProto,
                     out_path: Path, accuracy_limit: float, target: str = "cpu",
                     progress: Progress = NULL_PROGRESS, work_is_dense: bool = False,
                     consume_prepared: bool = False,
                     observed_ranges: ObservedRanges | None = None) -> tuple[Callable, dict]:
    """Write the quantized model to out_path; return (torch reference runner, report info).
    `consume_prepared`: the FP32 graph is rewritten in place rather than copied (the caller drops it).
    `observed_ranges`: min-max ranges of `work` a transform stage observed (TransformResult.ranges)."""
    plan = plan_quantization(work, prepared, spec)
    params, decisions = compute_params(work, spec, stage, plan, target, progress, observed_ranges)
    info: dict = {"quantized_layers": len(params.anchors), "merged_duplicate_nodes": plan.merged_duplicate_nodes,
                  "weight_range": weight_range_info(params),
                  "int8_embeddings": sorted(set(params.embeddings) & set(plan.embedding_sites)),
                  "calibration": _calibration_record(stage, spec, observed_ranges), **decisions}
    params, settled = settle_params(work, spec, stage, plan, prepared, params, accuracy_limit, target, progress,
                                    work_is_dense, stage.config.supports_fallback, out_path.parent)
    info.update(settled)
    write_model(prepared, plan, params, out_path, consume=consume_prepared, labels=spec.labels)
    return torch_reference(work, spec, params, progress), info


def settle_params(work: torch.nn.Module, spec: ModelSpec, stage: Stage, plan: QuantPlan, prepared: onnx.ModelProto,
                  computed: QuantParams, accuracy_limit: float, target: str, progress: Progress,
                  work_is_dense: bool, fallback: bool, scratch: Path) -> tuple[QuantParams, dict]:
    """What stays int8 of the method's params: the accuracy fallback (`fallback`: run it at all),
    then the speed check, then the fallback's confirmation on the evaluation split (their graphs
    under `scratch`, the run's temporary folder); returns the final params and the report's
    fields, coverage included."""
    info: dict = {}
    params, confirm = computed, None
    if fallback:
        params, fallback_info, confirm = apply_fallback(
            work, spec, params, stage.config.fallback, accuracy_limit, progress, work_is_dense,
            exported_outputs(lambda p, path: write_model(prepared, plan, p, path), spec, scratch))
        info.update(fallback_info)
    faster_fp32: set[str] = set()
    public = public_name(work)
    if getattr(stage.config, "speed_check", False) and not params.dynamic:
        params, check = _speed_check(prepared, plan, params, spec, target, progress, scratch)
        faster_fp32 = set(check["kept_fp32"])
        check["kept_fp32"] = [public(m) for m in check["kept_fp32"]]
        for row in check.get("candidates", []):
            row["layer"] = public(row["layer"])
        info["speed_check"] = check
    if confirm is not None:  # after the speed check: the graph measured is the graph written
        params, confirmed = confirm(faster_fp32)
        info.update(confirmed)
    info["coverage"] = plan.coverage_after(computed, params, public, faster_fp32, info.get("fallback", []))
    return params, info


def _speed_check(prepared: onnx.ModelProto, plan: QuantPlan, params: QuantParams, spec: ModelSpec, target: str,
                 progress: Progress, scratch: Path) -> tuple[QuantParams, dict]:
    """Layers faster in FP32 inside the whole model stay FP32 (speed_check.py), when the model
    will run on kernels like this host's."""
    if get_target(target).int8_kernels != "host":
        return params, {"kept_fp32": [], "skipped": f"target {target} runs other int8 kernels than this host's: "
                                                   "nothing here can time them"}
    names = {i.name for i in prepared.graph.input}
    feed = {k: np.asarray(v) for k, v in spec.example_inputs.items() if k in names}
    check = SpeedCheck(lambda p, path: write_model(prepared, plan, p, path), feed, scratch)
    with progress.task("speed check (int8 vs FP32 per layer)", 1, "steps") as task:
        result = keep_fp32_where_faster(prepared, {m: s.node for m, s in plan.sites.items()}, params, check)
        task.advance()
    return result


def torch_reference(work: torch.nn.Module, spec: ModelSpec, params: QuantParams, progress: Progress) -> Callable:
    """The torch fake-quant outputs model.onnx must reproduce, computed once now on the evaluation
    batches the fidelity check covers (fidelity_batches; no copy of the model kept alive for
    verification); other batches on demand."""
    with fake_quantized(work, params):
        done = {id(b): spec.torch_outputs(work, b)
                for b in track(progress, fidelity_batches(spec), "torch reference (fidelity)", "batches")}

    def reference(batch: dict) -> list[np.ndarray]:
        if id(batch) in done:
            return done[id(batch)]
        with fake_quantized(work, params):
            return spec.torch_outputs(work, batch)
    return reference
