"""`sqexport bench`: local, ssh and adb presets end to end with stand-in ssh/scp/adb executables on
PATH (tests/conftest.py: they run the commands on this machine), raw --device-cmd,
onnxruntime_perf_test parsing, and the error paths (exit 2, one line; a device that ran something
else: exit 1)."""
import json
import shutil
import stat
import sys

import numpy as np
import pytest

from sqexport.contracts.errors import DeviceError
from sqexport.runtime_check.device import parse_device, parse_perf_test


@pytest.fixture
def bundle(mobile_export, tmp_path):
    """A copy of the export folder (bench writes device_latency into its report)."""
    out = tmp_path / "out"
    shutil.copytree(mobile_export.out, out)
    return out / "digits-cnn-mobile.zip"


def _bench(run_cli, target, *args):
    return run_cli(["bench", target, "--iters", "5", "--json", *args])


def test_bench_local_reports_latency_and_writes_report(run_cli, bundle):
    result = _bench(run_cli, bundle, "--device", "local")
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert set(res["latency_ms"]) == {"1", "2"} and all(v["p50"] > 0 for v in res["latency_ms"].values())
    assert res["same_model"] and res["reproduced"] and res["runner"] == 1
    report = json.loads((bundle.parent / "report.json").read_text())
    assert report["device_latency"]["latency_ms"] == res["latency_ms"]
    assert "## Device latency" in (bundle.parent / "report.md").read_text()


@pytest.mark.parametrize("device", ["ssh://me@phone:2222", "adb:emulator-5554"])
def test_bench_ssh_and_adb_end_to_end(run_cli, bundle, fake_tools, device):
    result = _bench(run_cli, bundle, "--device", device, "--device-python", sys.executable, "--threads", "1")
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["device"] == device and res["same_model"] and set(res["latency_ms"]) == {"1"}
    assert not any((fake_tools / "device").iterdir())  # cleaned up on the device


@pytest.mark.parametrize("device, needle", [("ssh://me@unreachable", "Connection refused"),
                                            ("adb:offline", "not found")])
def test_unreachable_device_is_exit_2(run_cli, bundle, fake_tools, device, needle):
    result = _bench(run_cli, bundle, "--device", device, "--device-python", sys.executable)
    assert result.exit_code == 2 and needle in result.output and "push failed" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_failing_runner_is_exit_2(run_cli, bundle, fake_tools):
    crash = fake_tools / "crash.py"
    crash.write_text('import sys\nsys.exit("onnxruntime: illegal instruction")\n')
    result = _bench(run_cli, bundle, "--device", "ssh://me@phone", "--device-python", sys.executable,
                    "--device-cmd", f"{{python}} {crash}")
    assert result.exit_code == 2 and "runner failed" in result.output and "illegal instruction" in result.output


def test_device_that_ran_another_model_fails_gate(run_cli, bundle, tmp_path):
    fake = tmp_path / "other.py"
    fake.write_text('import json; print(json.dumps({"model_sha256": "0" * 64, "latency_ms": '
                    '{"1": {"p50": 1.0, "p90": 1.0}}}))\n')
    result = run_cli(["bench", bundle, "--device", "local", "--device-cmd", f"{{python}} {fake}"])
    assert result.exit_code == 1 and "device_same_model" in result.output


def test_latency_gate(run_cli, bundle):
    result = _bench(run_cli, bundle, "--device", "local", "--max-device-latency-ms", "0.000001")
    assert result.exit_code == 1 and "device_latency_p50_ms" in result.output


def test_perf_test_output_both_spellings():
    assert parse_perf_test("Average inference time cost: 12.5 ms\n")["p50"] == 12.5
    res = parse_perf_test("Average inference time cost total: 3.5 ms\nP50 Latency: 0.0031 s\nP90 Latency: 0.004 s\n")
    assert res["mean"] == 3.5 and res["p50"] == pytest.approx(3.1) and res["p90"] == pytest.approx(4.0)
    with pytest.raises(DeviceError, match="printed no 'Average inference time cost' line"):
        parse_perf_test("Session creation time cost: 0.1 s\n")


def test_adb_with_pushed_perf_test_binary(run_cli, bundle, fake_tools):
    perf = fake_tools / "onnxruntime_perf_test"
    perf.write_text('#!/bin/sh\necho "Session creation time cost: 0.01 s"\n'
                    'echo "Average inference time cost: 2.25 ms"\n')
    perf.chmod(perf.stat().st_mode | stat.S_IEXEC)
    result = _bench(run_cli, bundle, "--device", "adb", "--perf-test", perf, "--threads", "1,2")
    assert result.exit_code == 0, result.output
    res = json.loads(result.output)
    assert res["runner"] == "onnxruntime_perf_test" and res["latency_ms"]["2"]["p50"] == 2.25
    assert res["reproduced"] is None  # perf_test shows no outputs: not claimed


def test_bad_device_specs():
    for spec in ("ftp://x", "ssh://", "phone"):
        with pytest.raises(Exception, match="--device"):
            parse_device(spec)


def test_reproduction_is_judged_per_sample_when_one_coordinate_moves():
    """A rounding flip that moves one coordinate past rtol x the peak still reproduces when the
    vector as a whole is within the relative L2 limit; a vector that moved is not reproduced."""
    from sqexport.toolchain.bench import _reproduced

    flip = {"max_abs_diff": 0.02, "reference_max_abs": 1.0, "max_rel_error": 0.006, "min_cosine": 0.99998}
    ok, why = _reproduced(flip, 0.01, saturates=False, max_rel_error=0.02)
    assert ok and "relative L2 error 0.006" in why
    moved = {**flip, "max_rel_error": 0.3}
    ok, why = _reproduced(moved, 0.01, saturates=False, max_rel_error=0.02)
    assert not ok and "max |diff| 0.02 > 0.01" in why


def test_device_runner_reports_per_sample_relative_error():
    from sqexport.runtime_check.device_runner import compare

    ref = np.array([[[3.0, 4.0]], [[1.0, 0.0]]])  # (sample, batch, values)
    got = {"y": np.array([[[3.0, 4.5]], [[1.0, 0.0]]])}
    out = compare(got, {"y": ref})
    assert out["max_rel_error"] == pytest.approx(0.1)  # |(0, .5)| / |(3, 4)|
    assert out["max_abs_diff"] == pytest.approx(0.5)
