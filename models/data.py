"""Apply --calib-data / --eval-data to a ModelSpec."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from models.spec import ModelSpec
from contracts.errors import DataError

__all__ = ["apply_user_data", "load_data_file"]


def load_data_file(path: str, spec: ModelSpec):
    """(batches, labels or None) from a user data file, in the model's own format."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such data file: {p}")
    if spec.load_data is not None:
        return spec.load_data(p)
    from models.tensor_data import load_tensor_data

    return load_tensor_data(p, spec)


def apply_user_data(spec: ModelSpec, calib_data: str | None, eval_data: str | None) -> ModelSpec:
    changes = {}
    if calib_data:
        batches, labels = load_data_file(calib_data, spec)
        changes["calib_batches"], changes["calib_labels"] = batches, labels
    if eval_data:
        batches, labels = load_data_file(eval_data, spec)
        changes["eval_batches"], changes["eval_labels"] = batches, labels
    return dataclasses.replace(spec, **changes) if changes else spec
