"""Issue 20 items 6 and 7: `check` and `export` fail (exit 1) what should fail. A model that
disagrees with its baseline fails without --eval-data too (a stated limit on synthetic inputs, or
the output folder's own baseline), ARM64 tiers that match x86 do not make a broken model pass, and
NaN / infinite outputs fail both commands with the reason in the report."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sqexport.runtime_check.arm64_check as arm64_check


def _break_largest_int8_weight(src, dst, seed=0):
    """The largest int8 weight tensor replaced by random values: a valid graph computing garbage."""
    model = onnx.load(str(src))
    ints = [i for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.int8]
    target = max(ints, key=lambda i: numpy_helper.to_array(i).size)
    noise = np.random.default_rng(seed).integers(-127, 128, numpy_helper.to_array(target).shape).astype(np.int8)
    target.CopyFrom(numpy_helper.from_array(noise, target.name))
    onnx.save(model, str(dst))
    return dst


@pytest.fixture
def broken(default_export, tmp_path):
    return _break_largest_int8_weight(default_export.out / "model.onnx", tmp_path / "broken.onnx")


def _json(result):
    return json.loads(result.output[:result.output.rindex("}") + 1])


def test_a_broken_model_fails_against_its_baseline_without_eval_data(run_cli, default_export, broken):
    result = run_cli(["check", broken, "--baseline", default_export.out / "baseline.onnx", "--threads", "1", "--json"])
    assert result.exit_code == 1, result.output
    res = _json(result)
    drop = next(c for c in res["checks"] if c["name"] == "accuracy_drop")
    assert not drop["passed"] and drop["limit"] == 25.0 and "synthetic" in res["accuracy"]["note"]
    ok = run_cli(["check", default_export.out / "model.onnx", "--baseline", default_export.out / "baseline.onnx",
                  "--threads", "1"])
    assert ok.exit_code == 0, ok.output  # the stated limit passes the real model


def test_a_broken_model_fails_with_labelled_data(run_cli, default_export, broken, eval_npz):
    result = run_cli(["check", broken, "--baseline", default_export.out / "baseline.onnx", "--eval-data", eval_npz,
                      "--threads", "1"])
    assert result.exit_code == 1 and "accuracy_drop" in result.output and "FAILED" in result.output


def test_a_broken_model_in_its_output_folder_fails_against_the_folders_baseline(run_cli, default_export, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(default_export.out, folder)
    _break_largest_int8_weight(folder / "model.onnx", folder / "model.onnx")
    result = run_cli(["check", folder / "model.onnx", "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert "from the output folder" in result.output and "accuracy_drop" in result.output


def test_without_a_baseline_no_drop_is_claimed(run_cli, broken, eval_npz):
    result = run_cli(["check", broken, "--eval-data", eval_npz, "--threads", "1"])
    assert "accuracy_drop" not in result.output and "not measured" in result.output, result.output


def test_arm64_tiers_matching_x86_do_not_pass_a_broken_model(run_cli, default_export, broken, monkeypatch):
    """The emulator is replaced by x86's own outputs: every tier "matches x86" exactly."""
    from sqexport.runtime_check.session import make_session

    def same_as_x86(model_path, feeds, tiers, budget_s=None):
        session = make_session(model_path, 1)
        names = [o.name for o in session.get_outputs()]
        runs = [session.run(None, f) for f in feeds]
        outputs = {n: np.stack([r[i] for r in runs]) for i, n in enumerate(names)}
        return {t: {"outputs": outputs, "runner": {"machine": "aarch64"}} for t in tiers}
    monkeypatch.setattr(arm64_check, "run_tiers", same_as_x86)
    result = run_cli(["check", broken, "--baseline", default_export.out / "baseline.onnx", "--arch", "arm64",
                      "--threads", "1", "--json"])
    assert result.exit_code == 1, result.output
    res = _json(result)
    names = {c["name"]: c["passed"] for c in res["checks"]}
    assert names["arm64_cortex-a53_matches_x86"] and not names["accuracy_drop"]
    assert names["arm64_cortex-a53_accuracy_drop"] is False


def _constant_model(path, value):
    """y = x * 0 + value, 3 logits per sample: all NaN or all -inf outputs."""
    node_mul = helper.make_node("Mul", ["x", "zero"], ["z"])
    node_add = helper.make_node("Add", ["z", "c"], ["y"])
    graph = helper.make_graph([node_mul, node_add], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(np.zeros(3, np.float32), "zero"),
                               numpy_helper.from_array(np.full(3, value, np.float32), "c")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("value", [np.nan, -np.inf, np.inf])
def test_non_finite_outputs_fail_check(run_cli, tmp_path, value):
    model = _constant_model(tmp_path / "nan.onnx", value)
    for args in (["--baseline", model, "--max-accuracy-drop", "0"], []):
        result = run_cli(["check", model, *args, "--threads", "1", "--json"])
        assert result.exit_code == 1, result.output
        check = next(c for c in _json(result)["checks"] if c["name"] == "finite_outputs")
        assert not check["passed"] and check["value"] == 1.0 and "NaN or infinite" in check["note"]


NETS = '''
import torch
from torch import nn


class Bad(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.value = value

    def forward(self, x):
        return self.fc(x) * 0.0 + self.value


def nan():
    return Bad(float("nan"))


def neginf():
    return Bad(float("-inf"))
'''


@pytest.mark.e2e
@pytest.mark.parametrize("factory", ["nan", "neginf"])
def test_non_finite_outputs_fail_export(run_cli, tmp_path, monkeypatch, factory):
    import sys

    (tmp_path / "badnets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    monkeypatch.delitem(sys.modules, "badnets", raising=False)
    result = run_cli([f"badnets:{factory}", "--input-shape", "1x4", "-o", tmp_path / "out", "--threads", "1", "-q"])
    assert result.exit_code == 1, result.output
    assert "finite_outputs" in result.output and "Traceback" not in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    check = next(c for c in report["checks"] if c["name"] == "finite_outputs")
    assert not check["passed"] and "NaN or infinite" in check["note"] and not report["passed"]
    assert "finite_outputs: NaN or infinite" in (tmp_path / "out" / "report.md").read_text()
