"""End to end through the CLI: `sqexport export digits-cnn` and friends (in-process, CliRunner)."""
import json
import os
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from sqexport.exporters.sparse import deflated_size
from sqexport.models.zoo import builtin_names

EXPECTED_FILES = [".sqexport-manifest.json", "baseline.onnx", "latency_vs_metric.png", "model.onnx", "report.json",
                  "report.md", "snr.png", "sparsity.png"]  # the output files (and manifest), and the plots report.md links
CNN_LAYERS = {"features.0": 32 * 1 * 9, "features.3": 64 * 32 * 9, "features.7": 64 * 64 * 9, "classifier": 10 * 64}


def _ort_logits(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": x})[0]


def _assert_clean_error(result, code):
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    return errors[0]


# ---------------------------------------------------------------- the default run (shared fixture)

def test_default_export_exit_code_and_files(default_export):
    r = default_export.result
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(default_export.out)) == EXPECTED_FILES
    assert os.listdir(default_export.out.parent) == [default_export.out.name]  # no temp folders left
    assert "digits-cnn" in r.output and "accuracy" in r.output


def test_report_json_has_the_design_fields(default_export):
    rep = default_export.report
    assert rep["model"] == "digits-cnn" and rep["target"] == "cpu" and rep["passed"] is True

    names = [s["name"] for s in rep["stages"]]
    assert "prune.magnitude" in names and "quantize.int8" in names
    assert names.index("prune.magnitude") < names.index("quantize.int8")
    for s in rep["stages"]:
        assert isinstance(s["params"], dict) and isinstance(s["seconds"], (int, float)) and s["seconds"] >= 0
    prune = rep["stages"][names.index("prune.magnitude")]["params"]
    # no --sparsity: the amount chosen within the gate's and the fidelity floor's shares is the one run
    chosen = rep["sparsity_choice"]["chosen"]
    assert prune["sparsity"] == chosen > 0 and prune["scope"] == "global"
    assert rep["sparsity_choice"]["min_cosine"] == pytest.approx(0.9975)
    assert rep["stages"][names.index("quantize.int8")]["params"]["bias_correction"] is True  # the default
    assert all(t["cosine"] >= 0.9975 for t in rep["sparsity_choice"]["tried"] if t["sparsity"] <= chosen)

    sp = rep["sparsity"]
    assert set(sp["layers"]) == set(CNN_LAYERS)
    weighted = sum(sp["layers"][k] * n for k, n in CNN_LAYERS.items()) / sum(CNN_LAYERS.values())
    assert sp["overall"] == pytest.approx(weighted)
    assert sp["overall"] == pytest.approx(chosen, abs=1 / sum(CNN_LAYERS.values()))

    size, out = rep["size_bytes"], default_export.out
    assert size["baseline"] == (out / "baseline.onnx").stat().st_size
    assert size["model"] == (out / "model.onnx").stat().st_size
    assert size["compressed"] == deflated_size(out / "model.onnx")
    assert size["compressed"] < size["model"] < size["baseline"]

    acc = rep["accuracy"]
    assert acc["metric"] == "top1"
    assert 90.0 <= acc["model"] <= 100.0 and 90.0 <= acc["baseline"] <= 100.0  # percent
    assert acc["drop"] == pytest.approx(acc["baseline"] - acc["model"]) and acc["drop_unit"] == "points"

    lat = rep["latency_ms"]
    assert isinstance(lat["threads"], int) and lat["threads"] >= 1
    for entry in [lat] + ([lat["at_1_thread"]] if lat["threads"] != 1 else []):
        for side in ("baseline", "model"):
            assert 0 < entry[side]["p50"] <= entry[side]["p90"]
        assert entry["speedup"] == pytest.approx(entry["baseline"]["p50"] / entry["model"]["p50"])
    if lat["threads"] != 1:  # cpu target: also reported at 1 thread
        assert lat["at_1_thread"]["threads"] == 1

    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["accuracy_drop"]["passed"] is True and checks["accuracy_drop"]["limit"] == 1.0
    assert checks["accuracy_drop"]["value"] == acc["drop"]  # the same number, in points
    for c in rep["checks"]:
        assert {"name", "passed", "value", "limit"} <= set(c)

    fid = rep["fidelity"]
    assert fid["max_abs_deviation"] <= 0.05 * fid["reference_max_abs"]


def test_model_onnx_is_a_sparse_int8_qdq_model(default_export, onnx_tools):
    model = onnx.load(str(default_export.out / "model.onnx"))
    onnx.checker.check_model(model)
    assert onnx_tools.op_count(model, "QuantizeLinear") >= 4
    assert onnx_tools.op_count(model, "DequantizeLinear") >= 8
    compute = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    rows = onnx_tools.quantized_weights(model)
    assert len(rows) == len(compute) == 4  # every conv / linear weight is int8
    for r in rows:
        assert r.q.dtype == np.int8 and (r.zero_point == 0).all()
    zeros = sum(int((r.q == 0).sum()) for r in rows)
    total = sum(r.q.size for r in rows)
    assert zeros / total >= default_export.report["sparsity"]["overall"] - 1e-9 > 0  # rounding may add zeros
    # no FP32 conv/linear weights remain
    big_float = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) >= 2]
    assert big_float == []


def test_model_onnx_accuracy_checked_independently(default_export, digits_split):
    x, y = digits_split.x_eval, digits_split.y_eval
    base = _ort_logits(default_export.out / "baseline.onnx", x).argmax(1)
    model = _ort_logits(default_export.out / "model.onnx", x).argmax(1)
    base_acc, model_acc = (base == y).mean(), (model == y).mean()
    assert 100 * (base_acc - model_acc) <= 1.0
    acc = default_export.report["accuracy"]
    assert acc["baseline"] == pytest.approx(100 * base_acc) and acc["model"] == pytest.approx(100 * model_acc)
    assert default_export.report["fidelity"]["argmax_agreement"] >= 0.995


def test_report_md_matches_report_json(default_export):
    from sqexport.runtime_check.report import render_markdown

    md = (default_export.out / "report.md").read_text()
    assert md == render_markdown(default_export.report)
    assert "PASSED" in md and "accuracy_drop" in md and "features.3" in md


def test_recipe_in_the_report_reloads(default_export, tmp_path):
    import yaml

    from sqexport.toolchain.recipe import Recipe, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(default_export.report["recipe"]))
    recipe = load_recipe(path)
    assert [s.qualified for s in recipe.stages] == ["prune.magnitude", "transform.smoothquant", "quantize.int8"]
    assert recipe.to_dict() == Recipe.from_dict(default_export.report["recipe"]).to_dict()


# ---------------------------------------------------------------- other runs

def _nonzeros_per_group(q, in_axis, m):
    w = np.moveaxis(q, in_axis, -1)
    pad = (-w.shape[-1]) % m
    w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)])
    return (w.reshape(-1, m) != 0).sum(1)


@pytest.fixture(scope="module")
def nm_export(tmp_path_factory, run_cli):
    """Short form `sqexport MODEL ...` with no -o: the default folder ./sqexport-out/MODEL."""
    cwd = tmp_path_factory.mktemp("nm-cwd")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = run_cli(["digits-cnn", "--prune", "nm", "--nm", "2:4", "--threads", "1"])
    finally:
        os.chdir(old)
    out = cwd / "sqexport-out" / "digits-cnn"
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return SimpleNamespace(result=result, out=out, cwd=cwd, report=report)


@pytest.mark.e2e
def test_short_form_and_default_output_folder(nm_export):
    assert nm_export.result.exit_code == 0, nm_export.result.output
    assert sorted(os.listdir(nm_export.cwd)) == ["sqexport-out"]
    assert sorted(os.listdir(nm_export.out)) == EXPECTED_FILES


@pytest.mark.e2e
def test_nm_2_4_pattern_in_every_int8_weight(nm_export, onnx_tools):
    model = onnx.load(str(nm_export.out / "model.onnx"))
    rows = onnx_tools.quantized_weights(model)
    assert len(rows) == 4
    for r in rows:
        counts = _nonzeros_per_group(r.q, r.in_axis, 4)
        assert counts.max() <= 2, r.node.name
    # the layers with >= 4 input channels are pruned to 50 %
    wide = [r for r in rows if r.q.shape[r.in_axis] % 4 == 0]
    assert len(wide) == 3 and all((r.q == 0).mean() >= 0.5 for r in wide)
    # the 1-input-channel stem conv cannot be grouped: skipped, and the report says why
    skipped = nm_export.report["sparsity"]["skipped"]
    assert [s["layer"] for s in skipped] == ["features.0"] and "1 input channel" in skipped[0]["reason"]
    assert nm_export.report["sparsity"]["layers"]["features.0"] == 0.0
    assert "skipped by prune.nm: 1 input channel" in (nm_export.out / "report.md").read_text()
    stage = next(s for s in nm_export.report["stages"] if s["name"] == "prune.nm")
    assert (stage["params"]["n"], stage["params"]["m"]) == (2, 4)
    assert nm_export.report["latency_ms"]["threads"] == 1 and "at_1_thread" not in nm_export.report["latency_ms"]


@pytest.mark.e2e
def test_failing_gate_exits_1_and_still_writes_everything(tmp_path, run_cli):
    out = tmp_path / "out"
    result = run_cli(["export", "digits-cnn", "--max-latency-ms", "0.000001", "--threads", "1", "-o", out])
    line = _assert_clean_error(result, 1)
    assert "latency" in line
    assert sorted(os.listdir(out)) == EXPECTED_FILES
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] is False
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["latency_p50_ms"]["passed"] is False and checks["latency_p50_ms"]["limit"] == 0.000001
    assert checks["accuracy_drop"]["passed"] is True
    assert "FAILED" in (out / "report.md").read_text()


@pytest.mark.e2e
def test_recipe_file_with_flag_override(tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n"
                      "  - type: prune.magnitude\n    params: {sparsity: 0.3, scope: layer}\n"
                      "  - type: quantize.int8\n    params: {observer: minmax}\n"
                      "gates: {max_accuracy_drop: 5.0}\n")
    out = tmp_path / "out"
    result = run_cli(["export", "digits-cnn", "--recipe", recipe, "--sparsity", "0.6", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    stages = {s["type"]: s["params"] for s in rep["recipe"]["stages"]}
    assert stages["prune.magnitude"] == {"sparsity": 0.6, "scope": "layer"}  # flag wins, scope from file
    assert stages["quantize.int8"]["observer"] == "minmax"
    assert rep["recipe"]["gates"]["max_accuracy_drop"] == 5.0
    for name, n in CNN_LAYERS.items():  # layer scope: every layer at 60 %
        assert rep["sparsity"]["layers"][name] == pytest.approx(0.6, abs=1.5 / n)


def test_rerun_replaces_a_previous_output_folder(tmp_path, run_cli, default_export):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(default_export.out, out)
    result = run_cli(["export", "digits-mlp", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == EXPECTED_FILES
    assert json.loads((out / "report.json").read_text())["model"] == "digits-mlp"
    assert os.listdir(tmp_path) == ["out"]


def test_existing_folder_with_unrelated_files_is_not_wiped(tmp_path, run_cli, digits_split):
    """-o pointing at a folder that holds the user's own files (e.g. `-o .`, or the folder the
    --calib-data lives in) is refused with exit 2, naming a file, and nothing in it changes."""
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    np.save(out / "calib.npy", digits_split.x_calib)
    result = run_cli(["export", "digits-cnn", "--calib-data", out / "calib.npy", "--threads", "1", "-o", out])
    assert result.exit_code == 2, result.output
    assert f"output folder {out} already holds files sqexport did not write" in result.output
    assert sorted(os.listdir(out)) == ["calib.npy", "notes.txt"] and (out / "notes.txt").read_text() == "precious"


@pytest.mark.e2e
def test_mlp_gemm_relu_export(tmp_path, run_cli, onnx_tools):
    out = tmp_path / "mlp"
    # the fallback's predicted drop on digits-mlp sits at the 1-point gate (1.07 predicted, 0.22 real):
    # a looser gate keeps every Gemm quantized, which is what this test looks at
    result = run_cli(["export", "digits-mlp", "--threads", "1", "--max-accuracy-drop", "2", "-o", out])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "model.onnx"))
    # Flatten -> Gemm -> Relu -> Gemm -> Relu -> Gemm: Q/DQ on the first Gemm's input and on both
    # rectified outputs (each shared with the next Gemm's input); DQ for 3 weights + 3 int32 biases
    assert onnx_tools.op_count(model, "QuantizeLinear") == 3
    assert onnx_tools.op_count(model, "DequantizeLinear") == 9
    rows = onnx_tools.quantized_weights(model)
    assert [r.node.op_type for r in rows] == ["Gemm"] * 3
    assert [r.q.shape for r in rows] == [(256, 64), (128, 256), (10, 128)]
    rep = json.loads((out / "report.json").read_text())
    assert rep["passed"] and rep["fidelity"]["argmax_agreement"] >= 0.995
    assert rep["accuracy"]["drop"] <= 1.0  # points


@pytest.mark.e2e
def test_prune_none_quant_none_is_the_fp32_model(tmp_path, run_cli, onnx_tools):
    out = tmp_path / "fp32"
    result = run_cli(["digits-mlp", "--prune", "none", "--quant", "none", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out / "model.onnx"))
    assert onnx_tools.op_count(model, "QuantizeLinear") == onnx_tools.op_count(model, "DequantizeLinear") == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["sparsity"]["overall"] == 0.0 and rep["accuracy"]["drop"] == 0.0
    assert not any(s["name"].startswith(("prune.", "quantize.")) for s in rep["stages"])
    assert rep["recipe"]["stages"] == []


# ---------------------------------------------------------------- listing commands

def test_models_lists_every_builtin(run_cli):
    result = run_cli(["models"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    for name in builtin_names():
        assert any(line.startswith(name + " ") for line in lines), name
    assert any(line.startswith("digits-cnn") and "[default]" in line for line in lines)


def test_methods_lists_what_works(run_cli):
    result = run_cli(["methods"])
    assert result.exit_code == 0
    rows = {tuple(line.split()[:2]) for line in result.output.splitlines()}
    for row in [("prune", "magnitude"), ("prune", "nm"), ("prune", "none"), ("quantize", "int8"), ("quantize", "none")]:
        assert row in rows


def test_help_and_version(run_cli):
    result = run_cli(["--help"])
    assert result.exit_code == 0 and "export" in result.output and "inspect" in result.output
    result = run_cli(["export", "--help"])
    for opt in ("--target", "--prune", "--sparsity", "--nm", "--quant", "--calib-data", "--eval-data",
                "--max-accuracy-drop", "--min-speedup", "--max-latency-ms", "--threads", "--recipe",
                "--output", "--seed"):
        assert opt in result.output, opt


def test_same_seed_same_model(run_cli, tmp_path, default_export):
    """A second run with the same settings writes a byte-identical model.onnx and the same numbers."""
    out = tmp_path / "again"
    result = run_cli(["export", "digits-cnn", "-o", out])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").read_bytes() == (default_export.out / "model.onnx").read_bytes()
    again = json.loads((out / "report.json").read_text())
    assert again["accuracy"] == default_export.report["accuracy"]
    assert again["sparsity"] == default_export.report["sparsity"]
