"""Bad input: exit 2, one-line message, no traceback, nothing left behind."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sqexport.models.zoo import builtin_names


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty cwd (so a default ./sqexport-out would show up) with a few input files."""
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "bad_calib.npy", np.zeros((8, 1, 9, 9), np.float32))
    (tmp_path / "corrupt.onnx").write_bytes(b"this is not a protobuf \x00\xff\x13")
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "q_then_p.yaml").write_text("stages:\n  - type: quantize.int8\n  - type: prune.magnitude\n")
    return tmp_path


INPUTS = ["bad_calib.npy", "corrupt.onnx", "file", "q_then_p.yaml"]


def _check(result, workdir):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert len(errors[0]) > len("Error: ") + 5
    assert sorted(os.listdir(workdir)) == sorted(INPUTS), "output left behind"
    assert (workdir / "file").read_text() == "a regular file"
    return errors[0]


@pytest.mark.parametrize("args", [["export", "no-such-model", "-o", "out"], ["no-such-model", "-o", "out"],
                                  ["no-such-model"]], ids=["export", "short", "default-output"])
def test_unknown_model_lists_known_models(run_cli, workdir, args):
    line = _check(run_cli(args), workdir)
    assert "no-such-model" in line
    for name in builtin_names():
        assert name in line


@pytest.mark.parametrize("args, needle", [
    (["export", "digits-cnn", "--recipe", "missing.yaml", "-o", "out"], "missing.yaml"),
    (["export", "digits-cnn", "--sparsity", "1.5", "-o", "out"], "sparsity"),
    (["export", "digits-cnn", "--sparsity", "-0.1", "-o", "out"], "sparsity"),
    (["export", "digits-cnn", "--sparsity", "1.0", "-o", "out"], "sparsity"),
    (["export", "digits-cnn", "--calib-data", "bad_calib.npy", "-o", "out"], "bad_calib.npy"),
    (["export", "digits-cnn", "--eval-data", "bad_calib.npy", "-o", "out"], "bad_calib.npy"),
    (["export", "digits-cnn", "--calib-data", "missing.npy", "-o", "out"], "missing.npy"),
    (["export", "digits-cnn", "--target", "gpu", "-o", "out"], "target"),
    (["export", "digits-cnn", "--target", "mobile", "--input-shape", "1xa", "-o", "out"], "input-shape"),
    (["export", "digits-cnn", "-o", "file/out"], "file"),  # under a regular file
    (["export", "digits-cnn", "-o", "file"], "file"),  # a regular file itself
    (["export", "digits-cnn", "--recipe", "q_then_p.yaml", "-o", "out"], "prun"),
    (["export", "digits-cnn", "--prune", "nm", "--nm", "4:2", "-o", "out"], "4:2"),
    (["export", "digits-cnn", "--prune", "nm", "--nm", "x", "-o", "out"], "'x'"),
    (["export", "digits-cnn", "--prune", "nm", "--nm", "2:2", "-o", "out"], "2:2"),
    (["export", "digits-cnn", "--prune", "sipp", "-o", "out"], "prune"),  # a variant, not a method: --variant
    (["export", "digits-cnn", "--prune", "pqi", "--sparsity", "0.3", "-o", "out"], "--sparsity"),  # SAP picks it
    (["export", "digits-cnn", "--prune", "magnitude", "--variant", "pfp", "-o", "out"], "--variant"),
    (["export", "digits-cnn", "--threads", "0", "-o", "out"], "threads"),
    (["export", "digits-cnn", "--max-accuracy-drop", "-1", "-o", "out"], "max-accuracy-drop"),
    (["export", "digits-cnn", "--bogus-flag", "-o", "out"], "bogus"),
], ids=["missing-recipe", "sparsity-1.5", "sparsity-neg", "sparsity-1", "calib-9x9", "eval-9x9", "calib-missing",
        "target-gpu", "mobile-bad-shape", "under-file", "is-file", "quant-before-prune", "nm-4:2", "nm-x", "nm-2:2",
        "prune-sipp", "pqi-sparsity", "variant-magnitude", "threads-0", "neg-gate", "unknown-flag"])
def test_bad_export_input(run_cli, workdir, args, needle):
    line = _check(run_cli(args), workdir)
    assert needle in line


@pytest.mark.parametrize("args", [["inspect", "corrupt.onnx"], ["check", "corrupt.onnx"],
                                  ["inspect", "missing.onnx"], ["check", "missing.onnx"],
                                  ["inspect", "q_then_p.yaml"]])
def test_bad_onnx_for_inspect_and_check(run_cli, workdir, args):
    line = _check(run_cli(args), workdir)
    assert args[1] in line


def test_corrupt_baseline_for_check(run_cli, workdir, default_export):
    line = _check(run_cli(["check", default_export.out / "model.onnx", "--baseline", "corrupt.onnx"]), workdir)
    assert "corrupt.onnx" in line


def test_wrong_eval_data_for_check(run_cli, workdir, default_export):
    line = _check(run_cli(["check", default_export.out / "model.onnx", "--eval-data", "bad_calib.npy"]), workdir)
    assert "bad_calib.npy" in line and "(N, 1, 8, 8)" in line


def test_min_speedup_without_baseline_for_check(run_cli, workdir, default_export, tmp_path_factory):
    alone = tmp_path_factory.mktemp("alone") / "model.onnx"  # no output folder, so no baseline.onnx beside it
    alone.write_bytes((default_export.out / "model.onnx").read_bytes())
    _check(run_cli(["check", alone, "--min-speedup", "1.0"]), workdir)


def test_console_script_prints_one_line_on_stderr(tmp_path):
    """The real entry point (setup.cfg console_scripts: sqexport.toolchain.cli:main), not the test runner."""
    proc = subprocess.run([sys.executable, "-c", "from sqexport.toolchain.cli import main; main()", "no-such-model",
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "digits-cnn" in errors[0]
    assert os.listdir(tmp_path) == []
