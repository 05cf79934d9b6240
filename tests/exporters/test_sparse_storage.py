"""Sparse storage: pruned int8 initializers as ONNX sparse_initializer where smaller; onnxruntime
densifies them at load, so the outputs do not change; readers see the same dense arrays."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from sqexport.exporters.sparse import densify, initializer_arrays, initializer_stats, store_sparse
from sqexport.runtime_check.inspect_model import inspect_onnx


def _qdq_matmul(path, density: float, seed: int = 0):
    """x (1x256) @ DequantizeLinear(w int8 256x64), `density` of w non-zero."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-127, 128, (256, 64)).astype(np.int8)
    w[rng.random(w.shape) >= density] = 0
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.float32(0.01), "w_scale"),
             numpy_helper.from_array(np.int8(0), "w_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


def test_sparse_where_smaller_and_outputs_unchanged(tmp_path):
    w = _qdq_matmul(tmp_path / "m.onnx", density=0.05)
    dense_bytes = (tmp_path / "m.onnx").read_bytes()
    info = store_sparse(tmp_path / "m.onnx")
    assert info["used"] and [i["name"] for i in info["initializers"]] == ["w_q"]
    nnz = int(np.count_nonzero(w))
    assert info["initializers"][0]["sparse_bytes"] == nnz * 9  # int8 value + int64 index each
    assert info["sparse"]["raw"] < info["dense"]["raw"] == len(dense_bytes)
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model)
    sp = model.graph.sparse_initializer[0]
    assert sp.indices.data_type == TensorProto.INT64 and list(sp.dims) == [256, 64]
    np.testing.assert_array_equal(initializer_arrays(model)["w_q"], w)
    np.testing.assert_array_equal(numpy_helper.to_array(
        next(i for i in densify(model).graph.initializer if i.name == "w_q")), w)
    x = np.random.default_rng(1).random((1, 256), dtype=np.float32)
    a = ort.InferenceSession(dense_bytes).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)
    rows = {r["name"]: r for r in initializer_stats(model)}
    assert rows["w_q"]["storage"] == "sparse" and abs(rows["w_q"]["sparsity"] - (1 - nnz / w.size)) < 1e-9
    info = inspect_onnx(tmp_path / "m.onnx")
    assert info["weights"][0]["name"] == "w_q" and info["weights"][0]["storage"] == "sparse"


def test_dense_kept_where_sparse_is_not_smaller(tmp_path):
    _qdq_matmul(tmp_path / "m.onnx", density=0.5)
    before = (tmp_path / "m.onnx").read_bytes()
    info = store_sparse(tmp_path / "m.onnx")
    assert not info["used"] and (tmp_path / "m.onnx").read_bytes() == before


@pytest.mark.e2e
def test_export_at_90_percent_uses_sparse_initializers(run_cli, tmp_path, onnx_tools):
    out = tmp_path / "o"
    # 90% costs digits-cnn ~3 points, more than the default 1-point gate; storage is the point here, so
    # the gate is opened (a failed gate's exit 1 is test_cli_export's test_failing_gate_exits_1_...)
    result = run_cli(["digits-cnn", "--sparsity", "0.9", "--max-accuracy-drop", "100", "--threads", "1", "-o", out])
    assert result.exit_code == 0, result.output
    rep = json.loads((out / "report.json").read_text())
    st, sizes = rep["sparse_storage"], rep["size_bytes"]
    assert st["used"] and st["index_dtype"] == "int64"
    assert sizes["model"] < sizes["model_dense"] and st["sparse"]["raw"] == sizes["model"]
    assert st["outputs_vs_dense"]["bit_identical"] and st["outputs_vs_dense"]["max_abs_diff"] == 0.0
    model = onnx.load(str(out / "model.onnx"))
    assert len(model.graph.sparse_initializer) == len(st["initializers"]) > 0
    # readers of model.onnx still see every quantized weight, zeros and all
    weights = onnx_tools.quantized_weights(model)
    assert len(weights) >= 1
    assert any(np.mean(w.q == 0) > 0.89 for w in weights)
    assert run_cli(["inspect", out / "model.onnx"]).exit_code == 0


def test_zero_points_stay_dense_and_the_usability_checker_reads_sparse_models(tmp_path):
    """Per-channel zero points are all zeros, and in a quantized transformer they are big enough
    to look "sparser" stored sparse; they are not pruned weights, so they stay dense. onnxruntime's
    mobile usability checker takes sparse initializers for missing inputs, so it gets a dense copy."""
    from sqexport.runtime_check.mobile_check import usability

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (64, 512)).astype(np.int8)  # (in, out): per-channel along axis 1
    w[rng.random(w.shape) >= 0.05] = 0
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(512, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(512, np.int8), "w_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 512])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    dense = usability(tmp_path / "m.onnx")
    info = store_sparse(tmp_path / "m.onnx")
    assert [i["name"] for i in info["initializers"]] == ["w_q"]  # not w_zp, though all zeros
    sparse = usability(tmp_path / "m.onnx")
    for ep in ("nnapi", "coreml_mlprogram"):
        assert sparse[ep]["nodes"] == dense[ep]["nodes"] and sparse[ep]["verdict"] == dense[ep]["verdict"]


def test_unchanged_file_is_deflated_once_and_rewrites_are_measured_again(tmp_path, monkeypatch):
    """Nothing to store sparse: the file is measured once (no rewrite, no second deflate); the
    size cache follows the content, so a rewritten file is measured again."""
    import sqexport.exporters.sparse as sparse
    calls = []
    real = sparse.deflated_size
    monkeypatch.setattr(sparse, "deflated_size", lambda p, on_bytes=None: calls.append(p) or real(p))
    monkeypatch.setattr(sparse, "_DEFLATED", {})
    _qdq_matmul(tmp_path / "m.onnx", density=0.5, seed=3)
    info = store_sparse(tmp_path / "m.onnx")
    assert not info["used"] and info["sparse"] == info["dense"] and len(calls) == 1
    assert sparse.file_sizes(tmp_path / "m.onnx") == info["dense"] and len(calls) == 1  # verify's read: cached
    _qdq_matmul(tmp_path / "m.onnx", density=0.05, seed=3)  # rewritten: new content
    again = sparse.file_sizes(tmp_path / "m.onnx")
    assert len(calls) == 2 and again["compressed"] == real(tmp_path / "m.onnx")
    assert again["raw"] == (tmp_path / "m.onnx").stat().st_size


@pytest.mark.slow
def test_deflated_size_is_a_zip_around_one_deflate_stream_of_the_file(tmp_path):
    """One part: the zip overhead (checked against what ZipFile writes around its own deflate
    data) plus libdeflate's level-9 stream, which inflates to the file; no larger than zlib -9."""
    import io
    import zipfile
    import zlib

    from sqexport.exporters.sparse import _zip_overhead, deflate_stream_size, deflated_size
    path = tmp_path / "data.bin"
    data = np.random.default_rng(0).integers(0, 4, 3_000_000, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.write(path, arcname=path.name)
    zlib9 = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zlib_stream = len(zlib9.compress(data) + zlib9.flush())
    assert buf.getbuffer().nbytes == _zip_overhead(path) + zlib_stream
    parts, seen = [], []
    stream = deflate_stream_size(path, seen.append, out=lambda i, d: parts.append(d))
    assert len(parts) == 1 and len(parts[0]) == stream and seen == [3_000_000]
    assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(parts[0]) == data
    assert deflated_size(path) == _zip_overhead(path) + stream <= buf.getbuffer().nbytes


def test_parts_deflate_on_threads_and_cost_bytes_not_percent(tmp_path):
    """A file over the part size: parts deflated on two threads, each inflating to its slice;
    starting each without the history before it costs a few bytes against one stream."""
    import zlib

    from sqexport.exporters.sparse import deflate_stream_size
    path = tmp_path / "data.bin"
    data = np.random.default_rng(1).normal(size=500_000).astype(np.float32).tobytes()  # FP32 weights-like, 2 MB
    path.write_bytes(data)
    part = 512 << 10
    parts, seen = {}, []
    total = deflate_stream_size(path, seen.append, out=lambda i, d: parts.__setitem__(i, d), part_bytes=part)
    assert sorted(parts) == [0, 1, 2, 3] and sum(map(len, parts.values())) == total and sum(seen) == len(data)
    for i, d in parts.items():
        assert zlib.decompressobj(-zlib.MAX_WBITS).decompress(d) == data[i * part:(i + 1) * part]
    one = deflate_stream_size(path)
    assert abs(total - one) <= 1e-4 * one  # either way: block boundaries move too


def test_sizes_measured_meanwhile_runs_beside_the_block_and_is_kept_for_the_later_read(tmp_path, monkeypatch):
    """The baseline is deflated on another thread while the block runs (the pipeline's export.model);
    the later file_sizes returns the same numbers without deflating again."""
    import threading

    import sqexport.exporters.sparse as sparse
    calls = []
    real = sparse.deflated_size
    monkeypatch.setattr(sparse, "deflated_size",
                        lambda p, on_bytes=None: calls.append(threading.current_thread().name) or real(p))
    monkeypatch.setattr(sparse, "_DEFLATED", {})
    path = tmp_path / "baseline.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 4, 2_000_000, dtype=np.uint8).tobytes())
    with sparse.sizes_measured_meanwhile(path):
        pass
    assert calls == ["deflate baseline.bin"]  # on its own thread, done when the block ends
    assert sparse.file_sizes(path) == {"raw": 2_000_000, "compressed": real(path)} and len(calls) == 1


def test_a_failed_measurement_meanwhile_is_made_again_when_asked_for(tmp_path, monkeypatch):
    import sqexport.exporters.sparse as sparse
    monkeypatch.setattr(sparse, "_DEFLATED", {})
    path = tmp_path / "later.bin"
    with sparse.sizes_measured_meanwhile(path):  # no file yet: the thread's measurement fails quietly
        pass
    path.write_bytes(b"x" * 1000)
    assert sparse.file_sizes(path)["raw"] == 1000


ROUNDED_TO_ZERO = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():  # one large weight per row sets its int8 scale; the rest round to 0
        model[0].weight.mul_(1e-3)
        model[0].weight[:, 0] = 1.0
    return model.eval()
"""


@pytest.mark.e2e
def test_the_note_calls_zeros_pruned_only_when_pruning_made_them(run_cli, tmp_path, monkeypatch):
    import json
    import sys

    def notes(model, *args):
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        r = run_cli([model, *args, "--max-accuracy-drop", "100", "--quiet", "-o", out])
        assert r.exit_code == 0, r.output
        rep = json.loads((out / "report.json").read_text())
        return rep["sparse_storage"]["used"], rep["notes"]
    used, pruned_notes = notes("digits-cnn", "--sparsity", "0.95")
    assert used and any("pruned initializer(s) stored as ONNX sparse" in n for n in pruned_notes)

    (tmp_path / "rounded_to_zero.py").write_text(ROUNDED_TO_ZERO)
    np.savez(tmp_path / "x.npz", input=np.random.default_rng(0).normal(size=(64, 256)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    used, dense_notes = notes("rounded_to_zero:build", "--input-shape", "1x256", "--prune", "none",
                              "--calib-data", "x.npz", "--eval-data", "x.npz")
    sys.modules.pop("rounded_to_zero", None)
    assert used and not any("pruned initializer(s)" in n for n in dense_notes)
    assert any("initializer(s) with enough zeros stored as ONNX sparse" in n for n in dense_notes)
