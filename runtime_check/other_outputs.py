"""Outputs after the first (a detector's boxes beside its scores), model.onnx against baseline.onnx.

The task metric and the gate read the first output only, so the others are measured here and shown
in the console and the report, not gated."""
from __future__ import annotations

from typing import Callable

import numpy as np

from sqexport.runtime_check.agreement import per_sample_agreement

__all__ = ["FLOOR", "keeping_rest", "other_outputs", "describe", "flagged"]

FLOOR = 0.99  # mean cosine below which the console flags an output the gate does not read


def keeping_rest(postprocess: Callable, kept: list) -> Callable:
    """`postprocess` that also appends each batch's outputs after the first to `kept`."""
    def run(outputs, batch):
        if len(outputs) > 1:
            kept.append([np.asarray(o) for o in outputs[1:]])
        return postprocess(outputs, batch)
    return run


def other_outputs(names: list[str], base: list[list[np.ndarray]], model: list[list[np.ndarray]]) -> list[dict]:
    """Per output (batches of keeping_rest): float outputs, the cosine per sample of the flattened
    output (mean and minimum; agreement.per_sample_agreement); integer outputs (an argmax,
    indices), the share of samples that are equal."""
    rows = []
    for i, name in enumerate(names):
        try:
            b = np.concatenate([batch[i] for batch in base])
            m = np.concatenate([batch[i] for batch in model])
        except (IndexError, ValueError):  # a batch-dependent shape: nothing comparable per sample
            rows.append({"name": name, "compared": False, "why": "its shape differs between batches"})
            continue
        if b.ndim == 0 or b.shape != m.shape:
            rows.append({"name": name, "compared": False, "why": "no batch dimension to compare per sample"})
            continue
        if b.dtype.kind in "iub":
            same = (b.reshape(len(b), -1) == m.reshape(len(m), -1)).all(1)
            rows.append({"name": name, "equal_share": float(same.mean()), "samples": len(b)})
            continue
        agreement = per_sample_agreement(b, m)
        rows.append({"name": name, "cosine_mean": agreement["mean_cosine"], "cosine_min": agreement["min_cosine"],
                     "samples": len(b)})
    return rows


def flagged(row: dict) -> bool:
    return row.get("cosine_mean", 1.0) < FLOOR or row.get("equal_share", 1.0) < 1.0


def describe(row: dict) -> str:
    """One row as the console and report.md print it."""
    if "cosine_mean" in row:
        return f"cosine to FP32 {row['cosine_mean']:.4f} mean, {row['cosine_min']:.4f} min"
    if "equal_share" in row:
        return f"equal to FP32 in {100 * row['equal_share']:.1f} % of samples"
    return f"not compared ({row['why']})"
