"""`sqexport check --arch arm64`: the same file on aarch64 onnxruntime under emulation (`make arm64`).

Locally these skip with the reason when the emulator is not set up; CI (.ci/run sets
SQEXPORT_REQUIRE_ARM64=1 after `make arm64`) fails instead, so they always run there for real.
"""
import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from sqexport.runtime_check.agreement import per_sample_agreement
from sqexport.runtime_check.isa import int8_saturates
from sqexport.runtime_check.arm64 import ARM64_MAX_REL_ERROR, TIERS, emulator_status, run_tiers

READY, WHY = emulator_status()
if not READY and os.environ.get("SQEXPORT_REQUIRE_ARM64"):
    raise RuntimeError(f"SQEXPORT_REQUIRE_ARM64 is set but the arm64 emulator is not ready: {WHY}")
pytestmark = [pytest.mark.skipif(not READY, reason=f"arm64 emulator not set up: {WHY}"), pytest.mark.slow]  # emulated


def test_ort_on_three_arm64_tiers_matches_x86_and_passes_gate(mobile_export, run_cli, eval_npz):
    out = mobile_export.out
    result = run_cli(["check", out / "model.ort", "--baseline", out / "baseline.onnx", "--eval-data", eval_npz,
                      "--arch", "arm64", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    arm = res["arm64"]
    assert set(arm["tiers"]) == set(TIERS) and arm["samples"] == 450
    assert "without graph optimizations" in arm["x86_reference"]  # model.onnx beside the .ort
    for tier in arm["tiers"].values():
        assert tier["machine"] == "aarch64" and tier["matches_x86"] and tier["vs_x86"]["within_tolerance"]
        if int8_saturates():  # x86 kernels saturate the full-range conv weights: the exact arithmetic decides
            assert tier["closest_x86_reference"] == "exact QDQ arithmetic"
        assert tier["vs_x86"]["max_rel_error"] <= ARM64_MAX_REL_ERROR and tier["vs_x86"]["min_cosine"] > 0.999
        assert tier["accuracy"]["metric"] == "top1" and tier["accuracy"]["drop"] <= 1.0 and tier["accuracy"]["drop_unit"] == "points"
        assert "latency_ms" not in tier  # emulated timings are never reported
    names = [c["name"] for c in res["checks"]]
    assert "arm64_cortex-a53_matches_x86" in names and "arm64_max_accuracy_drop" in names


def test_bundled_self_test_reproduces_on_arm64(mobile_export):
    ref = np.load(mobile_export.out / "reference.npz")
    feeds = [{"pixels": x} for x in ref["input:pixels"]]
    res = run_tiers(mobile_export.out / "model.ort", feeds, ("cortex-a53",))["cortex-a53"]
    got, want = res["outputs"]["logits"], ref["output:logits"]
    assert per_sample_agreement(want, got)["max_rel_error"] <= ARM64_MAX_REL_ERROR
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_weights_scaled_after_export_fail_the_arm64_gate(mobile_export, run_cli, eval_npz, tmp_path):
    """Tripling the first conv's weight scale keeps a valid graph that computes the wrong thing."""
    model = onnx.load(str(mobile_export.out / "model.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and numpy_helper.to_array(inits[n.input[0]]).dtype == np.int8)
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3.0, scale.name))
    onnx.save(model, str(tmp_path / "model.onnx"))
    result = run_cli(["check", tmp_path / "model.onnx", "--baseline", mobile_export.out / "baseline.onnx",
                      "--eval-data", eval_npz, "--arch", "arm64", "--threads", "1"])
    assert result.exit_code == 1, result.output
    assert "arm64_cortex-a53_accuracy_drop" in result.output and "FAILED" in result.output
