"""`sqexport bench MODEL_OR_BUNDLE --device D`: the bundled runner (or onnxruntime_perf_test) on a
device; the host checks it ran the same model and reproduced the reference outputs, applies
--max-device-latency-ms and writes `device_latency` into the report beside the input."""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

from contracts.errors import ConfigError
from exporters.bundle import MANIFEST_NAME, REFERENCE_NAME, RUNNER_NAME, sha256_file
from runtime_check.arm64 import ARM64_RTOL, DEVICE_MAX_REL_ERROR
from runtime_check.device import parse_device, run_on_device
from runtime_check.report import render_markdown

__all__ = ["bench", "REPRODUCE_MIN_COSINE"]

RUNNER_SRC = Path(__file__).resolve().parents[1] / "runtime_check" / "device_runner.py"
# x86 CPUs without VNNI saturate full-range int8 weights (runtime_check/isa.py): there the outputs
# are judged at the task level instead of element-wise
REPRODUCE_MIN_COSINE = 0.99


def _inputs(target: Path, tmp: Path) -> tuple[Path, Path | None, Path, dict, Path | None]:
    """(model, reference or None, runner, manifest, folder whose report.json gets the result)."""
    if not target.exists():
        raise ConfigError(f"no such model or bundle: {target}")
    if target.suffix == ".zip":
        try:
            with zipfile.ZipFile(target) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, OSError) as exc:
            raise ConfigError(f"{target} is not a readable zip: {exc}") from None
        if not (tmp / "model.ort").is_file():
            raise ConfigError(f"{target} is not an sqexport mobile bundle (no model.ort)")
        manifest = json.loads((tmp / MANIFEST_NAME).read_text()) if (tmp / MANIFEST_NAME).is_file() else {}
        for name, entry in manifest.get("files", {}).items():
            if (tmp / name).is_file() and sha256_file(tmp / name) != entry["sha256"]:
                raise ConfigError(f"{target}: {name} does not match its sha256 in the manifest")
        return tmp / "model.ort", tmp / REFERENCE_NAME, tmp / RUNNER_NAME, manifest, target.parent
    folder = target if target.is_dir() else target.parent
    model = folder / "model.ort" if target.is_dir() else target
    if model.suffix not in (".ort", ".onnx") or not model.is_file():
        raise ConfigError(f"{target}: expected a <name>-mobile.zip, an output folder with model.ort, or a .ort/.onnx")
    ref = folder / REFERENCE_NAME if (folder / REFERENCE_NAME).is_file() else None
    return model, ref, RUNNER_SRC, {}, folder


def _reproduced(ref: dict | None, rtol: float, saturates: bool, max_rel_error: float = DEVICE_MAX_REL_ERROR) -> tuple[bool | None, str]:
    if not ref:
        return None, "no reference outputs next to the model: not checked"
    tol = rtol * max(ref["reference_max_abs"], 1.0)
    if ref["max_abs_diff"] <= tol:
        return True, f"max |diff| {ref['max_abs_diff']:.3g} <= {tol:.3g} ({rtol} x largest |output|)"
    if ref.get("max_rel_error") is not None and ref["max_rel_error"] <= max_rel_error:
        # ARM kernels requantize in fixed point: rounding flips move a few coordinates, not the vector
        return True, (f"per-sample relative L2 error {ref['max_rel_error']:.3g} <= {max_rel_error} "
                      f"(max |diff| {ref['max_abs_diff']:.3g})")
    if saturates:
        why = f"x86 without VNNI saturates full-range int8 weights (max |diff| {ref['max_abs_diff']:.3g}); "
        if "argmax_agreement" in ref:
            return ref["argmax_agreement"] == 1.0, why + f"judged by argmax agreement {ref['argmax_agreement']:.4f}"
        ok = ref.get("min_cosine", 0.0) >= REPRODUCE_MIN_COSINE
        return ok, why + f"judged by cosine {ref.get('min_cosine', 0.0):.4f} >= {REPRODUCE_MIN_COSINE}"
    return False, f"max |diff| {ref['max_abs_diff']:.3g} > {tol:.3g} ({rtol} x largest |output|)"


def _checks(section: dict, max_latency_ms: float | None) -> list[dict]:
    checks = [{"name": "device_same_model", "passed": section["same_model"], "value": float(section["same_model"]),
               "limit": 1.0, "unit": "sha256 match"}]
    if section["reproduced"] is not None:
        checks.append({"name": "device_reproduces_reference", "passed": section["reproduced"],
                       "value": float(section["reproduced"]), "limit": 1.0, "unit": "within tolerance"})
    if max_latency_ms is not None:
        p50 = min(v["p50"] for v in section["latency_ms"].values())
        checks.append({"name": "device_latency_p50_ms", "passed": p50 <= max_latency_ms, "value": p50,
                       "limit": max_latency_ms, "unit": "ms"})
    return checks


def _write_report(folder: Path | None, section: dict) -> str | None:
    path = folder / "report.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    report = json.loads(path.read_text())
    report["device_latency"] = section
    for name, text in (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", render_markdown(report))):
        part = folder / f".{name}.part-{os.getpid()}"
        part.write_text(text)
        part.replace(folder / name)
    return str(path)


def bench(target: Path, device: str, device_cmd: str | None = None, perf_test: str | None = None,
          python: str | None = None, threads: str = "1,2", iters: int = 50,
          max_latency_ms: float | None = None) -> dict:
    dev = parse_device(device, device_cmd, perf_test, python)
    with tempfile.TemporaryDirectory(prefix="sqexport-bench-") as tmp:
        model, ref, runner, manifest, folder = _inputs(Path(target), Path(tmp))
        if perf_test:
            if not Path(perf_test).is_file():
                raise ConfigError(f"--perf-test {perf_test}: no such file")
            files = [model, Path(perf_test)]
        else:
            files = [model, runner] + ([ref] if ref else [])
        sha = sha256_file(model)
        result, command = run_on_device(dev, files, model.name, threads, iters, perf_test, ref is not None)
    self_test = manifest.get("self_test") or {}
    rtol = self_test.get("rtol") or ARM64_RTOL
    same = result.get("model_sha256", sha) == sha  # perf_test reports no hash: the pushed file is the one
    reproduced, how = _reproduced(result.get("reference"), rtol, bool(result.get("int8_saturates")),
                                  self_test.get("max_rel_error") or DEVICE_MAX_REL_ERROR)
    section = {"device": dev.name, "command": command, "runner": result.get("runner"),
               "model": model.name, "model_sha256": sha, "same_model": same,
               "reproduced": reproduced, "reproduction": how, "reference": result.get("reference"),
               "latency_ms": result["latency_ms"], "threads": threads, "iters": iters,
               "onnxruntime": result.get("onnxruntime"), "cpu": result.get("cpu"), "machine": result.get("machine"),
               "memory_mb": result.get("memory_mb")}
    section["checks"] = _checks(section, max_latency_ms)
    section["passed"] = all(c["passed"] for c in section["checks"])
    section["report"] = _write_report(folder, section)
    return section
