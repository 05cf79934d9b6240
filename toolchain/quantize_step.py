"""The quantization step of the pipeline, in four parts:
plan (where the exported graph takes int8) -> compute params in torch (the registered method)
-> fallback (worst layers back to FP32, if the method supports it) -> write the ONNX model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from contracts.errors import DataError, ExportError
from contracts.progress import NULL_PROGRESS, Progress, track
from contracts.quant import Anchor, QuantParams
from contracts.tasks import get_task
from exporters.dynamic import insert_dynamic
from exporters.graph import merge_duplicate_nodes
from exporters.qdq import Site, find_embedding_sites, find_sites, insert_qdq
from models.spec import ModelSpec
from runtime_check.accuracy import drop_in_unit, task_metrics
from runtime_check.isa import FULL_QMAX, REDUCED_QMAX, weight_qmax
from toolchain.builtin_methods import lookup
from toolchain.pruning import prunable_layers
from toolchain.quantization import fake_quant_model
from toolchain.quantization.fallback import FallbackPolicy, fallback_until, local_snr_db
from toolchain.quantization.smoothing import SmoothedLinear
from toolchain.recipe import Stage
from toolchain.stages import QuantContext

__all__ = ["QuantPlan", "plan_quantization", "compute_params", "apply_fallback", "write_model",
           "quantize_to_onnx", "predicted_drop"]

FALLBACK_SAMPLES = 128  # calibration samples used to predict the gate during fallback


@dataclass
class QuantPlan:
    """Where int8 goes in the exported FP32 graph, matched to the torch modules by content."""

    sites: dict[str, Site]  # torch module -> the Conv/Gemm/MatMul consuming its weight
    anchors: list[Anchor]
    embedding_sites: dict[str, tuple[str, str]]  # embedding module -> (Gather node, table)
    merged_duplicate_nodes: int


def plan_quantization(work: torch.nn.Module, prepared: onnx.ModelProto) -> QuantPlan:
    merged = merge_duplicate_nodes(prepared)
    weights = {n: m.weight.detach().numpy() for n, m in prunable_layers(work).items()}
    sites = find_sites(prepared, weights)
    if not sites:
        raise ExportError("no Conv/Linear weights found in the exported graph to quantize")
    anchors = [Anchor(name, s.rectified_output is not None, s.bias is not None, s.op_type in ("MatMul", "Gemm"))
               for name, s in sites.items()]
    tables = {n: m.weight.detach().numpy() for n, m in work.named_modules() if isinstance(m, torch.nn.Embedding)}
    return QuantPlan(sites, anchors, find_embedding_sites(prepared, tables), merged)


def compute_params(work: torch.nn.Module, spec: ModelSpec, stage: Stage, plan: QuantPlan,
                   target: str = "cpu", progress: Progress = NULL_PROGRESS) -> QuantParams:
    """Run the registered quantize method; it reads calibration data only if it says it does."""
    if stage.config.requires_calibration and not spec.calib_batches:
        raise DataError(f"{stage.qualified} needs calibration data; pass --calib-data")
    ctx = QuantContext(plan.anchors, spec.calib_batches, spec.torch_outputs,
                       reduce_range=weight_qmax(target) < FULL_QMAX, progress=progress)
    return lookup("quantize", stage.name).handler(work, stage.config, ctx)


def _weight_range(params: QuantParams) -> dict:
    qmax = max((int(abs(w.q.astype(np.int16)).max()) for w in params.weights.values()), default=0)
    reduced = qmax <= REDUCED_QMAX
    return {"reduce_range": reduced, "max_abs_q": qmax,
            "why": "x86 without VNNI: onnxruntime's u8s8 kernels saturate int16 sums of full-range int8, "
                   "so weights use 7 bits" if reduced else
                   "full int8 range: the target's int8 kernels accumulate without saturation"}


def _fallback_batches(spec: ModelSpec) -> list[dict]:
    batches, n = [], 0
    for b in spec.calib_batches:
        if n >= FALLBACK_SAMPLES:
            break
        batches.append(b)
        n += len(next(iter(b.values())))
    return batches


def _calib_outputs(spec: ModelSpec, model: torch.nn.Module, progress: Progress = NULL_PROGRESS,
                   what: str = "") -> np.ndarray:
    batches = track(progress, _fallback_batches(spec), what, "batches") if what else _fallback_batches(spec)
    return np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in batches])


def predicted_drop(spec: ModelSpec, fp_outputs: np.ndarray, model: torch.nn.Module) -> float:
    """The gate's metric on calibration data, `model` vs the dense FP32 outputs, in the gate's unit."""
    out = _calib_outputs(spec, model)
    task = get_task(spec.task)
    labels = spec.calib_labels[:len(out)] if spec.calib_labels is not None else None
    return drop_in_unit(task, task_metrics(task, fp_outputs, out, labels))


def _public_name(work: torch.nn.Module) -> Callable[[str], str]:
    """Report layers by their model names: a smoothed Linear lives at `<name>.linear`."""
    modules = dict(work.named_modules())

    def name_of(module: str) -> str:
        parent = module.rpartition(".")[0]
        return parent if isinstance(modules.get(parent), SmoothedLinear) else module
    return name_of


def apply_fallback(work: torch.nn.Module, spec: ModelSpec, params: QuantParams, policy: FallbackPolicy,
                   accuracy_limit: float, info: dict, progress: Progress = NULL_PROGRESS) -> QuantParams:
    """Rank layers by local SNR (always reported); with an enabled policy, return the worst to
    FP32 until the gate's metric, predicted on calibration data, holds."""
    snr = local_snr_db(work, params, track(progress, spec.calib_batches, "local SNR per layer", "batches"),
                       spec.torch_outputs)
    public = _public_name(work)
    info["worst_layers_snr_db"] = [{"layer": public(n), "snr_db": round(v, 2)}
                                   for n, v in sorted(snr.items(), key=lambda kv: kv[1])[:8]]
    if not policy.enabled:
        return params
    # Measured against the dense model, as the gate is; if pruning alone already exceeds the
    # limit, returning layers to FP32 cannot help and would only cost speed.
    dense = _calib_outputs(spec, spec.model, progress, "FP32 outputs for fallback")
    pruned_drop = predicted_drop(spec, dense, work)
    info.update(predicted_drop_limit=accuracy_limit, predicted_drop_fp32_pruned=round(pruned_drop, 6))
    if pruned_drop > accuracy_limit:
        info["fallback_skipped"] = "the pruned FP32 model alone exceeds the accuracy limit"
        return params
    params, fallen, trace = fallback_until(
        params, snr, lambda p: predicted_drop(spec, dense, fake_quant_model(work, p)),
        accuracy_limit, policy.max_layers(len(params.anchors)), progress)
    info.update(fallback=[{**f, "layer": public(f["layer"])} for f in fallen],
                predicted_drop_trace=[round(t, 6) for t in trace], quantized_layers=len(params.anchors))
    return params


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the quantized model fails the ONNX checker: {str(exc).splitlines()[0]}") from exc


def write_model(prepared: onnx.ModelProto, plan: QuantPlan, params: QuantParams, out_path: Path) -> None:
    """The QDQ graph (or, for dynamic params, int8 tables + DynamicQuantizeLinear/MatMulInteger)."""
    if params.dynamic:
        with_tables = insert_qdq(prepared, plan.sites, QuantParams(embeddings=params.embeddings), plan.embedding_sites)
        model = insert_dynamic(with_tables, plan.sites, params)
    else:
        model = insert_qdq(prepared, plan.sites, params, plan.embedding_sites)
    onnx.save(model, str(out_path))
    _check(out_path)


def quantize_to_onnx(work: torch.nn.Module, spec: ModelSpec, stage: Stage, prepared: onnx.ModelProto,
                     out_path: Path, accuracy_limit: float, target: str = "cpu",
                     progress: Progress = NULL_PROGRESS) -> tuple[Callable, dict]:
    """Write the quantized model to out_path; return (torch reference runner, report info)."""
    plan = plan_quantization(work, prepared)
    params = compute_params(work, spec, stage, plan, target, progress)
    info: dict = {"quantized_layers": len(params.anchors), "merged_duplicate_nodes": plan.merged_duplicate_nodes,
                  "weight_range": _weight_range(params),
                  "int8_embeddings": sorted(set(params.embeddings) & set(plan.embedding_sites))}
    if stage.config.supports_fallback:
        params = apply_fallback(work, spec, params, stage.config.fallback, accuracy_limit, info, progress)
    write_model(prepared, plan, params, out_path)
    fq = fake_quant_model(work, params)
    return (lambda b: spec.torch_outputs(fq, b)), info
