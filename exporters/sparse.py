"""Size accounting: raw file size, zip-deflated size (what an app download costs), and
per-initializer sparsity."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["deflated_size", "file_sizes", "initializer_stats"]


def deflated_size(path: Path) -> int:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.write(path, arcname=Path(path).name)
    return buf.getbuffer().nbytes


def file_sizes(path: Path) -> dict:
    return {"raw": Path(path).stat().st_size, "compressed": deflated_size(path)}


def initializer_stats(model: onnx.ModelProto) -> list[dict]:
    """One row per initializer: dtype, shape, bytes, fraction of exact zeros."""
    rows = []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        rows.append({"name": init.name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                     "bytes": int(arr.nbytes), "elements": int(arr.size), "sparsity": float(np.mean(arr == 0)) if arr.size else 0.0})
    return rows
