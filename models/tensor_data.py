"""--calib-data / --eval-data for tensor models: .npy (inputs only) or .npz (input arrays by
name, optional "labels")."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sqexport.models.spec import ModelSpec
from sqexport.contracts.errors import DataError, first_line
from sqexport.contracts.files import require_regular
from sqexport.models.validate import check_inputs, check_labels

__all__ = ["load_tensor_data", "load_tensor_batches"]


def load_tensor_batches(path: Path, inputs: dict[str, tuple[tuple, np.dtype]],
                        batch_size: int = 64) -> tuple[list[dict], np.ndarray | None]:
    """`inputs` maps each input name to (per-sample shape, dtype); a None dim accepts any size."""
    path = Path(path)
    names = list(inputs)
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: tensor data must be .npy or .npz, got '{path.suffix or 'no suffix'}'")
    require_regular(path, "data file", DataError, must_exist=False)  # np.load would block on a FIFO
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy's parsers raise many types (an empty file: EOFError)
        raise DataError(f"cannot read {path} as {path.suffix}: {first_line(exc)}") from None
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise DataError(f"{path}: a .npy holds one input, the model takes {', '.join(names)}")
        arrays, labels = {names[0]: loaded}, None
    else:
        missing = [n for n in names if n not in loaded.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(loaded.files)})")
        try:
            arrays = {n: loaded[n] for n in names}
            labels = loaded["labels"] if "labels" in loaded.files else None
        except Exception as exc:  # a damaged member of the zip archive
            raise DataError(f"cannot read {path}: {first_line(exc)}") from None
    n = None
    for name, arr in arrays.items():
        shape, dtype = inputs[name]
        if arr.ndim != len(shape) + 1 or any(w is not None and w != g for w, g in zip(shape, arr.shape[1:])):
            want = ", ".join("?" if d is None else str(d) for d in shape)
            raise DataError(f"{path}: '{name}' has shape {tuple(arr.shape)}, the model expects (N, {want})")
        check_inputs(path, name, arr)
        arrays[name] = arr.astype(dtype, copy=False)
        check_inputs(path, name, arrays[name])  # float64 beyond float32's range turns infinite
        n = len(arr) if n is None else n
        if len(arr) != n or n == 0:
            raise DataError(f"{path}: arrays must have the same, non-zero number of rows")
    if labels is not None:
        labels = check_labels(path, labels, n)
    batches = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return batches, labels


def load_tensor_data(path: Path, spec: ModelSpec, batch_size: int = 64) -> tuple[list[dict], np.ndarray | None]:
    inputs = {n: (spec.example_inputs[n].shape[1:], spec.example_inputs[n].dtype) for n in spec.input_names}
    return load_tensor_batches(path, inputs, batch_size)
