"""Real third-party architectures (timm, installed by `make venv` into its own folder): every
weight layer int8 (or named with a reason), onnxruntime computing what torch's fake-quant model
does, and a valid graph. Random weights with BatchNorm statistics from photo crops; 64x64 inputs
keep each run to seconds."""
from __future__ import annotations

import json

import pytest

from benchmarks._timm import timm_available

pytestmark = [pytest.mark.skipif(not timm_available(), reason="timm not installed (make venv installs it)"),
              pytest.mark.slow, pytest.mark.e2e]

ARCHS = ["mobilenetv3_small", "efficientnet_lite0", "tf_efficientnet_lite0", "convnext_atto", "regnetx_002",
         "ghostnet"]


@pytest.mark.parametrize("arch", ARCHS)
def test_timm_architecture_is_fully_quantized(arch, tmp_path, run_cli):
    out = tmp_path / arch
    r = run_cli([f"benchmarks._timm:{arch}", "--input-shape", "1x3x64x64", "--prune", "none",
                 "--max-accuracy-drop", "100", "--quiet", "-o", out])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    cov = rep["quantization"]["coverage"]
    # every layer recognized: int8, unless the speed check measured it faster in FP32 on this host
    # or the fidelity floor returned it (the gate here allows anything, so the gate's fallback did not)
    assert all("speed check" in f["reason"] or "fidelity floor" in f["reason"] for f in cov["fp32"]), cov["fp32"]
    assert sorted(f["layer"] for f in cov["fp32"] if "speed check" in f["reason"]) == sorted(
        rep["quantization"]["speed_check"]["kept_fp32"])
    floor = rep["quantization"]["fidelity_floor"]
    assert sum("fidelity floor" in f["reason"] for f in cov["fp32"]) <= floor["added_layers"]
    assert cov["int8"] + len(cov["fp32"]) == cov["weight_layers"] > 10
    assert rep["source"]["graph_capture"]["rebuilt"] is True
    # random deep networks amplify the odd requantization step that onnxruntime's fixed-point
    # kernels round the other way: bound the typical deviation tightly, the worst loosely
    fid = rep["fidelity"]
    assert fid["mean_abs_deviation"] <= 0.01 * fid["reference_max_abs"]
    assert fid["max_abs_deviation"] <= 0.1 * fid["reference_max_abs"]
