"""int8 on an x86 CPU without VNNI, checked on any x86 host: onnxruntime runs under qemu user-mode
emulation of a Haswell CPU (AVX2, no AVX-512, no VNNI), so its MLAS kernels take the AVX2 path.

The rule runtime_check/isa.py builds on: AVX2's u8 x s8 kernels add two products into a saturating
int16, so full-range int8 weights (|q| <= 127) can compute something else than the graph says;
7-bit weights (|q| <= 63) and u8 weights with a zero point are exact. And the model sqexport builds
for such a host (7-bit weights) gives there what it gives here.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

pytestmark = pytest.mark.slow

QEMU = shutil.which("qemu-x86_64-static")
needs_qemu = pytest.mark.skipif(QEMU is None or platform.machine() not in ("x86_64", "AMD64"),
                                reason="qemu-x86_64-static (apt install qemu-user-static) on an x86_64 host")

# runs inside the emulated CPU: every model in argv[1:-2] on the inputs of argv[-2], outputs to argv[-1]
CHILD = """
import sys, numpy as np, onnxruntime as ort
*models, feed_path, out_path = sys.argv[1:]
feed = dict(np.load(feed_path))
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
outs = {}
for i, path in enumerate(models):
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [x.name for x in s.get_inputs()]
    outs[f"m{i}"] = s.run(None, {n: feed[n] for n in names})[0]
np.savez(out_path, **outs)
"""


def _on_haswell(tmp_path: Path, models: list[Path], feed: dict) -> list[np.ndarray]:
    script, feed_path, out_path = tmp_path / "child.py", tmp_path / "feed.npz", tmp_path / "out.npz"
    script.write_text(CHILD)
    np.savez(feed_path, **feed)
    proc = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(script), *map(str, models), str(feed_path),
                           str(out_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = np.load(out_path)
    return [out[f"m{i}"] for i in range(len(models))]


def _native(models: list[Path], feed: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    outs = []
    for path in models:
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {x.name: feed[x.name] for x in s.get_inputs()})[0])
    return outs


def _matmul_integer(path: Path, weights: np.ndarray, zero_point: int | None) -> Path:
    inputs = ["A", "B"] + (["", "bzp"] if zero_point is not None else [])
    inits = [numpy_helper.from_array(weights, "B")]
    if zero_point is not None:
        inits.append(numpy_helper.from_array(np.array(zero_point, weights.dtype), "bzp"))
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, weights.shape[0]])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, weights.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@needs_qemu
def test_avx2_saturates_full_range_int8_weights_and_not_7_bit_or_u8_weights(tmp_path):
    k, n = 64, 8
    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (k, n)).astype(np.int64)
    q[:, 0] = 127  # a column where every adjacent pair is 127, 127: 2 * 255 * 127 > 32767
    q7 = np.clip(q, -63, 63)
    a = rng.integers(0, 256, (3, k)).astype(np.uint8)
    a[0] = 255
    models = [_matmul_integer(tmp_path / "s8.onnx", q.astype(np.int8), None),
              _matmul_integer(tmp_path / "s7.onnx", q7.astype(np.int8), None),
              _matmul_integer(tmp_path / "u8.onnx", (q + 128).astype(np.uint8), 128)]
    full, seven, unsigned = _on_haswell(tmp_path, models, {"A": a})
    exact, exact7 = a.astype(np.int64) @ q, a.astype(np.int64) @ q7
    assert full[0, 0] == 32 * 32767 and exact[0, 0] == 64 * 255 * 127  # each of the 32 pairs saturates
    assert np.array_equal(seven, exact7) and np.array_equal(unsigned, exact)
    assert [np.array_equal(x, e) for x, e in zip(_native(models, {"A": a}), (exact, exact7, exact))] == \
        [True, True, True]  # this host (VNNI or ARM-like int32 accumulation here) is exact on all three


@needs_qemu
def test_the_model_built_for_a_cpu_without_vnni_computes_the_same_there(run_cli, tmp_path, monkeypatch, digits_split):
    """Export as on a non-VNNI host (7-bit weights), then run it on the emulated Haswell: the same
    outputs as on this host, so the report's accuracy holds where the model is meant to run."""
    import sqexport.runtime_check.isa as isa

    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))  # Haswell's
    out = tmp_path / "out"
    result = run_cli(["digits-cnn", "--prune", "none", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    weights = report["quantization"]["weight_range"]
    assert weights["reduce_range"] is True and weights["max_abs_q"] <= isa.REDUCED_QMAX
    feed = {"pixels": digits_split.x_eval[:64].astype(np.float32)}
    emulated = _on_haswell(tmp_path, [out / "model.onnx"], feed)[0]
    native = _native([out / "model.onnx"], feed)[0]
    assert np.abs(emulated - native).max() <= 1e-5 * max(1.0, float(np.abs(native).max()))
    assert (emulated.argmax(1) == native.argmax(1)).all()
