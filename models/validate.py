"""Checks on user data before any of it reaches a model: numbers that are numbers, finite inputs,
labels that are class indices of this model. Without them NaN calibration data gave NaN scales and
a broken model, and labels outside the model's classes gave top-1 0 for both models (a passed gate).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sqexport.contracts.errors import DataError

__all__ = ["check_inputs", "check_labels", "num_classes"]


def check_inputs(path: Path, name: str, arr: np.ndarray) -> None:
    """Numeric (or boolean) and, for floats, finite."""
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: '{name}' holds {arr.dtype} values; the model needs numbers")
    if arr.dtype.kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise DataError(f"{path}: '{name}' holds {bad} NaN or infinite value(s); every input must be finite")


def check_labels(path: Path, labels, n: int, classes: int | None = None) -> np.ndarray:
    """One integer class index in [0, classes) per sample, as int64."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{path}: labels hold {labels.dtype} values; they must be integer class indices")
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: labels have shape {tuple(labels.shape)}; expected ({n},), one per input")
    if labels.dtype.kind == "f" and not np.all(np.isfinite(labels)):
        raise DataError(f"{path}: labels hold NaN or infinite values")
    if labels.dtype.kind == "f" and not np.all(labels == np.round(labels)):
        raise DataError(f"{path}: labels must be whole numbers (class indices)")
    labels = labels.astype(np.int64)
    if n and labels.min() < 0:
        raise DataError(f"{path}: labels must be class indices >= 0, got {int(labels.min())}")
    if n and classes is not None and labels.max() >= classes:
        raise DataError(f"{path}: label {int(labels.max())} is outside the model's {classes} classes "
                        f"(0..{classes - 1})")
    return labels


def num_classes(spec) -> int | None:
    """The width of a classifier's logits (one forward pass on the example input); None otherwise."""
    if spec.task == "feature-extraction":
        return None
    out = spec.torch_outputs(spec.model, spec.example_inputs)[0]
    return int(out.shape[-1]) if out.ndim == 2 else None
