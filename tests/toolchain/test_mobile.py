"""`--target mobile`: fixed shapes, model.ort that matches model.onnx, usability data, the app bundle,
`sqexport package` and `sqexport check` on a .ort."""
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.shapes import parse_input_shapes
from sqexport.exporters.mobile import PREPROCESSING_KEY, resolve_fixed_shapes

RUNNER = Path(__file__).resolve().parents[2] / "runtime_check" / "device_runner.py"  # not the cwd's


def test_parse_input_shapes():
    assert parse_input_shapes(["1x3x224x224"]) == {None: (1, 3, 224, 224)}
    assert parse_input_shapes(["input_ids=1x128", "attention_mask=1X128"]) == {
        "input_ids": (1, 128), "attention_mask": (1, 128)}
    for bad, words in ((["1xa"], "'1xa': dimensions must be positive integers"),
                       (["x=0x3"], "'x=0x3': dimensions must be positive integers"),
                       (["=1x2"], "'=1x2': the input name before '=' is empty"),
                       (["a=1", "a=2"], "'a=2': give one unnamed shape, or one NAME=shape per input"),
                       (["1x2", "b=1x2"], "'b=1x2': give one unnamed shape, or one NAME=shape per input")):
        with pytest.raises(ConfigError, match=f"--input-shape {words}"):
            parse_input_shapes(bad)


def _graph(inputs):
    vis = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.INT64, dims) for n, dims in inputs.items()]
    out = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT64, None)
    node = onnx.helper.make_node("Add", list(inputs)[:2] * (2 if len(inputs) == 1 else 1), ["y"])
    return onnx.helper.make_model(onnx.helper.make_graph([node], "g", vis, [out]))


def test_resolve_fixed_shapes_shares_symbolic_dims():
    model = _graph({"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]})
    example = {"input_ids": np.zeros((4, 128), np.int64), "attention_mask": np.zeros((4, 128), np.int64)}
    assert resolve_fixed_shapes(model, {}, example) == {"input_ids": [1, 128], "attention_mask": [1, 128]}
    # the user's sequence length reaches every input that shares the dim
    assert resolve_fixed_shapes(model, {"input_ids": [1, 32]}, example) == {
        "input_ids": [1, 32], "attention_mask": [1, 32]}
    for user, words in (({"nope": [1, 2]}, "no input named nope; inputs: input_ids, attention_mask"),
                        ({"input_ids": [1, 2, 3]}, "input_ids=1x2x3: the input has rank 2"),
                        ({None: [1, 8]}, "the model has 2 inputs .*: give --input-shape NAME=DxD for each")):
        with pytest.raises(ConfigError, match=words):
            resolve_fixed_shapes(model, user, example)
    fixed = _graph({"x": [1, 8]})
    with pytest.raises(ConfigError, match="fixed to 8"):
        resolve_fixed_shapes(fixed, {None: [1, 9]}, None)


def test_mobile_export_writes_verified_ort(mobile_export, digits_split):
    assert mobile_export.result.exit_code == 0, mobile_export.result.output
    out, rep = mobile_export.out, mobile_export.report
    for f in ("model.ort", "model.onnx", "required_operators.config", "reference.npz", "digits-cnn-mobile.zip"):
        assert (out / f).is_file(), f
    assert "/" not in (out / "required_operators.config").read_text().split("\n", 3)[1]  # no absolute paths
    assert rep["target"] == "mobile" and rep["quantization"]["weight_range"]["max_abs_q"] == 127  # ARM: full range
    m = rep["mobile"]
    assert m["input_shapes"] == {"pixels": [1, 1, 8, 8]} and m["ort"]["ort_format_version"] == "6"
    # the .ort itself, row by row against model.onnx (fixed to batch 1)
    onnx_s, ort_s = ort.InferenceSession(str(out / "model.onnx")), ort.InferenceSession(str(out / "model.ort"))
    assert ort_s.get_inputs()[0].shape == [1, 1, 8, 8]
    for x in digits_split.x_eval[:40]:
        np.testing.assert_array_equal(onnx_s.run(None, {"pixels": x[None]})[0], ort_s.run(None, {"pixels": x[None]})[0])
    assert m["verify"]["samples"] == 450 and m["verify"]["vs_model_onnx"]["within_tolerance"]
    assert set(m["verify"]["latency_ms"]) == {"1", "2"} and m["verify"]["memory_mb"]["peak_rss"] > 0
    names = {c["name"]: c for c in rep["checks"]}
    assert names["ort_matches_onnx"]["passed"] and names["ort_accuracy_drop"]["passed"]
    # the preprocessing rides in the metadata and survives into the .ort
    meta = json.loads(ort_s.get_modelmeta().custom_metadata_map[PREPROCESSING_KEY])
    assert meta["preprocessing"]["size"] == [8, 8] and meta["labels"][3] == "3"
    # the fixture points the ARM64 check at an empty root: the report says what is missing, the
    # emulator itself first (a machine without `make arm64`), else the arm64 onnxruntime
    if shutil.which("qemu-aarch64-static") is None:
        assert m["arm64"] == {"skipped": "qemu-aarch64-static is not installed (run `make arm64`)"}
    else:
        root = out.parent / "no-emulator"
        assert m["arm64"] == {"skipped": f"no arm64 onnxruntime under {root} (run `make arm64`)"}


def test_usability_is_data(mobile_export):
    use = mobile_export.report["mobile"]["usability"]
    nnapi, coreml = use["nnapi"], use["coreml_mlprogram"]
    assert nnapi["nodes_covered"] == nnapi["nodes"] and nnapi["partitions"] == 1 and nnapi["verdict"] == "YES"
    assert {"ai.onnx:QuantizeLinear", "ai.onnx:DequantizeLinear"} <= set(coreml["unsupported_ops"])
    assert use["recommended_provider"] == {"android": "NNAPI", "ios": "CPU"}
    assert any("CoreML does not take QuantizeLinear" in n for n in use["notes"])
    assert "CoreML does not take" in (mobile_export.out / "report.md").read_text()


def test_bundle_manifest_hashes_and_readme(mobile_export, tmp_path):
    with zipfile.ZipFile(mobile_export.out / "digits-cnn-mobile.zip") as zf:
        zf.extractall(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert {"model.ort", "model.onnx", "required_operators.config", "reference.npz", "run_model.py",
            "README.md"} <= set(manifest["files"])
    assert manifest["inputs"] == [{"name": "pixels", "shape": [1, 1, 8, 8], "dtype": "float32", "layout": "NCHW"}]
    assert manifest["onnxruntime"]["version_used"] == ort.__version__ and manifest["labels"][0] == "0"
    assert manifest["execution_provider"]["ios"] == "CPU"
    readme = (tmp_path / "README.md").read_text()
    for text in ("onnxruntime-android:", "pod 'onnxruntime-objc'", "addNnapi()", "ORTSession(", "OnnxTensor.createTensor"):
        assert text in readme
    ref = np.load(tmp_path / "reference.npz")
    assert ref["input:pixels"].shape[1:] == (1, 1, 8, 8) and len(ref["output:logits"]) == len(ref["input:pixels"])


def test_bundled_runner_self_test(mobile_export, tmp_path):
    """The runner reports the model's sha256 and how far this CPU lands from the reference outputs."""
    import subprocess
    import sys

    out = mobile_export.out
    proc = subprocess.run([sys.executable, RUNNER, out / "model.ort", "--reference",
                           out / "reference.npz", "--threads", "1", "--iters", "3"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["model_sha256"] == hashlib.sha256((out / "model.ort").read_bytes()).hexdigest()
    assert res["reference"]["samples"] == 8 and res["reference"]["argmax_agreement"] == 1.0
    assert set(res["latency_ms"]) == {"1"}
    # the reference is the exact int8 arithmetic: an x86 CPU without VNNI saturates full-range weights
    # and lands measurably off (digits: cosine 0.977), an ARM CPU within rtol (tests/runtime_check/test_arm64.py)
    from sqexport.runtime_check.isa import int8_saturates

    assert res["int8_saturates"] == int8_saturates()
    if not res["int8_saturates"]:
        assert res["reference"]["max_abs_diff"] <= 0.01 * res["reference"]["reference_max_abs"]


def test_runner_budget_stops_after_the_first_sample_and_compares_those(mobile_export, tmp_path):
    """--budget-s 0: one sample runs (at least one always does) and only it is compared and saved."""
    import subprocess
    import sys

    out = mobile_export.out
    proc = subprocess.run([sys.executable, RUNNER, out / "model.ort", "--reference",
                           out / "reference.npz", "--no-timing", "--budget-s", "0", "--save-outputs",
                           tmp_path / "o.npz"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["reference"]["samples"] == 1 and res["reference"]["samples_given"] == 8
    saved = np.load(tmp_path / "o.npz")
    assert all(saved[k].shape[0] == 1 for k in saved.files)


def test_package_rebuilds_bundle_and_refuses_cpu_output(mobile_export, default_export, run_cli, tmp_path):
    result = run_cli(["package", mobile_export.out, "--target", "mobile", "-o", tmp_path / "b.zip"])
    assert result.exit_code == 0, result.output
    with zipfile.ZipFile(tmp_path / "b.zip") as zf:
        assert "model.ort" in zf.namelist() and "manifest.json" in zf.namelist()
    result = run_cli(["package", default_export.out, "--target", "mobile"])
    assert result.exit_code == 2 and "--target cpu" in result.output


def test_check_accepts_ort(mobile_export, run_cli, eval_npz, tmp_path):
    out = mobile_export.out
    result = run_cli(["check", out / "model.ort", "--baseline", out / "baseline.onnx", "--eval-data", eval_npz,
                      "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["accuracy"]["metric"] == "top1" and res["accuracy"]["model"] > 0.98
    bad = tmp_path / "bad.ort"
    bad.write_bytes(b"not a flatbuffer")
    result = run_cli(["check", bad])
    assert result.exit_code == 2 and "not a valid ORT format model" in result.output


def test_input_shape_needs_mobile_target(run_cli, tmp_path):
    result = run_cli(["digits-cnn", "--input-shape", "1x1x8x8", "-o", tmp_path / "o"])
    assert result.exit_code == 2 and "--target mobile" in result.output and not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_text_model_mobile_with_input_shape(run_cli, tiny_bert, tmp_path):
    out = tmp_path / "tb"
    old = os.environ.get("SQEXPORT_ARM64_ROOT")
    os.environ["SQEXPORT_ARM64_ROOT"] = str(tmp_path / "no-emulator")
    try:
        result = run_cli([tiny_bert, "--target", "mobile", "--input-shape", "input_ids=1x16", "-o", out,
                          "--threads", "1"])
    finally:
        os.environ.pop("SQEXPORT_ARM64_ROOT") if old is None else os.environ.__setitem__("SQEXPORT_ARM64_ROOT", old)
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    assert all(s == [1, 16] for s in rep["mobile"]["input_shapes"].values())
    assert rep["mobile"]["verify"]["vs_model_onnx"]["within_tolerance"]
    with zipfile.ZipFile(out / "tiny-bert-mobile.zip") as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("manifest.json"))
    assert "tokenizer_config.json" in names and manifest["preprocessing"]["type"] == "text"
    assert set(manifest["preprocessing"]["tokenizer_files"]) <= set(names)
