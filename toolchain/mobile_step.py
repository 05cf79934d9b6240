"""The pipeline's `--target mobile` step: fixed shapes -> model.ort -> usability -> .ort verification
-> reference data -> ARM64 under emulation (when set up). The bundle is built once the report exists."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx

from sqexport.exporters.bundle import REFERENCE_NAME, write_reference
from sqexport.exporters.mobile import PREPROCESSING_KEY, convert_to_ort, fix_shapes, resolve_fixed_shapes
from sqexport.exporters.sparse import file_sizes
from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.arm64 import ARM64_RTOL, DEVICE_MAX_REL_ERROR, emulator_status
from sqexport.runtime_check.fixed_inputs import fit_batches
from sqexport.runtime_check.gates import Gates, evaluate_gates
from sqexport.runtime_check.mobile_check import usability, verify_ort
from sqexport.runtime_check.session import make_session

__all__ = ["mobile_step", "app_metadata"]


def app_metadata(spec: ModelSpec, tokenizer_files: list[str]) -> dict:
    """What an app needs besides the tensors: stored in model.onnx's metadata_props (the .ort keeps them)."""
    pre = dict(getattr(spec, "preprocessing", None) or {})
    if tokenizer_files:  # Hugging Face models ship their tokenizer beside model.onnx
        pre.setdefault("type", "text")
        pre["tokenizer_files"] = tokenizer_files
    return {"task": spec.task, "preprocessing": pre, "labels": getattr(spec, "labels", None)}


def _checks(verify: dict, limit: float) -> list[dict]:
    match = verify["vs_model_onnx"]
    checks = [{"name": "ort_matches_onnx", "passed": match["within_tolerance"], "value": match["max_abs_diff"],
               "limit": match["tolerance"], "unit": "abs"}]
    return checks + [{**c, "name": f"ort_{c['name']}"} for c in evaluate_gates(Gates(limit), verify["accuracy"], {})]


def mobile_step(spec: ModelSpec, tmp: Path, user_shapes: dict, limit: float, stage: Callable,
                tokenizer_files: list[str]) -> tuple[dict, list[dict]]:
    """Runs inside the pipeline's temp folder; returns the report's `mobile` section and its checks."""
    model_path, ort_path = tmp / "model.onnx", tmp / "model.ort"
    with stage("mobile.fix_shapes") as rec:
        model = onnx.load(str(model_path), load_external_data=False)
        shapes = resolve_fixed_shapes(model, user_shapes, spec.example_inputs)
        rec["params"]["shapes"] = shapes
        fix_shapes(model_path, model_path, shapes, {PREPROCESSING_KEY: app_metadata(spec, tokenizer_files)})
    with stage("mobile.convert_ort") as rec:
        ort_info = convert_to_ort(model_path, tmp)
        rec["params"].update(optimization_style="Fixed", target_platform="arm")
    with stage("mobile.usability"):
        use = usability(model_path)
    with stage("mobile.verify_ort"):
        verify = verify_ort(ort_path, model_path, tmp / "baseline.onnx", spec.eval_batches, spec.eval_labels,
                            spec.postprocess, spec.task, shapes)
    base_out = verify.pop("baseline_outputs")
    fitted, _ = fit_batches(spec.eval_batches, shapes)
    # the reference outputs are the exact QDQ arithmetic (what ARM int8 kernels compute), not x86's
    reference = write_reference(tmp / REFERENCE_NAME, make_session(model_path, 1, optimize=False), fitted)
    reference.update(rtol=ARM64_RTOL, max_rel_error=DEVICE_MAX_REL_ERROR, outputs="exact QDQ arithmetic: model.onnx without graph optimizations")
    section = {"input_shapes": shapes, "ort": ort_info, "usability": use, "verify": verify, "reference": reference,
               "sizes": {"ort": file_sizes(ort_path)}, "ort_keeps": _ort_keeps(ort_info)}
    checks = _checks(verify, limit)
    ready, why = emulator_status()
    if ready:
        from sqexport.runtime_check.arm64_check import verify_arm64

        with stage("mobile.arm64") as rec:
            arm, arm_checks = verify_arm64(ort_path, spec.eval_batches, spec.eval_labels, base_out,
                                           spec.task != "feature-extraction", Gates(limit), spec.postprocess,
                                           exact=model_path)
            rec["params"]["samples"] = arm["samples"]
        section["arm64"] = arm
        checks += arm_checks
    else:
        section["arm64"] = {"skipped": why}
    return section, checks


def _ort_keeps(ort_info: dict) -> str:
    sparse = ort_info.get("sparse_initializers", 0)
    return (f"model.ort keeps {sparse} sparse initializer(s) sparse (the ORT format stores them; onnxruntime "
            "densifies them when a session loads)" if sparse else
            "model.ort stores every initializer dense (none was smaller stored sparse)")
