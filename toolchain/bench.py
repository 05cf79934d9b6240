"""`sqexport bench MODEL_OR_BUNDLE --device D`: sqexport's own runner (or onnxruntime_perf_test) on a
device; the host checks it ran the same model and reproduced the reference outputs, applies
--max-device-latency-ms and writes `device_latency` into the report beside the input when the
output folder's manifest proves sqexport wrote that report.

Nothing from the input runs: a bundle's run_model.py is never read (toolchain/bundle_reader.py),
the runner pushed is runtime_check/device_runner.py, and every file is pushed under a fixed name
(model.ort / model.onnx, reference.npz, run_model.py), so a hostile file name never reaches a shell.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from sqexport.contracts.errors import ConfigError, OutputError
from sqexport.contracts.files import read_regular_bytes, require_regular, sha256_file
from sqexport.runtime_check.arm64 import ARM64_RTOL, DEVICE_MAX_REL_ERROR
from sqexport.runtime_check.device import RUNNER_ON_DEVICE, parse_device, run_on_device
from sqexport.runtime_check.report import render_markdown
from sqexport.runtime_check.report_schema import schema_errors, strict_reports
from sqexport.toolchain import signals
from sqexport.toolchain.bundle_reader import read_bundle
from sqexport.toolchain.manifest import manifest_exists, owned, read_manifest, record

__all__ = ["bench", "REPRODUCE_MIN_COSINE", "RUNNER_SRC"]

RUNNER_SRC = Path(__file__).resolve().parents[1] / "runtime_check" / "device_runner.py"
REFERENCE_NAME = "reference.npz"
PERF_TEST_NAME = "onnxruntime_perf_test"
REPORT_MAX_BYTES = 64 << 20
# x86 CPUs without VNNI saturate full-range int8 weights (runtime_check/isa.py): there the outputs
# are judged at the task level instead of element-wise
REPRODUCE_MIN_COSINE = 0.99


def _stage(src: Path, stage: Path, name: str) -> Path:
    dest = stage / name
    if src != dest:
        shutil.copyfile(src, dest)
    return dest


def _inputs(target: Path, stage: Path) -> tuple[Path, Path | None, dict, Path]:
    """(model, reference or None, the bundle's checked tolerances, folder of the report), all
    staged in `stage` under the names they are pushed as."""
    if not os.path.lexists(target):
        raise ConfigError(f"no such model or bundle: {target}")
    if target.suffix == ".zip":
        bundle = read_bundle(target, stage)
        return bundle.model, bundle.reference, bundle.self_test, target.parent
    require_regular(target, "model or output folder", dir_ok=True)
    folder = target if target.is_dir() else target.parent
    model = folder / "model.ort" if target.is_dir() else target
    if model.suffix not in (".ort", ".onnx") or not model.is_file():
        raise ConfigError(f"{target}: expected a <name>-mobile.zip, an output folder with model.ort, or a .ort/.onnx")
    require_regular(model, "model")
    ref = folder / REFERENCE_NAME
    ref = _stage(require_regular(ref, "reference data"), stage, REFERENCE_NAME) if ref.is_file() else None
    return _stage(model, stage, f"model{model.suffix}"), ref, {}, folder


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


def _owned_report(folder: Path) -> tuple[dict | None, str | None]:
    """report.json beside the input when sqexport provably wrote it (and report.md, if present):
    (report, None), else (None, why it is left alone)."""
    if not (folder / "report.json").is_file():
        return None, None
    left = f"{folder / 'report.json'} left as it is: "
    try:
        files = read_manifest(folder) if manifest_exists(folder) else None
    except OutputError:
        files = None
    if files is None or not owned(folder, "report.json", files) or \
            (os.path.lexists(folder / "report.md") and not owned(folder, "report.md", files)):
        return None, left + "sqexport's manifest does not prove it wrote report.json / report.md (or they changed)"
    try:
        raw = read_regular_bytes(folder / "report.json", "report", limit=REPORT_MAX_BYTES)
        report = json.loads(raw.decode("utf-8"))
    except (ConfigError, ValueError, RecursionError):
        return None, left + "it is not a readable JSON report"
    if not isinstance(report, dict):
        return None, left + "it is not a JSON object"
    errors = schema_errors(report)
    if errors:
        return None, left + f"it does not follow report.json's schema ({errors[0]})"
    return report, None


def _write_report(folder: Path, section: dict) -> tuple[str | None, str | None]:
    """(path written, None) or (None, why not). Writes report.json and report.md atomically and
    records both in the folder's manifest, so the folder stays replaceable by the next export."""
    report, why = _owned_report(folder)
    if report is None:
        return None, why
    report["device_latency"] = section
    errors = schema_errors(report) if strict_reports() else []
    if errors:
        raise AssertionError("report.json with device_latency deviates from its schema: " + "; ".join(errors))
    try:
        texts = (("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", render_markdown(report)))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return None, f"{folder / 'report.json'} left as it is: not a report sqexport can render ({type(exc).__name__})"
    with signals.deferred():  # both files and the manifest, or (on an error) the old ones
        for name, text in texts:
            part = folder / f".{name}.part-{os.getpid()}"
            try:
                part.write_text(text)
                part.replace(folder / name)
            except OSError as exc:
                part.unlink(missing_ok=True)
                raise OutputError(f"cannot write {folder / name}: {exc.strerror or exc}") from None
        record(folder, ["report.json", "report.md"])
    return str(folder / "report.json"), None


def _perf_test_file(perf_test: str, stage: Path) -> Path:
    src = require_regular(Path(perf_test), "--perf-test")
    dest = _stage(src, stage, PERF_TEST_NAME)
    dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dest


def bench(target: Path, device: str, device_cmd: str | None = None, perf_test: str | None = None,
          python: str | None = None, threads: str = "1,2", iters: int = 50,
          max_latency_ms: float | None = None) -> dict:
    dev = parse_device(device, device_cmd, perf_test, python)  # a bad template fails before anything runs
    with tempfile.TemporaryDirectory(prefix="sqexport-bench-stage-") as tmp:
        stage = Path(tmp)
        model, ref, self_test, folder = _inputs(Path(target), stage)
        runner = _stage(RUNNER_SRC, stage, RUNNER_ON_DEVICE)
        if perf_test:
            files = [model, _perf_test_file(perf_test, stage)]
        else:
            files = [model, runner] + ([ref] if ref else [])
        sha = sha256_file(model)
        try:
            result, command = run_on_device(dev, files, model.name, threads, iters,
                                            PERF_TEST_NAME if perf_test else None, ref is not None)
        finally:
            if dev.name == "local":  # also when a signal cut the device's own cleanup short
                with signals.deferred():
                    shutil.rmtree(dev.dir, ignore_errors=True)
    rtol = self_test.get("rtol") or ARM64_RTOL
    # perf_test reports no hash: the pushed file is the one timed
    same = True if perf_test else result.get("model_sha256") == sha
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
    section["report"], note = _write_report(folder, section)
    if note:
        section["report_note"] = note
    return section
