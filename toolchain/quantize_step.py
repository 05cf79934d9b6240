"""The quantization step of the pipeline, in four parts:
plan (where the exported graph takes int8) -> compute params in torch (the registered method)
-> settle what stays int8 (the fallback, fallback_step.py, if the method supports it; the speed
check; the fallback's confirmation) -> write the ONNX model."""
from __future__ import annotations

import json
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
from sqexport.contracts.tasks import LABELS_KEY
from sqexport.exporters.coverage import weight_layer_coverage
from sqexport.exporters.dynamic import insert_dynamic
from sqexport.exporters.elementwise import pools_from_means
from sqexport.exporters.graph import merge_duplicate_nodes, own_weights, set_metadata
from sqexport.exporters.qdq import Site, anchors_for, find_embedding_sites, find_sites, insert_qdq
from sqexport.exporters.smoothed_graph import unsmooth_float_readers
from sqexport.exporters.tensor_sites import find_tensor_sites
from sqexport.models.spec import ModelSpec, leading_samples
from sqexport.contracts.weight_grid import WeightGrid
from sqexport.runtime_check.isa import FULL_QMAX, REDUCED_QMAX, weight_grid
from sqexport.runtime_check.verify import fidelity_batches
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.pruning import prunable_layers
from sqexport.toolchain.quantization.activation_sites import ActivationSites, activation_modules, match_activation_sites
from sqexport.toolchain.quantization.static import fake_quantized
from sqexport.exporters.gelu import fuse_dequantized_gelu, with_ms_domain
from sqexport.toolchain.quantization.range_choice import CHOICE_SAMPLES, output_error
from sqexport.toolchain.fallback_confirm import ExportedGraphs
from sqexport.toolchain.fallback_step import apply_fallback, model_outputs
from sqexport.toolchain.quantization.smoothing import public_name
from sqexport.toolchain.quantization.site_neighbors import site_neighbors, without_orphan_sites
from sqexport.toolchain.quantization.speed_check import SpeedCheck, keep_fp32_where_faster
from sqexport.toolchain.recipe import Stage
from sqexport.toolchain.stages import QuantContext

__all__ = ["QuantPlan", "plan_quantization", "compute_params", "settle_params", "write_model", "quantize_to_onnx",
           "torch_reference", "weight_range_info"]

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
    # tensor / gate / hard-gate site -> the weight layers next to it (site_neighbors.py)
    site_layers: dict[str, frozenset[str]] = field(default_factory=dict)

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
    if fallen.get("chosen_by") == "fidelity floor":
        return (f"returned to FP32 by the fidelity floor: next by {ranked} while the int8 outputs' cosine to FP32 "
                "on calibration data was below the floor (fallback.min_cosine)")
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
    layer_nodes = {s.node: m for m, s in sites.items()}
    neighbors = site_neighbors(prepared.graph, {**tensors, **acts.gates, **acts.hard}, layer_nodes)
    return QuantPlan(sites, anchors, find_embedding_sites(prepared, tables), merged, tensors, coverage,
                     acts.gates, acts.bounded, acts.hard, aliases, pools, neighbors)


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
    params.site_layers = plan.site_layers
    # sites between layers the method left FP32 (a ConvTranspose, a dynamic method's convs) round for nothing
    params.tensors, params.gates = without_orphan_sites(params.tensors, params.gates, plan.site_layers,
                                                        {a.module for a in params.anchors})
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
                self._fp32 = model_outputs(self.spec, self.work, self.batches)
        with fake_quantized(self.work, _shared_activation_params(self.plan, params)):
            quantized = model_outputs(self.spec, self.work, self.batches)
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
    unsmooth_float_readers(model.graph)
    if fuse_dequantized_gelu(model.graph):
        with_ms_domain(model)
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
                  work_is_dense: bool, fallback: bool, scratch: Path,
                  baseline: Path | None = None) -> tuple[QuantParams, dict]:
    """What stays int8 of the method's params: the accuracy fallback (`fallback`: run it at all),
    then the speed check, then the fallback's confirmation on the evaluation split (their graphs
    under `scratch`, the run's temporary folder); returns the final params and the report's
    fields, coverage included. `baseline`: the run's baseline.onnx, the confirmation's reference
    (default: scratch/baseline.onnx, where a plain run writes it)."""
    info: dict = {}
    params, confirm = computed, None
    if fallback:
        params, fallback_info, confirm = apply_fallback(
            work, spec, params, stage.config.fallback, accuracy_limit, progress, work_is_dense,
            ExportedGraphs(lambda p, path: write_model(prepared, plan, p, path), spec, scratch,
                           baseline or Path(scratch) / "baseline.onnx"))
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
