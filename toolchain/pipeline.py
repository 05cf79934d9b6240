"""run(recipe, spec, outdir) -> report: prune -> fold -> quantize -> export -> verify -> report.

Everything is built in a temporary folder next to `outdir` and renamed into place at the end, so
a failed or interrupted run never leaves a half-written output folder behind.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
import numpy as np
import onnx
import onnxruntime
import torch

from contracts.progress import NULL_PROGRESS, Progress, track
from exporters.bundle import build_bundle
from exporters.export import export_model
from exporters.sparse import store_sparse
from exporters.hf_export import save_tokenizer
from models.spec import ModelSpec
from runtime_check.gates import accuracy_limit, evaluate_gates
from runtime_check.report import write_report
from runtime_check.session import default_threads
from runtime_check.sparse_check import storage_diff
from runtime_check.verify import accuracy_of, fidelity_of, latency_of, sizes_of
from toolchain.bn_recalibration import recalibrate_batchnorm
from contracts.errors import OutputError
from toolchain.folding import copy_for_compression, fold_batchnorm
from toolchain.mobile_step import mobile_step
from toolchain.pruning import layer_sparsity, overall_sparsity, prunable_layers
from toolchain.quantization.smoothing import smooth_model
from toolchain.quantize_step import quantize_to_onnx
from toolchain.recipe import Recipe
from toolchain.registry import lookup
from toolchain.stage_meter import measured_stage

__all__ = ["run", "atomic_output"]

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


MARKER = "report.json"  # a folder holding one is an earlier sqexport output and may be replaced


def _check_replaceable(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"output {outdir} exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / MARKER).is_file():
        raise OutputError(f"output folder {outdir} already holds files that are not an sqexport output; "
                          "choose another -o")


@contextmanager
def atomic_output(outdir: Path):
    """Yield a temp folder beside `outdir`; on success it replaces `outdir` (only an earlier
    sqexport output or an empty folder), on error it vanishes."""
    outdir = Path(outdir).absolute()
    _check_replaceable(outdir)
    blocker = next((p for p in outdir.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"cannot write output folder {outdir}: {blocker} is a file, not a folder")
    try:
        outdir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary folder
    except OSError as exc:
        raise OutputError(f"cannot write output folder {outdir}: {exc.strerror}") from None
    try:
        yield tmp
        _check_replaceable(outdir)
        old = None
        if outdir.exists():
            old = outdir.with_name(f".{outdir.name}.old-{tmp.name[-8:]}")
            outdir.rename(old)
        tmp.rename(outdir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _Stages:
    """Times each stage, measures its peak memory, reports it as progress and records it for the report."""

    def __init__(self, progress: Progress):
        self.records, self.progress = [], progress

    @contextmanager
    def stage(self, name: str, params: dict | None = None):
        record = {"name": name, "params": dict(params or {}), "seconds": 0.0, "peak_rss_mb": None}
        with measured_stage(self.progress, name) as meter:
            yield record
        record.update(seconds=round(meter.seconds, 3), peak_rss_mb=meter.peak_rss_mb)
        self.records.append(record)


def _structured_context(spec: ModelSpec, threads: int):
    from toolchain.pruning.structured_stage import StructuredContext

    return StructuredContext(spec.example_inputs, spec.calib_batches, spec.torch_outputs,
                             lambda model, path: export_model(spec, model, path), threads)


def run(recipe: Recipe, spec: ModelSpec, outdir: Path, progress: Progress = NULL_PROGRESS,
        input_shapes: dict | None = None) -> dict:
    """`input_shapes` (from --input-shape) fixes the mobile model's inputs; default: the spec's example."""
    seed_everything(recipe.seed)
    threads = recipe.threads or default_threads()
    st = _Stages(progress)
    notes: list[str] = []
    with atomic_output(outdir) as tmp:
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

        with st.stage("export.sparse_storage") as rec:
            dense_bytes = (tmp / "model.onnx").read_bytes()
            storage = store_sparse(tmp / "model.onnx")
            rec["params"]["sparse_initializers"] = len(storage["initializers"])
            if storage["used"]:
                storage["outputs_vs_dense"] = storage_diff(dense_bytes, tmp / "model.onnx", spec.eval_batches)
        if storage["used"]:
            notes.append(f"{len(storage['initializers'])} pruned initializer(s) stored as ONNX sparse initializers "
                         f"(int64 indices): model.onnx {storage['dense']['raw']:,} -> {storage['sparse']['raw']:,} bytes; "
                         "onnxruntime densifies them at load, so outputs are unchanged")
        with st.stage("verify.accuracy"):
            accuracy, onnx_out = accuracy_of(spec, tmp / "baseline.onnx", tmp / "model.onnx", threads, progress)
            fidelity = fidelity_of(spec, reference, onnx_out, progress)
        with st.stage("verify.latency", {"threads": threads}):
            latency = latency_of(spec, tmp / "baseline.onnx", tmp / "model.onnx", threads, progress)
        sizes = sizes_of(tmp / "baseline.onnx", tmp / "model.onnx")
        sizes.update(model_dense=storage["dense"]["raw"], model_dense_compressed=storage["dense"]["compressed"])
        tokenizer_files = save_tokenizer(spec, tmp) if spec.hf_folder else []
        checks = evaluate_gates(recipe.gates, accuracy, latency)
        mobile = None
        if recipe.target == "mobile":
            mobile, mobile_checks = mobile_step(spec, tmp, input_shapes or {}, accuracy_limit(recipe.gates, spec.task),
                                                st.stage, tokenizer_files)
            checks += mobile_checks
            sizes = sizes_of(tmp / "baseline.onnx", tmp / "model.onnx")  # model.onnx now has fixed shapes
            sizes.update(ort=mobile["sizes"]["ort"]["raw"], ort_compressed=mobile["sizes"]["ort"]["compressed"])
        report = {
            "model": spec.name, "target": recipe.target, "passed": all(c["passed"] for c in checks),
            "stages": st.records, "sparsity": sparsity, "size_bytes": sizes, "accuracy": accuracy,
            "fidelity": fidelity, "sparse_storage": storage, "quantization": quant_info, "latency_ms": latency,
            "checks": checks, "notes": notes, "recipe": recipe.to_dict(), "task": spec.task, **extra,
            "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                         "onnxruntime": onnxruntime.__version__},
        }
        if mobile is not None:
            report["mobile"] = mobile
            mobile["bundle"] = build_bundle(tmp, report)
        write_report(report, tmp)
    return report
