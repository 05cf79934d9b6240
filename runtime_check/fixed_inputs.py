"""Running fixed-shape models (mobile .onnx/.ort) on data that comes in other batch sizes and lengths.

Batches are cut into samples and regrouped to the model's fixed batch size; other dims are
zero-padded at the end or cut. For text that is exact: padding carries attention_mask 0, and a
token id 0 under mask 0 changes nothing the mean-pooled embedding sees.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnxruntime as ort

__all__ = ["session_shapes", "is_fixed", "fit_rows", "fit_batches", "run_fixed"]


def session_shapes(session: ort.InferenceSession) -> dict[str, list]:
    return {i.name: list(i.shape) for i in session.get_inputs()}


def is_fixed(shapes: dict[str, list]) -> bool:
    return all(isinstance(d, int) and d > 0 for s in shapes.values() for d in s)


def _fit(arr: np.ndarray, dims: list[int]) -> np.ndarray:
    """One sample (no batch axis) zero-padded at the end / cut to `dims`."""
    arr = arr[tuple(slice(0, d) for d in dims)]
    pad = [(0, d - s) for d, s in zip(dims, arr.shape)]
    return np.pad(arr, pad) if any(p for _, p in pad) else arr


def fit_rows(batches: list[dict], shapes: dict[str, list[int]]) -> list[dict]:
    """Every sample of every batch at the fixed per-sample shape (no batch axis)."""
    rows = []
    for batch in batches:
        n = len(next(iter(batch.values())))
        rows += [{k: _fit(batch[k][i], shapes[k][1:]) for k in shapes if k in batch} for i in range(n)]
    return rows


def fit_batches(batches: list[dict], shapes: dict[str, list[int]]) -> tuple[list[dict], int]:
    """Batches at exactly the fixed shapes, and how many real samples they hold (the last batch is
    filled up with copies of its last sample; drop those outputs)."""
    rows = fit_rows(batches, shapes)
    size = next(iter(shapes.values()))[0]
    out = []
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        chunk += [chunk[-1]] * (size - len(chunk))
        out.append({k: np.stack([r[k] for r in chunk]) for k in chunk[0]})
    return out, len(rows)


def run_fixed(session: ort.InferenceSession, batches: list[dict], postprocess: Callable) -> np.ndarray:
    """Postprocessed outputs of a fixed-shape session on arbitrary batches, one row per sample."""
    shapes = session_shapes(session)
    fitted, n = fit_batches(batches, shapes)
    outs = [postprocess(session.run(None, b), b) for b in fitted]
    return np.concatenate(outs)[:n]
