"""The quantization step of the pipeline: params in torch -> (fallback) -> QDQ ONNX + torch reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from exporters.dynamic import insert_dynamic
from exporters.qdq import find_embedding_sites, find_sites, insert_qdq, merge_duplicate_nodes
from models.spec import ModelSpec
from runtime_check.isa import int8_saturates, weight_qmax
from runtime_check.accuracy import classification_metrics, embedding_metrics
from contracts.errors import ExportError
from contracts.progress import NULL_PROGRESS, Progress, track
from toolchain.pruning import prunable_layers
from toolchain.quantization import QuantParams, fake_quant_model
from toolchain.quantization.fallback import fallback_until, local_snr_db
from toolchain.quantization.plan import Anchor
from toolchain.quantization.smoothing import SmoothedLinear
from toolchain.recipe import Stage
from toolchain.registry import lookup

__all__ = ["QuantContext", "quantize_to_onnx", "predicted_drop"]


@dataclass
class QuantContext:
    anchors: list[Anchor]
    calib_batches: list[dict]
    run: Callable
    # 7-bit weights unless a config says otherwise; defaults to what this host's kernels need
    reduce_range: bool = field(default_factory=int8_saturates)
    progress: Progress = NULL_PROGRESS  # calibration loops report here


FALLBACK_SAMPLES = 128  # calibration samples used to predict the gate during fallback


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
    if spec.task == "feature-extraction":
        return embedding_metrics(fp_outputs, out)["drop"]
    labels = spec.calib_labels[:len(out)] if spec.calib_labels is not None else None
    return classification_metrics(fp_outputs, out, labels)["drop_points"] if labels is not None else \
        100.0 * (1.0 - classification_metrics(fp_outputs, out, None)["agreement_with_baseline"])


def _public_name(work: torch.nn.Module) -> Callable[[str], str]:
    """Report layers by their model names: a smoothed Linear lives at `<name>.linear`."""
    modules = dict(work.named_modules())

    def name_of(module: str) -> str:
        parent = module.rpartition(".")[0]
        return parent if isinstance(modules.get(parent), SmoothedLinear) else module
    return name_of


def _check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the quantized model fails the ONNX checker: {str(exc).splitlines()[0]}") from exc


def quantize_to_onnx(work: torch.nn.Module, spec: ModelSpec, stage: Stage, prepared: onnx.ModelProto,
                     out_path: Path, accuracy_limit: float, target: str = "cpu",
                     progress: Progress = NULL_PROGRESS) -> tuple[Callable, dict]:
    """Write the QDQ model to out_path; return (torch reference runner, report info)."""
    run = spec.torch_outputs
    merged = merge_duplicate_nodes(prepared)
    weights = {n: m.weight.detach().numpy() for n, m in prunable_layers(work).items()}
    sites = find_sites(prepared, weights)
    if not sites:
        raise ExportError("no Conv/Linear weights found in the exported graph to quantize")
    anchors = [Anchor(name, s.rectified_output is not None, s.bias is not None, s.op_type in ("MatMul", "Gemm"))
               for name, s in sites.items()]
    ctx = QuantContext(anchors, spec.calib_batches, run, reduce_range=weight_qmax(target) < 127, progress=progress)
    params = lookup("quantize", stage.name).handler(work, stage.config, ctx)
    qmax = max((int(abs(w.q.astype(np.int16)).max()) for w in params.weights.values()), default=0)
    info: dict = {"quantized_layers": len(params.anchors), "merged_duplicate_nodes": merged,
                  "weight_range": {"reduce_range": qmax <= 63, "max_abs_q": qmax,
                                   "why": "x86 without VNNI: onnxruntime's u8s8 kernels saturate int16 sums of "
                                          "full-range int8, so weights use 7 bits" if qmax <= 63 else
                                          "full int8 range: the target's int8 kernels accumulate without saturation"}}
    tables = {n: m.weight.detach().numpy() for n, m in work.named_modules() if isinstance(m, torch.nn.Embedding)}
    embedding_sites = find_embedding_sites(prepared, tables)
    info["int8_embeddings"] = sorted(set(params.embeddings) & set(embedding_sites))
    if params.dynamic:
        with_tables = insert_qdq(prepared, sites, QuantParams(embeddings=params.embeddings), embedding_sites)
        onnx.save(insert_dynamic(with_tables, sites, params), str(out_path))
        _check(out_path)
        fq = fake_quant_model(work, params)
        return (lambda b: run(fq, b)), info
    snr = local_snr_db(work, params, track(progress, spec.calib_batches, "local SNR per layer", "batches"), run)
    public = _public_name(work)
    info["worst_layers_snr_db"] = [{"layer": public(n), "snr_db": round(v, 2)}
                                   for n, v in sorted(snr.items(), key=lambda kv: kv[1])[:8]]
    if getattr(stage.config, "fallback", False):
        # Measured against the dense model, as the gate is; if pruning alone already exceeds the
        # limit, returning layers to FP32 cannot help and would only cost speed.
        dense = _calib_outputs(spec, spec.model, progress, "FP32 outputs for fallback")
        pruned_drop = predicted_drop(spec, dense, work)
        info.update(predicted_drop_limit=accuracy_limit, predicted_drop_fp32_pruned=round(pruned_drop, 6))
        if pruned_drop <= accuracy_limit:
            max_layers = int(len(anchors) * stage.config.max_fallback_fraction)
            params, fallen, trace = fallback_until(
                params, snr, lambda p: predicted_drop(spec, dense, fake_quant_model(work, p)),
                accuracy_limit, max_layers, progress)
            fallen = [{**f, "layer": public(f["layer"])} for f in fallen]
            info.update(fallback=fallen, predicted_drop_trace=[round(t, 6) for t in trace],
                        quantized_layers=len(params.anchors))
        else:
            info["fallback_skipped"] = "the pruned FP32 model alone exceeds the accuracy limit"
    qmodel = insert_qdq(prepared, sites, params, embedding_sites)
    onnx.save(qmodel, str(out_path))
    _check(out_path)
    fq = fake_quant_model(work, params)
    return (lambda b: run(fq, b)), info
