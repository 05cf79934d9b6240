"""torch -> ONNX and size accounting."""
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, TensorProto
from torch import nn

from sqexport.exporters.onnx_export import OPSET, check_model, export_torch
from sqexport.exporters.sparse import deflated_size, file_sizes, initializer_stats
from sqexport.contracts.errors import ExportError


def test_export_torch_writes_a_checked_model(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    path = tmp_path / "m.onnx"
    proto = export_torch(model, {"x": np.zeros((1, 4), np.float32)}, ["x"], ["y"], {"x": {0: "b"}}, path)
    assert path.is_file()
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["y"]
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == OPSET


def test_export_failure_is_an_export_error(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace me")

    with pytest.raises(ExportError, match="torch.onnx export failed"):
        export_torch(Bad(), {"x": np.zeros((1, 4), np.float32)}, ["x"], ["y"], {}, tmp_path / "m.onnx")


def test_check_model_rejects_garbage(tmp_path):
    path = tmp_path / "bad.onnx"
    path.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="bad.onnx fails the ONNX checker"):
        check_model(path)


def test_initializer_stats_and_sizes(tmp_path):
    w = np.array([[0, 1, 0, 2]], np.int8)
    b = np.zeros(3, np.float32)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph)
    rows = {r["name"]: r for r in initializer_stats(model)}
    assert rows["w"] == {"name": "w", "dtype": "int8", "shape": [1, 4], "bytes": 4, "elements": 4, "sparsity": 0.5,
                         "storage": "dense"}
    assert rows["b"]["sparsity"] == 1.0 and rows["b"]["bytes"] == 12
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sizes = file_sizes(path)
    assert sizes["raw"] == path.stat().st_size
    assert sizes["compressed"] == deflated_size(path)


def test_deflated_size_is_the_size_of_a_zip_with_the_file(tmp_path):
    path = tmp_path / "zeros.bin"
    path.write_bytes(bytes(100_000))
    size = deflated_size(path)
    assert size < 2_000  # zeros deflate extremely well
    ref = tmp_path / "ref.zip"
    with zipfile.ZipFile(ref, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.write(path, arcname="zeros.bin")
    assert abs(size - ref.stat().st_size) < 64  # same up to zip timestamps/metadata
