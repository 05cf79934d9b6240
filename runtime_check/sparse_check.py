"""Sparse storage must not change the arithmetic: outputs of the dense and the sparse-stored file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sqexport.runtime_check.session import make_session

__all__ = ["storage_diff"]


def storage_diff(dense: bytes, sparse: Path, batches: list[dict]) -> dict:
    """Max |difference| of every output on `batches` (onnxruntime densifies at load: expect 0)."""
    a, b = make_session(dense, 1), make_session(sparse, 1)
    names = {i.name for i in a.get_inputs()}
    worst, identical = 0.0, True
    for batch in batches:
        feed = {k: v for k, v in batch.items() if k in names}
        for x, y in zip(a.run(None, feed), b.run(None, feed)):
            worst = max(worst, float(np.abs(x.astype(np.float64) - y).max()) if x.size else 0.0)
            identical = identical and np.array_equal(x, y)
    return {"max_abs_diff": worst, "bit_identical": bool(identical), "batches": len(batches)}
