"""The app bundle `<name>-mobile.zip`: model.ort, model.onnx (fixed shapes), the operator config,
reference inputs/outputs for an on-device self-test, the runner, a README for app developers and
manifest.json (interface, preprocessing, labels, metrics, runtime versions, sha256 of every file)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx

from sqexport.contracts.files import copy_regular, plain_name, sha256_file
from sqexport.contracts.errors import ConfigError, ModelLoadError, OutputError, first_line
from sqexport.exporters.bundle_readme import render_readme
from sqexport.exporters.mobile import ORT_CONFIG_NAME, PREPROCESSING_KEY

__all__ = ["build_bundle", "write_reference", "bundle_name", "sha256_file", "REFERENCE_NAME", "RUNNER_NAME",
           "MANIFEST_NAME", "REQUIRED_FILES", "TOKENIZER_PREFIXES"]

REFERENCE_NAME = "reference.npz"
RUNNER_NAME = "run_model.py"
MANIFEST_NAME = "manifest.json"
REQUIRED_FILES = ("model.ort", "model.onnx", ORT_CONFIG_NAME, REFERENCE_NAME)
_RUNNER_SRC = Path(__file__).resolve().parents[1] / "runtime_check" / "device_runner.py"
_DTYPES = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 2: "uint8", 3: "int8"}
REFERENCE_MAX_BYTES = 2_000_000  # keeps the self-test data small next to the model
TOKENIZER_PREFIXES = ("tokenizer", "vocab", "special_tokens", "merges")



def bundle_name(model_name) -> str:
    """`<name>-mobile.zip`; the name comes from report.json (data from disk): a plain file name
    only, so `"../../escaped"` cannot place the zip outside the folder."""
    return f"{plain_name(model_name)}-mobile.zip"


def _section(value) -> dict:
    """A report section as a mapping; anything else (a hand-edited report) counts as absent."""
    return value if isinstance(value, dict) else {}


def write_reference(path: Path, session, feeds: list[dict], max_samples: int = 8) -> dict:
    """reference.npz: `input:NAME` / `output:NAME`, first axis = sample, each sample one run at the
    fixed shapes (`feeds`), outputs as this host's onnxruntime computes them from the .ort."""
    names = [o.name for o in session.get_outputs()]
    ins: dict = {}
    outs: dict = {}
    for feed in feeds[:max_samples]:
        res = session.run(None, feed)
        if outs and sum(r.nbytes for r in res) * (len(outs[names[0]]) + 1) > REFERENCE_MAX_BYTES:
            break
        for k, v in feed.items():
            ins.setdefault(k, []).append(v)
        for n, r in zip(names, res):
            outs.setdefault(n, []).append(r)
    arrays = {f"input:{k}": np.stack(v) for k, v in ins.items()}
    arrays.update({f"output:{k}": np.stack(v) for k, v in outs.items()})
    np.savez_compressed(path, **arrays)
    return {"file": REFERENCE_NAME, "samples": len(outs[names[0]]),
            "arrays": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}}


def _tensors(values) -> list[dict]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        layout = "NCHW" if len(shape) == 4 else "NLC (batch, tokens, features)" if len(shape) == 3 else \
            "NL (batch, tokens)" if len(shape) == 2 and _DTYPES.get(tt.elem_type) in ("int64", "int32") else \
            "NC (batch, features)" if len(shape) == 2 else None
        out.append({"name": v.name, "shape": shape, "dtype": _DTYPES.get(tt.elem_type, str(tt.elem_type)),
                    "layout": layout})
    return out


def _metadata(path: Path) -> tuple[onnx.ModelProto, dict]:
    try:
        model = onnx.load(str(path), load_external_data=False)
        pre = json.loads({p.key: p.value for p in model.metadata_props}.get(PREPROCESSING_KEY, "{}"))
    except Exception as exc:  # protobuf's DecodeError, a damaged metadata entry
        raise ModelLoadError(f"{path.name} in the output folder is not a valid ONNX model: {first_line(exc)}") from None
    return model, _section(pre)


def _manifest(outdir: Path, report: dict, files: list[str]) -> dict:
    model, pre = _metadata(outdir / "model.onnx")
    mobile = _section(report.get("mobile"))
    conv, use, ver = (_section(mobile.get(k)) for k in ("ort", "usability", "verify"))
    return {
        "name": plain_name(report.get("model")), "task": report.get("task"), "generated_by": "sqexport",
        "inputs": _tensors(model.graph.input), "outputs": _tensors(model.graph.output),
        "preprocessing": pre.get("preprocessing", {}), "labels": pre.get("labels"),
        "metrics": {"accuracy": report.get("accuracy"), "ort_accuracy": ver.get("accuracy"),
                    "ort_vs_model_onnx": ver.get("vs_model_onnx"), "host_latency_ms": ver.get("latency_ms"),
                    "host_memory_mb": ver.get("memory_mb"), "size_bytes": report.get("size_bytes"),
                    "passed": report.get("passed")},
        "onnxruntime": {"version_used": _section(report.get("versions")).get("onnxruntime"),
                        "ort_format_version": conv.get("ort_format_version"),
                        "min_version_reading_model_ort": conv.get("min_onnxruntime"),
                        "optimization_style": conv.get("optimization_style")},
        "session_options": {"required": {}, "note": "model.ort is 'Fixed'-style: optimizations are baked in, "
                            "nothing to replay; a 'Runtime'-style .ort would need "
                            "session.enable_saved_runtime_optimizations=1"},
        "execution_provider": _section(use.get("recommended_provider")) or {"android": "CPU", "ios": "CPU"},
        "usability_notes": use.get("notes", []),
        "self_test": {**_section(mobile.get("reference")), "runner": RUNNER_NAME},
        "files": {f: {"sha256": sha256_file(outdir / f), "bytes": (outdir / f).stat().st_size} for f in files},
    }


def build_bundle(outdir: Path, report: dict, zip_path: Path | None = None) -> dict:
    """Write the zip (atomically: temp file then rename); return what the report says about it."""
    outdir = Path(outdir)
    missing = [f for f in REQUIRED_FILES if not (outdir / f).is_file()]
    if missing:
        raise ConfigError(f"{outdir} has no {', '.join(missing)}: build it with `sqexport MODEL --target mobile`")
    zip_path = Path(zip_path or outdir / bundle_name(report.get("model")))
    with tempfile.TemporaryDirectory(prefix="sqexport-bundle-") as tmp:
        stage = Path(tmp)
        files = ["model.ort", "model.onnx", ORT_CONFIG_NAME, REFERENCE_NAME]
        files += sorted(p.name for p in outdir.iterdir() if p.name.startswith(TOKENIZER_PREFIXES))
        for f in files:  # regular files only: a symlink is refused, never followed into the bundle
            copy_regular(outdir / f, stage / f, "bundle file")
        shutil.copyfile(_RUNNER_SRC, stage / RUNNER_NAME)
        files.append(RUNNER_NAME)
        try:  # report.json and model.onnx are data from disk: a hand-edited value is bad input
            manifest = _manifest(stage, report, files)
            readme = render_readme(manifest)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
            raise ConfigError(f"{outdir}: report.json or model.onnx is not what sqexport writes "
                              f"({type(exc).__name__}: {first_line(exc)})") from None
        (stage / "README.md").write_text(readme)
        manifest["files"]["README.md"] = {"sha256": sha256_file(stage / "README.md"),
                                          "bytes": (stage / "README.md").stat().st_size}
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        part = zip_path.with_name(f".{zip_path.name}.part-{os.getpid()}")
        try:
            with zipfile.ZipFile(part, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
                for f in [MANIFEST_NAME, "README.md", *files]:
                    zf.write(stage / f, arcname=f)
            part.replace(zip_path)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise OutputError(f"cannot write {zip_path}: {exc.strerror}") from None
    return {"file": zip_path.name, "bytes": zip_path.stat().st_size, "files": [MANIFEST_NAME, "README.md", *files]}
