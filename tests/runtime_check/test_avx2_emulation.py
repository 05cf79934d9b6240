"""int8 on an x86 CPU without VNNI, checked on any x86 host: onnxruntime runs under qemu user-mode
emulation of a Haswell CPU (AVX2, no AVX-512, no VNNI), so its MLAS kernels take the AVX2 path.

The rule runtime_check/isa.py and contracts/weight_grid.py build on: AVX2's u8 x s8 kernels add two
products of adjacent weights into a saturating int16, so full-range int8 weights (|q| <= 127) can
compute something else than the graph says; 7-bit weights (|q| <= 63), u8 weights with a zero point
and full-range weights whose same-sign adjacent pairs sum to at most 128 are exact. Which weights
are adjacent is probed on the emulated kernels themselves. And the model sqexport builds for such a
host (the pair-limited grid) gives there what it gives here.
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


def _probe_conv(path: Path, cin: int, k: int, group: int) -> int:
    """A QLinearConv whose output channels each test one guess: weight i is 127, the weights of a
    set S are 2, the rest 0, inputs all 255. A channel's int16 pair saturates (255 * 129 > 32767)
    exactly when i's partner in the kernel's reduction order is in S; the bias cancels the exact
    sum, so a channel reads 128 unless it saturated. Channels: for every i, S = all others, then
    S = {j: bit b of j is set} for every bit b: the partner's index in binary."""
    width = cin // group * k * k
    bits = max(1, (width - 1).bit_length())
    rows = []
    for i in range(width):
        for b in [None, *range(bits)]:
            row = np.array([2 if b is None or (j >> b) & 1 else 0 for j in range(width)], np.int8)
            row[i] = 127
            rows.append(row)
    rows += [np.zeros(width, np.int8)] * (-len(rows) % group)
    w = np.stack(rows).reshape(len(rows), cin // group, k, k)
    bias = -(255 * w.reshape(len(w), -1).astype(np.int64).sum(1)).astype(np.int32)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.ones(len(w), np.float32), "ws"),
             numpy_helper.from_array(np.zeros(len(w), np.int8), "wz"),
             numpy_helper.from_array(np.array(1.0, np.float32), "ys"), numpy_helper.from_array(np.array(128, np.uint8), "yz"),
             numpy_helper.from_array(bias, "B")]
    node = helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz", "B"], ["Y"],
                            group=group, kernel_shape=[k, k])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.UINT8, [1, cin, k + 2, k + 2])],
                              [helper.make_tensor_value_info("Y", TensorProto.UINT8, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return bits


def _partners(saturated: np.ndarray, width: int, bits: int) -> list[int | None]:
    found = []
    for i in range(width):
        row = saturated[i * (bits + 1):(i + 1) * (bits + 1)]
        found.append(None if not row[0] else sum(1 << b for b in range(bits) if row[1 + b]))
    return found


@needs_qemu
def test_the_pairs_the_avx2_conv_kernel_adds_are_the_ones_the_grid_limits(tmp_path):
    from sqexport.contracts.weight_grid import reduction_pairs

    shapes = [(3, 3, 1), (4, 3, 1), (5, 3, 1), (7, 1, 1), (8, 3, 8), (6, 3, 2)]  # (in channels, kernel, groups)
    paths, bits = [], []
    for n, (cin, k, group) in enumerate(shapes):
        paths.append(tmp_path / f"probe{n}.onnx")
        bits.append(_probe_conv(paths[-1], cin, k, group))
    for (cin, k, group), path, b in zip(shapes, paths, bits):
        out = _on_haswell(tmp_path, [path], {"X": np.full((1, cin, k + 2, k + 2), 255, np.uint8)})[0]
        width = cin // group * k * k
        found = _partners(out[0, :, 0, 0] != 128, width, b)
        # the grid's rule, in ONNX/torch weight order: reduction_pairs lays a weight out in the
        # kernel's order; number each position and read who shares a pair
        order = reduction_pairs(np.arange(1, width + 1).reshape(1, cin // group, k, k)).reshape(-1, 2)
        expected: list[int | None] = [None] * width
        for a, c in order:
            if a and c:
                expected[a - 1], expected[c - 1] = c - 1, a - 1
        assert found == expected, (cin, k, group)


@needs_qemu
@pytest.mark.parametrize("model", ["digits-cnn", "digits-mlp"])
def test_the_model_built_for_a_cpu_without_vnni_computes_the_same_there(run_cli, tmp_path, monkeypatch, digits_split,
                                                                       model):
    """Export as on a non-VNNI host (full 8-bit weights on the pair-limited grid), then run it on the
    emulated Haswell: the same outputs as on this host, so the report's accuracy holds where the
    model is meant to run; the same weights without the pair limit would not."""
    import sqexport.runtime_check.isa as isa

    monkeypatch.setattr(isa, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))  # Haswell's
    out = tmp_path / "out"
    result = run_cli([model, "--prune", "none", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    weights = report["quantization"]["weight_range"]
    assert weights["scheme"] == "int8-pair-limited" and weights["max_abs_q"] == 127
    assert weights["limited_pairs"] > 0  # pairs full range would have saturated: the check below is not vacuous
    feed = {"pixels": digits_split.x_eval[:64].astype(np.float32)}
    emulated = _on_haswell(tmp_path, [out / "model.onnx"], feed)[0]
    native = _native([out / "model.onnx"], feed)[0]
    assert np.abs(emulated - native).max() <= 1e-5 * max(1.0, float(np.abs(native).max()))
    assert (emulated.argmax(1) == native.argmax(1)).all()
