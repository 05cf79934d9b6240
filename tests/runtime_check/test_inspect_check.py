"""`sqexport inspect` and `sqexport check` on the files a default export produced."""
import json
import shutil

import onnx
import pytest

from sqexport.runtime_check.check import SYNTHETIC_MAX_DROP
from sqexport.runtime_check.inspect_model import inspect_onnx, load_onnx
from sqexport.contracts.errors import ModelLoadError


def test_inspect_text(run_cli, default_export):
    result = run_cli(["inspect", default_export.out / "model.onnx"])
    assert result.exit_code == 0, result.output
    assert "QuantizeLinear" in result.output and "int8" in result.output
    assert "quantized compute nodes 4/4" in result.output


def test_inspect_json_model(run_cli, default_export, onnx_tools):
    path = default_export.out / "model.onnx"
    result = run_cli(["inspect", path, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    model = onnx.load(str(path))
    assert info["quantize_linear"] == onnx_tools.op_count(model, "QuantizeLinear") > 0
    assert info["dequantize_linear"] == onnx_tools.op_count(model, "DequantizeLinear")
    assert info["nodes"] == len(model.graph.node) and info["opset"] == 17
    assert info["compute_nodes"] == info["quantized_compute_nodes"] == 4
    assert {w["op"] for w in info["weights"]} == {"Conv", "Gemm"}
    assert all(w["dtype"] == "int8" and w["activation_qdq"] for w in info["weights"])
    rows = onnx_tools.quantized_weights(model)
    zeros, total = sum(int((r.q == 0).sum()) for r in rows), sum(r.q.size for r in rows)
    assert info["weight_sparsity"] == pytest.approx(zeros / total)
    assert info["weight_sparsity"] >= default_export.report["sparsity"]["overall"] - 1e-9 > 0
    assert info["weight_bytes"] == total  # one byte per int8 weight
    assert info["size_bytes"]["raw"] == path.stat().st_size
    assert info["size_bytes"]["compressed"] == default_export.report["size_bytes"]["compressed"]
    assert info["inputs"][0]["name"] == "pixels" and info["outputs"] == ["logits"]


def test_inspect_json_baseline(default_export):
    info = inspect_onnx(default_export.out / "baseline.onnx")
    assert info["quantize_linear"] == info["dequantize_linear"] == info["quantized_compute_nodes"] == 0
    assert info["compute_nodes"] == 4
    assert all(w["dtype"] == "float32" and not w["activation_qdq"] for w in info["weights"])
    assert info["weight_sparsity"] < 0.01


def test_load_onnx_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_onnx(tmp_path / "x.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x99garbage")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_onnx(tmp_path / "bad.onnx")


def test_check_with_baseline_and_labelled_eval_data(run_cli, default_export, eval_npz):
    out = default_export.out
    result = run_cli(["check", out / "model.onnx", "--baseline", out / "baseline.onnx", "--eval-data", eval_npz,
                      "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["passed"] is True and res["data"] == str(eval_npz)
    acc, rep_acc = res["accuracy"], default_export.report["accuracy"]
    assert acc["metric"] == "top1"
    assert acc["model"] == pytest.approx(rep_acc["model"]) and acc["baseline"] == pytest.approx(rep_acc["baseline"])
    assert acc["drop"] <= 1.0 and acc["drop_unit"] == "points"
    lat = res["latency_ms"]
    assert lat["threads"] == 1 and lat["speedup"] == pytest.approx(lat["baseline"]["p50"] / lat["model"]["p50"])
    assert [c["name"] for c in res["checks"]] == ["accuracy_drop", "finite_outputs"]


def test_check_with_baseline_synthetic_data(run_cli, default_export):
    """Without --eval-data the seeded synthetic inputs are gated at SYNTHETIC_MAX_DROP (25 points of
    top-1 agreement): the correct int8 digits-cnn passes it (it moves ~3 points of random inputs)."""
    out = default_export.out
    result = run_cli(["check", out / "model.onnx", "--baseline", out / "baseline.onnx", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["data"] == "synthetic" and res["accuracy"]["metric"] == "top1_agreement" and res["passed"] is True
    assert res["accuracy"]["baseline"] == 100.0 and 75.0 <= res["accuracy"]["model"] <= 100.0
    gate = next(c for c in res["checks"] if c["name"] == "accuracy_drop")
    assert gate["limit"] == SYNTHETIC_MAX_DROP["points"] and gate["passed"] and gate["value"] == res["accuracy"]["drop"]


def test_check_text_output_with_baseline(run_cli, default_export, eval_npz):
    out = default_export.out
    result = run_cli(["check", out / "model.onnx", "--baseline", out / "baseline.onnx", "--eval-data", eval_npz,
                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "latency" in result.output and "vs baseline" in result.output


def test_check_without_baseline(run_cli, default_export, tmp_path):
    """A model on its own: nothing to measure a drop against, so no accuracy gate (and no "0.00
    ok"); its outputs must still be finite."""
    shutil.copy(default_export.out / "model.onnx", tmp_path / "model.onnx")
    result = run_cli(["check", tmp_path / "model.onnx", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["baseline"] is None and [c["name"] for c in res["checks"]] == ["finite_outputs"]
    assert "speedup" not in res["latency_ms"] and res["accuracy"]["drop"] is None


def test_check_in_an_output_folder_uses_its_baseline(run_cli, default_export):
    """The folder's baseline.onnx is used with synthetic inputs: the same gate as above, passed."""
    result = run_cli(["check", default_export.out / "model.onnx", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["passed"] is True and res["data"] == "synthetic"
    assert res["baseline"] == str(default_export.out / "baseline.onnx") and "output folder" in res["baseline_from"]
    assert "accuracy_drop" in [c["name"] for c in res["checks"]] and "speedup" in res["latency_ms"]


def test_check_failing_latency_gate(run_cli, default_export):
    result = run_cli(["check", default_export.out / "model.onnx", "--threads", "1", "--max-latency-ms", "0.000001"])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "FAILED" in result.output


def test_check_for_the_mobile_target_reports_nnapi_and_coreml_coverage(run_cli, default_export):
    """`check --target mobile` is not a no-op: it adds what a phone's runtimes would take."""
    out = default_export.out
    args = ["check", out / "model.onnx", "--baseline", out / "baseline.onnx", "--threads", "1"]
    cpu = json.loads(run_cli([*args, "--json"]).output)
    assert cpu["target"] == "cpu" and "mobile_usability" not in cpu
    result = run_cli([*args, "--target", "mobile", "--json"])
    assert result.exit_code == 0, result.output
    use = json.loads(result.output)["mobile_usability"]
    assert use["nnapi"]["provider"] == "Android NNAPI" and 0 < use["nnapi"]["nodes_covered"] <= use["nnapi"]["nodes"]
    assert use["recommended_provider"]["android"] in ("NNAPI", "CPU")
    text = run_cli([*args, "--target", "mobile"]).output
    assert "  mobile    NNAPI takes" in text


def _full_range_model(tmp_path):
    """A tiny QDQ MatMul whose int8 weights have same-sign adjacent pairs above 128 (and one below)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = np.array([[100, 0], [100, 5], [-60, -70], [-60, 70]], np.int8)  # (K=4, N=2): column 0 pairs (100, 100)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.float32(0.01), "w_s"),
             numpy_helper.from_array(np.int8(0), "w_z")]
    graph = helper.make_graph([helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"]),
                               helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "full.onnx"
    onnx.save(model, str(path))
    return path


def test_saturating_pairs_counts_the_weight_pairs_avx2_kernels_cannot_add(tmp_path):
    from sqexport.runtime_check.saturation import saturating_pairs

    # K pairs (rows 0,1) and (rows 2,3): column 0 (100, 100) same sign 200 > 128; (-60, -60) 120 fits;
    # column 1 (0, 5) fits; (-70, 70) opposite signs never saturate
    assert saturating_pairs(onnx.load(str(_full_range_model(tmp_path)))) == {"pairs": 1, "layers": 1}


@pytest.mark.parametrize("saturates", [True, False])
def test_check_warns_when_this_cpus_kernels_would_saturate_the_model(run_cli, tmp_path, monkeypatch, saturates):
    import sqexport.runtime_check.check as check

    monkeypatch.setattr(check, "int8_saturates", lambda: saturates)
    path = _full_range_model(tmp_path)
    result = run_cli(["check", path, "--threads", 1])
    assert result.exit_code == 0, result.output
    assert ("weight pairs in 1 layer(s) exceed" in result.output) is saturates
    as_json = json.loads(run_cli(["check", path, "--threads", 1, "--json"]).output)
    assert (as_json.get("host_int8") or {}).get("pairs", 0) == (1 if saturates else 0)
