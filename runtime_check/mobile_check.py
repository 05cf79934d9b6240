"""Mobile checks as data: NNAPI/CoreML coverage (onnxruntime's usability checker) and how the .ort
itself behaves (outputs vs model.onnx, accuracy gate, latency at 1 and 2 threads, peak memory)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from sqexport.exporters.sparse import densify
from sqexport.runtime_check.accuracy import classification_metrics, embedding_metrics
from sqexport.runtime_check.fixed_inputs import fit_batches
from sqexport.runtime_check.latency import measure_pair
from sqexport.runtime_check.session import make_session

__all__ = ["usability", "compare_outputs", "task_metrics", "verify_ort", "peak_memory", "SAME_HOST_RTOL",
           "COREML_QDQ_NOTE"]

# .ort vs model.onnx on the same machine: the same kernels run, so only float noise is allowed
# (measured: bit-identical for digits-cnn and MiniLM). Relative to the largest |output|.
SAME_HOST_RTOL = 1e-4
COREML_QDQ_NOTE = ("CoreML does not take QuantizeLinear/DequantizeLinear: on iOS this int8 model runs on "
                   "the CPU execution provider (ARM int8 kernels); do not enable CoreML for it")
_EPS = {"nnapi": ("Android NNAPI", None),
        "coreml_mlprogram": ("CoreML MLProgram", "coreml_supported_mlprogram_ops.md"),
        "coreml_neuralnetwork": ("CoreML NeuralNetwork", "coreml_supported_neuralnetwork_ops.md")}


def _partition_data(info) -> dict:
    pct = info.num_supported_nodes / info.num_nodes if info.num_nodes else 0.0
    return {"nodes": info.num_nodes, "nodes_covered": info.num_supported_nodes, "coverage": round(pct, 4),
            "partitions": info.num_partitions, "unsupported_ops": sorted(info.unsupported_ops),
            "nodes_unsupported_by_op": info.nodes_unsupported_due_to_op,
            "nodes_unsupported_by_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
            "verdict": info.suitability().name}


def usability(onnx_path: Path) -> dict:
    """Per execution provider: partitions, nodes covered, unsupported ops and the checker's verdict
    (YES / MAYBE / NO), on the graph after basic optimizations as the ORT converter sees it."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import optimize_model

    with tempfile.TemporaryDirectory(prefix="sqexport-usability-") as tmp:
        source = Path(onnx_path)
        model = onnx.load(str(source))
        if model.graph.sparse_initializer:
            # the checker only knows dense initializers (it takes sparse ones for missing inputs);
            # storage does not change which nodes a provider takes
            source = Path(tmp) / "dense.onnx"
            onnx.save(densify(model), str(source))
        optimized = Path(tmp) / "model.onnx"
        optimize_model(source, optimized, use_external_initializers=True)
        model = uc.ModelProtoWithShapeInfo(optimized).model_with_shape_info
        result = {}
        for key, (label, ops_file) in _EPS.items():
            info = (uc.check_nnapi_partitions(model, True) if ops_file is None
                    else uc.check_coreml_partitions(model, True, ops_file))
            result[key] = {"provider": label, **_partition_data(info)}
    qdq = {"ai.onnx:QuantizeLinear", "ai.onnx:DequantizeLinear"}
    notes = []
    if qdq & set(result["coreml_mlprogram"]["unsupported_ops"]):
        notes.append(COREML_QDQ_NOTE)
    nnapi = result["nnapi"]
    notes.append(f"NNAPI takes {nnapi['nodes_covered']}/{nnapi['nodes']} nodes in {nnapi['partitions']} "
                 f"partition(s): {'enable it' if nnapi['verdict'] == 'YES' else 'the CPU provider is the safe choice'}")
    result["recommended_provider"] = {"android": "NNAPI" if nnapi["verdict"] == "YES" else "CPU",
                                      "ios": "CoreML" if result["coreml_mlprogram"]["verdict"] == "YES" else "CPU"}
    result["notes"] = notes
    return result


def compare_outputs(ref: np.ndarray, got: np.ndarray, rtol: float) -> dict:
    """Max |diff| against a stated tolerance (rtol x the largest |reference output|)."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = float(np.abs(ref64 - got64).max()) if ref.size else 0.0
    tol = rtol * max(float(np.abs(ref64).max()), 1.0)
    out = {"max_abs_diff": diff, "tolerance": tol, "rtol": rtol, "within_tolerance": diff <= tol,
           "bit_identical": bool(np.array_equal(ref, got))}
    if ref.ndim == 2 and ref.shape[-1] > 1:
        out["argmax_agreement"] = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return out


def task_metrics(task: str, base: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict:
    if task == "feature-extraction":
        return embedding_metrics(base, out)
    return classification_metrics(base, out, labels)


def _outputs(path: Path, fitted: list[dict], n: int, postprocess: Callable, threads: int = 1) -> np.ndarray:
    session = make_session(path, threads)
    return np.concatenate([postprocess(session.run(None, b), b) for b in fitted])[:n]


def peak_memory(model_path: Path) -> dict:
    """Peak resident memory of a fresh process that loads the model and runs it once (the runner
    shipped in the bundle), and how much of it the session added."""
    runner = Path(__file__).with_name("device_runner.py")
    proc = subprocess.run([sys.executable, str(runner), str(model_path), "--no-timing", "--threads", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip() or "runner failed").splitlines()[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])["memory_mb"]


def verify_ort(ort_path: Path, onnx_path: Path, baseline_path: Path, batches: list[dict],
               labels: np.ndarray | None, postprocess: Callable, task: str, shapes: dict) -> dict:
    """The .ort's outputs vs model.onnx's (same fixed-shape rows), its metric vs baseline.onnx,
    interleaved latency vs the baseline at 1 and 2 threads, and a session's peak memory."""
    fitted, n = fit_batches(batches, shapes)
    ort_out = _outputs(ort_path, fitted, n, postprocess)
    onnx_out = _outputs(onnx_path, fitted, n, postprocess)
    base_out = _outputs(baseline_path, fitted, n, postprocess)
    feed = fitted[0]
    latency = {str(t): measure_pair(baseline_path, ort_path, feed, t, budget_s=4.0) for t in (1, 2)}
    return {"samples": n, "vs_model_onnx": compare_outputs(onnx_out, ort_out, SAME_HOST_RTOL),
            "accuracy": task_metrics(task, base_out, ort_out, labels), "latency_ms": latency,
            "memory_mb": peak_memory(ort_path), "baseline_outputs": base_out}
