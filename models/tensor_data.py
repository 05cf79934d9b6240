"""--calib-data / --eval-data for tensor models: .npy (inputs only) or .npz (input arrays by
name, optional "labels")."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.spec import ModelSpec
from toolchain.errors import DataError

__all__ = ["load_tensor_data"]


def load_tensor_data(path: Path, spec: ModelSpec, batch_size: int = 64) -> tuple[list[dict], np.ndarray | None]:
    path = Path(path)
    if path.suffix not in (".npy", ".npz"):
        raise DataError(f"{path}: tensor data must be .npy or .npz, got '{path.suffix or 'no suffix'}'")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    if isinstance(loaded, np.ndarray):
        if len(spec.input_names) != 1:
            raise DataError(f"{path}: a .npy holds one input, the model takes {', '.join(spec.input_names)}")
        arrays, labels = {spec.input_names[0]: loaded}, None
    else:
        missing = [n for n in spec.input_names if n not in loaded.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)} (has {', '.join(loaded.files)})")
        arrays = {n: loaded[n] for n in spec.input_names}
        labels = loaded["labels"] if "labels" in loaded.files else None
    n = None
    for name, arr in arrays.items():
        want = spec.example_inputs[name]
        if arr.ndim != want.ndim or arr.shape[1:] != want.shape[1:]:
            raise DataError(f"{path}: '{name}' has shape {tuple(arr.shape)}, the model expects "
                            f"(N, {', '.join(map(str, want.shape[1:]))})")
        arrays[name] = arr.astype(want.dtype, copy=False)
        n = len(arr) if n is None else n
        if len(arr) != n or n == 0:
            raise DataError(f"{path}: arrays must have the same, non-zero number of rows")
    if labels is not None and len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} inputs")
    batches = [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return batches, (labels.astype(np.int64) if labels is not None else None)
