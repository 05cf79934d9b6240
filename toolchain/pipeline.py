"""run(recipe, spec, outdir) -> report: prune -> fold -> quantize -> export -> verify -> report.

Everything is built in a temporary folder next to `outdir` and renamed into place at the end
(toolchain.output_folder), so a failed or interrupted run never leaves a half-written output behind.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from contracts.progress import NULL_PROGRESS, Progress, track
from exporters.export import export_model
from exporters.hf_export import save_tokenizer
from models.spec import ModelSpec
from runtime_check.gates import accuracy_limit, evaluate_gates
from runtime_check.report import write_report
from runtime_check.session import default_threads
from runtime_check.verify import accuracy_of, fidelity_of, latency_of, sizes_of
from toolchain.bn_recalibration import recalibrate_batchnorm
from toolchain import signals
from toolchain.folding import copy_for_compression, fold_batchnorm
from toolchain.pruning import layer_sparsity, overall_sparsity, prunable_layers
from toolchain.quantization.smoothing import smooth_model
from toolchain.output_folder import atomic_output
from toolchain.quantize_step import quantize_to_onnx
from toolchain.recipe import Recipe
from toolchain.registry import lookup
from toolchain.stage_meter import measured_stage

__all__ = ["run"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Stages:
    """Times each stage, measures its peak memory, reports it as progress and records it for the report."""

    def __init__(self, progress: Progress):
        self.records, self.progress = [], progress

    @contextmanager
    def stage(self, name: str, params: dict | None = None):
        record = {"name": name, "params": dict(params or {}), "seconds": 0.0, "peak_rss_mb": None}
        with measured_stage(self.progress, name) as meter:
            yield record
            signals.check()  # a signal some library swallowed still ends the run here
        record.update(seconds=round(meter.seconds, 3), peak_rss_mb=meter.peak_rss_mb)
        self.records.append(record)


def _structured_context(spec: ModelSpec, threads: int):
    from toolchain.pruning.structured_stage import StructuredContext

    return StructuredContext(spec.example_inputs, spec.calib_batches, spec.torch_outputs,
                             lambda model, path: export_model(spec, model, path), threads)


def run(recipe: Recipe, spec: ModelSpec, outdir: Path, progress: Progress = NULL_PROGRESS) -> dict:
    seed_everything(recipe.seed)
    threads = recipe.threads or default_threads()
    st = _Stages(progress)
    notes: list[str] = []
    with atomic_output(outdir, progress.message) as tmp:
        with st.stage("export.baseline", {"exporter": spec.exporter}):
            export_model(spec, spec.model, tmp / "baseline.onnx")

        work = copy_for_compression(spec.model)
        layers = prunable_layers(work, spec.prune_prefix)
        dense = {n: m.weight.numel() for n, m in layers.items()}  # structured pruning shrinks them
        extra: dict = {}
        for stage in [s for s in recipe.stages if s.kind == "prune"]:
            with st.stage(stage.qualified, stage.to_dict()["params"]) as rec:
                entry = lookup("prune", stage.name)
                if getattr(stage.config, "NEEDS_MODEL", False):
                    result = entry.handler(work, stage.config, _structured_context(spec, threads))
                else:
                    result = entry.handler(layers, stage.config, None)
                rec["params"]["achieved_sparsity"] = round(overall_sparsity(layers, dense), 6)
            notes.append(result.speed_note)
            extra.update(result.extra)
        sparsity = {"overall": overall_sparsity(layers, dense), "layers": layer_sparsity(layers, dense)}

        if recipe.stage("prune") is not None:
            with st.stage("recalibrate_batchnorm") as rec:
                batches = track(progress, spec.calib_batches, "BatchNorm statistics", "batches")
                rec["params"]["layers"] = recalibrate_batchnorm(work, batches, spec.torch_outputs)
        recover = recipe.stage("recover")
        if recover is not None:
            from toolchain.recovery import RecoverContext

            with st.stage(recover.qualified, recover.to_dict()["params"]) as rec:
                extra["recovery"] = lookup("recover", recover.name).handler(
                    work, recover.config, RecoverContext(spec, recipe.seed, progress))
                rec["params"]["steps_run"] = extra["recovery"]["steps"]
            with st.stage("recalibrate_batchnorm") as rec:  # fine-tuning moved the statistics again
                batches = track(progress, spec.calib_batches, "BatchNorm statistics", "batches")
                rec["params"]["layers"] = recalibrate_batchnorm(work, batches, spec.torch_outputs)
        with st.stage("fold_batchnorm") as rec:
            work, folded = fold_batchnorm(work)
            rec["params"]["folded"] = folded

        quant = recipe.stage("quantize")
        alpha = getattr(quant.config, "smoothquant", 0.0) if quant is not None else 0.0
        if alpha > 0:
            with st.stage("quantize.smoothquant", {"alpha": alpha}) as rec:
                groups = smooth_model(work, spec.calib_batches, spec.torch_outputs, alpha, progress)
                rec["params"]["groups"] = len(groups)
                rec["params"]["layers"] = sum(len(g["linears"]) for g in groups)
        with st.stage("export.model", {"exporter": spec.exporter}):
            prepared = export_model(spec, work, tmp / "prepared.onnx")
        quant_info = {}
        if quant is not None:
            with st.stage(quant.qualified, quant.to_dict()["params"]) as rec:
                limit = accuracy_limit(recipe.gates, spec.task)
                reference, quant_info = quantize_to_onnx(work, spec, quant, prepared, tmp / "model.onnx", limit,
                                                         recipe.target, progress)
                rec["params"]["quantized_layers"] = quant_info["quantized_layers"]
                if quant_info.get("fallback"):
                    notes.append(f"accuracy-aware fallback: {len(quant_info['fallback'])} layer(s) kept in FP32: "
                                 + ", ".join(f["layer"] for f in quant_info["fallback"]))
            (tmp / "prepared.onnx").unlink()
        else:
            (tmp / "prepared.onnx").rename(tmp / "model.onnx")
            reference = lambda b: spec.torch_outputs(work, b)  # noqa: E731

        with st.stage("verify.accuracy"):
            accuracy, onnx_out = accuracy_of(spec, tmp / "baseline.onnx", tmp / "model.onnx", threads, progress)
            fidelity = fidelity_of(spec, reference, onnx_out, progress)
        with st.stage("verify.latency", {"threads": threads}):
            latency = latency_of(spec, tmp / "baseline.onnx", tmp / "model.onnx", threads, progress)
        sizes = sizes_of(tmp / "baseline.onnx", tmp / "model.onnx")
        if spec.hf_folder:
            save_tokenizer(spec, tmp)
        checks = evaluate_gates(recipe.gates, accuracy, latency)
        report = {
            "model": spec.name, "target": recipe.target, "passed": all(c["passed"] for c in checks),
            "stages": st.records, "sparsity": sparsity, "size_bytes": sizes, "accuracy": accuracy,
            "fidelity": fidelity, "quantization": quant_info, "latency_ms": latency, "checks": checks, "notes": notes,
            "recipe": recipe.to_dict(), "task": spec.task, **extra,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
        }
        write_report(report, tmp)
    return report
