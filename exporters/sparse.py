"""Size accounting (raw file size, zip-deflated size: what an app download costs, per-initializer
sparsity) and sparse storage: pruned initializers as ONNX sparse_initializer where that is smaller.

A sparse initializer keeps the non-zero values plus one int64 linear index each, so for int8
weights it pays off below 1/9 density (~89% sparsity). onnxruntime densifies sparse initializers
when it loads the model, so they change the file, never the arithmetic.
"""
from __future__ import annotations

import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator
from pathlib import Path

import deflate  # libdeflate
import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["deflated_size", "deflate_stream_size", "file_sizes", "sizes_measured_meanwhile", "initializer_stats", "initializer_arrays", "densify",
           "store_sparse", "INDEX_BYTES"]

INDEX_BYTES = 8  # ONNX sparse tensors index with int64


DEFLATE_LEVEL = 9
PART_BYTES = 8 << 20  # deflated independently, PARALLEL_THREADS at a time (~16 MB in memory each)
PARALLEL_THREADS = 2


def deflated_size(path: Path, on_bytes: Callable[[int], None] | None = None) -> int:
    """Size of a one-file zip of `path` with its data deflated at level 9 by libdeflate, with
    `on_bytes(n)` called as the input is read.

    libdeflate writes the same deflate format any unzip reads, 3.3x faster than zlib and smaller:
    zlib -9 (Python's zipfile, zip -9) is 0.06% larger on all-MiniLM-L6-v2's FP32 baseline and 3%
    larger on its int8 model. The FP32 baseline of a BERT-base-size model took ~14 s of CPU with
    zlib, about a tenth of the whole pipeline, for one number in report.md.

    Files over PART_BYTES are deflated in parts of that size on PARALLEL_THREADS threads
    (libdeflate releases the GIL); a part starts without the 32 KB of history before it and its
    blocks end at the part's end, which moves the size by tens of bytes per part (256 MB of a
    BERT-base-size baseline in 8 MB parts: 139 bytes more than one stream)."""
    path = Path(path)
    return _zip_overhead(path) + deflate_stream_size(path, on_bytes)


def _zip_overhead(path: Path) -> int:
    """Bytes a one-file zip adds around the deflate data (no zip64: files under 2 GB): local
    header, central directory entry, end record."""
    name = len(path.name.encode("utf-8"))
    return (30 + name) + (46 + name) + 22


def deflate_stream_size(path: Path, on_bytes: Callable[[int], None] | None = None,
                        out: Callable[[int, bytes], None] | None = None, part_bytes: int = PART_BYTES) -> int:
    """Bytes of the raw deflate data of `path` in parts of `part_bytes` (see deflated_size);
    `out(part, data)` receives each part's deflate stream (tests inflate them)."""
    size = path.stat().st_size
    starts = list(range(0, size, part_bytes)) or [0]
    lock = threading.Lock()

    def part(i: int) -> int:
        with open(path, "rb") as f:
            f.seek(starts[i])
            chunk = f.read(part_bytes)
        data = deflate.deflate_compress(chunk, DEFLATE_LEVEL)
        if out is not None:
            out(i, data)
        if on_bytes is not None:
            with lock:
                on_bytes(len(chunk))
        return len(data)
    if len(starts) == 1:
        return part(0)
    with ThreadPoolExecutor(PARALLEL_THREADS) as pool:
        return sum(pool.map(part, range(len(starts))))


_DEFLATED: dict[tuple[int, int], int] = {}  # (size, crc32 of the content) -> deflated size


def _content_key(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return size, crc


def file_sizes(path: Path, on_bytes: Callable[[int], None] | None = None) -> dict:
    """Raw and deflated size. Deflating is the slow part (a second of CPU per 100 MB) and the
    same file is measured by several steps (sparse storage, verify, package): the result is kept
    per content (size and CRC-32, ~50x cheaper than deflating), so a rewritten file is measured again."""
    key = _content_key(Path(path))
    if key not in _DEFLATED:
        _DEFLATED[key] = deflated_size(path, on_bytes)
    elif on_bytes is not None:
        on_bytes(key[0])
    return {"raw": key[0], "compressed": _DEFLATED[key]}


@contextmanager
def sizes_measured_meanwhile(path: Path) -> Iterator[None]:
    """file_sizes(path) on a background thread while the block runs; its result is kept for the
    later call. Deflating is nearly all of a size measurement and libdeflate releases the GIL, so a block
    that keeps one core busy (torch.onnx export, single-threaded) leaves the other to it. Waits for
    the thread when the block ends; if the block raises, the (daemon) thread is left to finish and
    a measurement it did not finish is simply made again when asked for."""
    def measure() -> None:
        try:
            file_sizes(path)
        except Exception:  # noqa: BLE001 (the later file_sizes call measures again and reports it)
            pass
    thread = threading.Thread(target=measure, name=f"deflate {Path(path).name}", daemon=True)
    thread.start()
    yield
    thread.join()


def _sparse_to_array(sp: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(sp.values)
    indices = numpy_helper.to_array(sp.indices).astype(np.int64)
    dense = np.zeros(int(np.prod(sp.dims)), values.dtype)
    flat = indices if indices.ndim == 1 else np.ravel_multi_index(indices.T, tuple(sp.dims))
    dense[flat] = values
    return dense.reshape(tuple(sp.dims))


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer as a dense array, dense and sparse ones alike (graph order, sparse last)."""
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out.update({sp.values.name: _sparse_to_array(sp) for sp in model.graph.sparse_initializer})
    return out


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose sparse initializers are ordinary dense ones (what onnxruntime does at load)."""
    dense = onnx.ModelProto()
    dense.CopyFrom(model)
    arrays = {sp.values.name: _sparse_to_array(sp) for sp in dense.graph.sparse_initializer}
    del dense.graph.sparse_initializer[:]
    dense.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return dense


def initializer_stats(model: onnx.ModelProto) -> list[dict]:
    """One row per initializer: dtype, shape, bytes, fraction of exact zeros, storage."""
    sparse = {sp.values.name for sp in model.graph.sparse_initializer}
    rows = []
    for name, arr in initializer_arrays(model).items():
        rows.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                     "bytes": int(arr.nbytes), "elements": int(arr.size),
                     "sparsity": float(np.mean(arr == 0)) if arr.size else 0.0,
                     "storage": "sparse" if name in sparse else "dense"})
    return rows


def _to_sparse(init: onnx.TensorProto, arr: np.ndarray) -> onnx.SparseTensorProto:
    flat = arr.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[idx], init.name)
    return onnx.helper.make_sparse_tensor(values, numpy_helper.from_array(idx, f"{init.name}.indices"), list(arr.shape))


# where a pruned weight sits: the data input of a DequantizeLinear (int8 weights) or the weight
# input of a compute node (FP32 weights). Zero points (all zeros) and scales are never "pruned".
WEIGHT_SLOTS = {("DequantizeLinear", 0), ("Conv", 1), ("Gemm", 1), ("MatMul", 1), ("MatMulInteger", 1)}


def _weight_initializers(model: onnx.ModelProto) -> set[str]:
    """Initializers read only in weight slots."""
    slots: dict[str, set] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            slots.setdefault(name, set()).add((node.op_type, i))
    return {name for name, used in slots.items() if used <= WEIGHT_SLOTS}


def store_sparse(path: Path, min_elements: int = 256) -> dict:
    """Rewrite the ONNX file at `path` with every pruned weight stored sparse where that is smaller;
    return the sizes before and after (raw and zip-deflated) and which initializers changed."""
    path = Path(path)
    before = file_sizes(path)
    model = onnx.load(str(path))
    weights = _weight_initializers(model)
    keep, changed = [], []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        nnz = int(np.count_nonzero(arr))
        if init.name in weights and arr.size >= min_elements and nnz * (arr.itemsize + INDEX_BYTES) < arr.nbytes:
            model.graph.sparse_initializer.append(_to_sparse(init, arr))
            changed.append({"name": init.name, "density": round(nnz / arr.size, 4), "dense_bytes": int(arr.nbytes),
                            "sparse_bytes": nnz * (arr.itemsize + INDEX_BYTES)})
        else:
            keep.append(init)
    info = {"dense": before, "initializers": changed, "index_dtype": "int64"}
    if changed:
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        onnx.save(model, str(path))
    info["sparse"] = file_sizes(path) if changed else dict(before)  # unchanged file: same sizes
    info["used"] = bool(changed)
    return info
