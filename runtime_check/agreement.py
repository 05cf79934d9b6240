"""How closely two runs of the same model agree, judged per sample on the whole output vector.

A single element says little about an embedding or a logit vector: an int8 requantization that
rounds one step the other way on another CPU moves a few coordinates a little, and those moves
travel through the layers. What users compare is the vector (its direction for embeddings, its
ranking for logits), so the error is the L2 norm of the difference relative to the L2 norm of the
reference, per sample.
"""
from __future__ import annotations

import numpy as np

__all__ = ["per_sample_agreement", "relative_errors"]

# A near-zero reference row would make any difference look huge: its relative error is taken
# against at least this fraction of the median row norm.
_NORM_FLOOR = 0.1


def per_sample_agreement(ref: np.ndarray, got: np.ndarray) -> dict:
    """Per-sample relative L2 error ||got - ref|| / ||ref|| (max and mean over samples), per-sample
    cosine (min and mean) and, for 2-D outputs with several columns, argmax agreement."""
    if ref.shape != got.shape:
        raise ValueError(f"outputs differ in shape: {ref.shape} vs {got.shape}")
    if not ref.size:
        return {"samples": 0, "max_rel_error": 0.0, "mean_rel_error": 0.0, "min_cosine": 1.0, "mean_cosine": 1.0}
    r = ref.reshape(len(ref), -1).astype(np.float64)
    g = got.reshape(len(got), -1).astype(np.float64)
    r_norm, g_norm = np.linalg.norm(r, axis=1), np.linalg.norm(g, axis=1)
    rel = relative_errors(ref, got)
    cos = np.where((r_norm > 0) & (g_norm > 0), (r * g).sum(1) / np.maximum(r_norm * g_norm, 1e-300),
                   np.where((r_norm == 0) & (g_norm == 0), 1.0, 0.0))
    out = {"samples": int(len(r)), "max_rel_error": float(rel.max()), "mean_rel_error": float(rel.mean()),
           "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
    if ref.ndim == 2 and ref.shape[-1] > 1:
        out["argmax_agreement"] = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return out


def relative_errors(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per sample ||got - ref|| / ||ref|| (float64), the reference norm floored at _NORM_FLOOR
    of the median row norm."""
    if ref.shape != got.shape:
        raise ValueError(f"outputs differ in shape: {ref.shape} vs {got.shape}")
    r = ref.reshape(len(ref), -1).astype(np.float64)
    g = got.reshape(len(got), -1).astype(np.float64)
    r_norm = np.linalg.norm(r, axis=1)
    floor = max(_NORM_FLOOR * float(np.median(r_norm)), 1e-12) if len(r) else 1e-12
    return np.linalg.norm(g - r, axis=1) / np.maximum(r_norm, floor)
