"""`--prune structured` and `--recover` through the CLI on digits-cnn (a few recovery steps)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest


@pytest.fixture(scope="module")
def structured_export(tmp_path_factory, run_cli):
    out = tmp_path_factory.mktemp("structured") / "out"
    res = run_cli(["digits-cnn", "--prune", "structured", "--sparsity", "0.5", "--recover",
                   "--recover-steps", "40", "--max-accuracy-drop", "50", "-o", out])
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.e2e
def test_report_has_structure_and_recovery(structured_export):
    out, rep = structured_export
    st = rep["structure"]
    assert st["macs"]["after"] < 0.4 * st["macs"]["before"]
    assert st["params"]["after"] < st["params"]["before"]
    assert st["layers"]["features.0"] == {"before": [32, 1, 3, 3], "after": [16, 1, 3, 3]}
    assert sum(st["removed"]["channels"].values()) > 0
    rec = rep["recovery"]
    assert rec["steps"] == 40 and rec["metric"] == "top1" and rec["labels_used"] is True
    assert rec["metric_after"] > rec["metric_before"]
    # the same metric on training samples (unaugmented): optimization vs generalization gap
    assert rec["train_metric_samples"] > 0 and 0 <= rec["train_metric_before"] <= 100
    assert rec["train_metric_after"] > rec["train_metric_before"]
    assert rec["loss_curve"][-1][1] < rec["loss_curve"][0][1]
    # sparsity counts removed weights against the dense layer sizes
    assert rep["sparsity"]["layers"]["features.0"] == pytest.approx(0.5)
    names = [s["name"] for s in rep["stages"]]
    assert names.index("prune.structured") < names.index("recover.distill") < names.index("quantize.int8")


@pytest.mark.e2e
def test_slim_model_onnx_is_int8_and_smaller(structured_export, onnx_tools):
    out, rep = structured_export
    model = onnx.load(str(out / "model.onnx"))
    rows = onnx_tools.quantized_weights(model)
    shapes = sorted(tuple(r.q.shape) for r in rows)
    assert (16, 1, 3, 3) in shapes and (32, 16, 3, 3) in shapes
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"pixels": np.zeros((2, 1, 8, 8), np.float32)})[0]
    assert y.shape == (2, 10)


@pytest.mark.parametrize("args, message", [
    (["--recover-steps", "5"], "need --recover"),
    (["--prune", "none", "--recover"], "choose a pruning method"),
    (["--no-recover", "--recover-minutes", "1"], "contradict --no-recover"),
])
def test_recovery_flag_errors(run_cli, tmp_path, args, message):
    res = run_cli(["digits-cnn", *args, "-o", tmp_path / "o"])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o").exists()
