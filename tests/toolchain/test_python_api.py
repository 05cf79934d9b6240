"""The Python API (sqexport.export / check / package): the same runs as the CLI, typed results,
typed exceptions instead of exit codes, and a CLI that still exits 1/2 with one line."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import sqexport
from sqexport import (CheckReport, ConfigError, GateFailed, InputError, ModelLoadError, OutputError, Report,
                      SqexportError)

ROOT = Path(__file__).resolve().parents[2]
FAST = {"prune": "none", "threads": 1}  # digits-mlp without pruning: a few seconds per run
CLI_FAST = ["--prune", "none", "--threads", "1"]


class TinyNet(nn.Module):
    """Conv -> BN -> ReLU -> Linear on 1x8x8 images: a user's own module, built in the test."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def pair(tmp_path_factory, run_cli):
    """digits-mlp exported once by the CLI and once by the API, same options and seed."""
    root = tmp_path_factory.mktemp("pair")
    cli = run_cli(["digits-mlp", *CLI_FAST, "--seed", "3", "-o", root / "cli"])
    assert cli.exit_code == 0, cli.output
    report = sqexport.export("digits-mlp", output=root / "api", seed=3, **FAST)
    return report, json.loads((root / "cli" / "report.json").read_text()), root


def _stable(report: dict) -> dict:
    """report.json without what a second run measures anew (timings, latencies, and the note a
    latency below FP32's adds)."""
    stable = {k: v for k, v in report.items() if k not in ("stages", "latency_ms")}
    stable["notes"] = [n for n in report["notes"] if not n.startswith("model.onnx is SLOWER than baseline.onnx")]
    return stable


def test_export_writes_what_the_cli_writes(pair):
    report, cli, root = pair
    api = json.loads((root / "api" / "report.json").read_text())
    assert _stable(api) == _stable(cli)
    assert (root / "api" / "model.onnx").read_bytes() == (root / "cli" / "model.onnx").read_bytes()
    assert report.to_dict() == api  # the Report is that file, nothing added or dropped


def test_report_attributes_are_the_report_json_fields(pair):
    report, cli, root = pair
    assert isinstance(report, Report) and report.passed is True
    assert (report.model, report.target, report.task) == (cli["model"], cli["target"], cli["task"])
    assert report.output_dir == root / "api"
    acc = cli["accuracy"]
    assert (report.accuracy.metric, report.accuracy.drop, report.accuracy.baseline, report.accuracy.model) == \
        (acc["metric"], acc["drop"], acc["baseline"], acc["model"])
    assert report.accuracy.drop_unit == "points" and report.accuracy.samples == acc["samples"]
    assert report.sparsity.overall == 0.0 and dict(report.sparsity.layers) == cli["sparsity"]["layers"]
    assert report.size_bytes.model == cli["size_bytes"]["model"]
    assert report.latency_ms.threads == 1 and report.latency_ms.model.p50 > 0
    assert report.latency_ms.speedup == pytest.approx(report.latency_ms.baseline.p50 / report.latency_ms.model.p50)
    assert [(c.name, c.passed, c.value, c.limit, c.unit) for c in report.checks] == \
        [(c["name"], c["passed"], c["value"], c["limit"], c["unit"]) for c in cli["checks"]]
    assert report.failed_checks == () and report.schema_version == cli["schema_version"]
    assert report["quantization"] == cli["quantization"] and "recipe" in report


def test_report_is_read_only(pair):
    report = pair[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.passed = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.accuracy.drop = 0.0
    with pytest.raises(TypeError):
        report.sparsity.layers["fc1"] = 1.0
    section = report["accuracy"]
    section["drop"] = -1.0
    assert report["accuracy"]["drop"] == report.accuracy.drop != -1.0


def test_report_load_reads_an_output_folder(pair, tmp_path):
    report, _, root = pair
    assert Report.load(root / "api") == report
    with pytest.raises(ConfigError, match="is not an sqexport output folder"):
        Report.load(tmp_path)


def test_a_report_with_keys_the_api_does_not_name_still_loads():
    data = {"model": "m", "passed": True, "checks": [{"name": "x", "passed": True, "value": 1, "limit": 2,
                                                      "unit": "ms", "later": "kept"}],
            "accuracy": {"metric": "top1", "drop": 0.1, "new_field": 1}, "schema_version": "9", "extra": {"a": 1}}
    report = Report.from_dict(data)
    assert report.accuracy.drop == 0.1 and report["accuracy"]["new_field"] == 1
    assert report.schema_version == report["schema_version"] == "9" and report.checks[0].limit == 2
    assert report.latency_ms.model is None and report.size_bytes.model is None


def test_an_nn_module_exports_and_its_onnx_runs(tmp_path, caplog):
    torch.manual_seed(0)
    net = TinyNet()  # left in training mode: the export must not switch the caller's module
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="sqexport"):
        report = sqexport.export(net, input_shape=(1, 1, 8, 8), output=tmp_path / "out", **FAST)
    assert report.model == "TinyNet" and report.passed
    assert report["source"]["kind"] == "nn.Module" and report["source"]["input_shapes"] == {"x": [1, 1, 8, 8]}
    assert any("synthetic" in r.getMessage() for r in caplog.records)  # no data given: said, not hidden
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    session = ort.InferenceSession(str(report.output_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: x})
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    assert out.shape == (5, 3)
    assert np.abs(out - expected).max() < 0.1 * np.abs(expected).max()  # int8 of the same function


def test_an_nn_module_takes_example_inputs(tmp_path):
    torch.manual_seed(0)
    example = torch.rand(4, 1, 8, 8)
    report = sqexport.export(TinyNet(), example_inputs=(example,), quant="none", output=tmp_path / "out", **FAST)
    assert report["source"]["input_shapes"] == {"x": [4, 1, 8, 8]}
    assert report["recipe"]["stages"] == []  # nothing pruned, nothing quantized: a plain FP32 export


@pytest.mark.parametrize("model, kwargs, error, match", [
    ("digits-mlp", {"prune": "bogus"}, ConfigError, r"prune must be one of .*magnitude.*; got 'bogus'"),
    ("digits-mlp", {"sparsity": 1.5}, ConfigError, r"sparsity must be a number in \[0, 1\), got 1.5"),
    ("digits-mlp", {"sparsity": "0.5"}, ConfigError, r"sparsity must be a number, got '0.5'"),
    ("digits-mlp", {"target": "gpu"}, ConfigError, r"target must be one of cpu, mobile; got 'gpu'"),
    ("digits-mlp", {"input_shape": (1, 64)}, ModelLoadError, r"--input-shape gives the example input"),
    ("digits-mlp", {"example_inputs": np.zeros((1, 64))}, ConfigError, r"example_inputs gives an nn.Module"),
    ("digits-mlp", {"recover_steps": 0}, ConfigError, r"recover_steps must be at least 1, got 0"),
    ("digits-mlp", {"auto_minutes": 5.0}, ConfigError, r"--auto-minutes needs --auto"),
    ("digits-mlp", {"recipe": "missing.yaml"}, ConfigError, r"missing\.yaml"),
    ("no-such-model", {}, ModelLoadError, r"unknown model 'no-such-model'; built-in models: .*digits-cnn"),
    (42, {}, ConfigError, r"model must be a built-in name, a path, 'pkg.module:factory' or a torch.nn.Module"),
    (TinyNet(), {}, ConfigError, r"an nn.Module \(TinyNet\) needs an example input"),
    (TinyNet(), {"example_inputs": (torch.rand(1, 1, 8, 8), torch.rand(1, 2))}, ConfigError,
     r"example_inputs holds 2 tensor\(s\); forward\(\) takes 1 \(x\)"),
    (TinyNet(), {"input_shape": (1, 1, 8, 8), "task": "sequence-classification"}, ModelLoadError,
     r"task applies to Hugging Face folders"),
], ids=["method", "range", "type", "target", "shape-builtin", "example-builtin", "steps", "auto-minutes",
        "recipe", "unknown-model", "not-a-model", "module-no-shape", "module-two-inputs", "module-task"])
def test_bad_input_raises_a_typed_error_and_writes_nothing(tmp_path, monkeypatch, model, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match) as caught:
        sqexport.export(model, **kwargs)
    assert isinstance(caught.value, InputError) and caught.value.exit_code == 2
    assert os.listdir(tmp_path) == []


def test_a_foreign_output_folder_is_an_output_error(tmp_path):
    (tmp_path / "mine.txt").write_text("not sqexport's")
    with pytest.raises(OutputError, match="mine.txt"):
        sqexport.export("digits-mlp", output=tmp_path, **FAST)
    assert os.listdir(tmp_path) == ["mine.txt"]


@pytest.fixture(scope="module")
def failed(tmp_path_factory):
    """An export whose latency gate cannot pass (p50 at most 1 ns)."""
    out = tmp_path_factory.mktemp("gate") / "out"
    with pytest.raises(GateFailed) as caught:
        sqexport.export("digits-mlp", output=out, max_latency_ms=1e-6, **FAST)
    return caught.value, out


def test_a_failed_gate_raises_with_the_report_written(failed):
    exc, out = failed
    assert isinstance(exc, SqexportError) and not isinstance(exc, InputError) and exc.exit_code == 1
    assert str(exc).startswith("gate failed: latency_p50_ms ") and str(exc).endswith(f"report written to {out}")
    assert isinstance(exc.report, Report) and exc.report.passed is False
    assert [c.name for c in exc.report.failed_checks] == ["latency_p50_ms"]
    assert json.loads((out / "report.json").read_text()) == exc.report.to_dict()
    assert (out / "model.onnx").is_file()


def test_raise_on_gate_false_returns_the_failed_report(failed, tmp_path):
    report = sqexport.export("digits-mlp", output=failed[1], max_latency_ms=1e-6, raise_on_gate=False, **FAST)
    assert report.passed is False and report.failed_checks[0].limit == 1e-6


def test_the_cli_still_exits_1_on_a_failed_gate_with_one_line(run_cli, tmp_path):
    result = run_cli(["digits-mlp", *CLI_FAST, "--max-latency-ms", "0.000001", "-o", tmp_path / "out", "-q"])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert errors == [f"Error: gate failed: {errors[0].split('gate failed: ')[1]}"]
    assert "latency_p50_ms" in errors[0] and errors[0].endswith(f"report written to {tmp_path / 'out'}")
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["digits-mlp", "--sparsity", "1.5"], "--sparsity"),
    (["digits-mlp", "--input-shape", "1x64"], "--input-shape gives the example input"),
    (["no-such-model"], "unknown model 'no-such-model'"),
])
def test_the_cli_still_exits_2_on_bad_input_with_one_line(run_cli, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    result = run_cli(args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []


def test_check_gives_what_the_cli_check_prints(pair, run_cli):
    model = pair[2] / "api" / "model.onnx"
    result = sqexport.check(model, threads=1)
    printed = json.loads(run_cli(["check", model, "--threads", "1", "--json"]).output)
    assert isinstance(result, CheckReport) and result.passed
    assert result.accuracy == sqexport.Report.from_dict({"accuracy": printed["accuracy"]}).accuracy
    assert result.baseline == printed["baseline"] == str(pair[2] / "api" / "baseline.onnx")
    assert result["baseline_from"] == printed["baseline_from"] and result.data == "synthetic"
    assert [c.name for c in result.checks] == [c["name"] for c in printed["checks"]]


def test_check_raises_on_a_failed_gate_and_on_bad_input(pair, tmp_path):
    model = pair[2] / "api" / "model.onnx"
    with pytest.raises(GateFailed, match=r"^gate failed: latency_p50_ms") as caught:
        sqexport.check(model, threads=1, max_latency_ms=1e-6)
    assert isinstance(caught.value.report, CheckReport) and not caught.value.report.passed
    with pytest.raises(ConfigError, match=r"threads must be an integer in \[1, \d+\], got 0"):
        sqexport.check(model, threads=0)
    with pytest.raises(ModelLoadError, match="missing.onnx"):
        sqexport.check(tmp_path / "missing.onnx")


def test_package_refuses_what_the_cli_refuses(pair, tmp_path):
    with pytest.raises(ConfigError, match="exported with --target cpu; package needs"):
        sqexport.package(pair[2] / "api")
    with pytest.raises(ConfigError, match="target must be one of mobile, got 'cpu'"):
        sqexport.package(pair[2] / "api", target="cpu")
    with pytest.raises(ConfigError, match="is not a folder"):
        sqexport.package(tmp_path / "nothing")


def test_package_builds_the_bundle_of_a_mobile_export(tmp_path):
    out = tmp_path / "mobile"
    report = sqexport.export("digits-mlp", target="mobile", output=out, **FAST)
    bundle = sqexport.package(out, output=tmp_path / "app.zip")
    assert bundle.path == (tmp_path / "app.zip").resolve() and bundle.bytes == bundle.path.stat().st_size
    assert "model.ort" in bundle.files and report.size_bytes.ort > 0


def test_import_is_cheap_and_the_one_liner_works_from_a_shell(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    lazy = subprocess.run([sys.executable, "-c", "import sys, sqexport; sqexport.export; sqexport.Report; "
                           "print('torch' in sys.modules, sqexport.__version__)"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert lazy.stdout.split() == ["False", sqexport.__version__], lazy.stderr
    run = subprocess.run([sys.executable, "-c", "import sqexport; r = sqexport.export('digits-mlp', output='o', "
                          "prune='none', threads=1); print(r.accuracy.drop)"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.strip()) == json.loads((tmp_path / "o" / "report.json").read_text())["accuracy"]["drop"]
