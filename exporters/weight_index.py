"""Find torch weights among ONNX initializers by content, whatever names the exporter chose and
whether it stored W or W^T.

A fingerprint (shape and 64 values at fixed positions) picks the candidates and an exact
comparison confirms one. The sha1 digest of every weight, of its transpose and of every
initializer that this replaces read each byte three times and copied every transpose:
1.3 s on a BERT-base-size encoder, against 0.4 s here (most of it the confirming comparisons).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["WeightIndex", "initializer_array"]

_SAMPLES = 64  # values a fingerprint reads
_STRIDE = 2654435761  # Knuth's multiplicative hash constant: the positions spread over the whole tensor


def _fingerprint(a: np.ndarray) -> tuple:
    if a.ndim == 0 or a.size == 0:
        return a.shape, np.asarray(a, np.float32).tobytes()
    flat = (np.arange(_SAMPLES, dtype=np.int64) * _STRIDE) % a.size
    # + 0 turns -0.0 into 0.0: equal values must give equal bytes (a weight scaled by a zero
    # BatchNorm gamma holds -0.0 where the exporter's copy may hold 0.0)
    return a.shape, (np.asarray(a[np.unravel_index(flat, a.shape)], np.float32) + np.float32(0)).tobytes()


def initializer_array(init: onnx.TensorProto) -> np.ndarray:
    """The initializer's values; a read-only view of its bytes where they are plain float32."""
    if (init.data_type == onnx.TensorProto.FLOAT and init.raw_data
            and init.data_location != onnx.TensorProto.EXTERNAL):
        return np.frombuffer(init.raw_data, np.dtype("<f4")).reshape(tuple(init.dims))
    return numpy_helper.to_array(init)


class WeightIndex:
    """Module name -> weight (numpy, as torch holds it: (out, in) for a Linear), searchable by
    content in both layouts of a 2-D weight."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self._direct: dict[tuple, list[tuple[str, np.ndarray]]] = defaultdict(list)
        self._transposed: dict[tuple, list[tuple[str, np.ndarray]]] = defaultdict(list)
        for module, w in weights.items():
            self._direct[_fingerprint(w)].append((module, w))
            if w.ndim == 2:
                self._transposed[_fingerprint(w.T)].append((module, w.T))  # a view: no copy

    def matches(self, arr: np.ndarray, taken: set | dict = frozenset()) -> list[tuple[str, bool]]:
        """Every (module, stored transposed) whose weight equals `arr`: modules not in `taken`
        first (two equal weights, e.g. zero-initialised layers, go to two nodes), then a weight
        stored as is before one stored transposed (a symmetric square weight is both; the
        caller keeps the layout its node reads)."""
        key = _fingerprint(arr)
        equal = [(module, transposed)
                 for transposed, table in ((False, self._direct), (True, self._transposed))
                 for module, w in table.get(key, ()) if np.array_equal(arr, w)]
        return [hit for hit in equal if hit[0] not in taken] + [hit for hit in equal if hit[0] in taken]

    def twins(self) -> set[str]:
        """Modules whose weight equals another module's (in either layout): content alone cannot
        tell which initializer is whose."""
        out: set[str] = set()
        for table in (self._direct, self._transposed):
            for bucket in table.values():
                for i, (a, wa) in enumerate(bucket):
                    for b, wb in bucket[i + 1:]:
                        if a != b and np.array_equal(wa, wb):
                            out.update((a, b))
        for key, bucket in self._direct.items():  # W of one module equal to W^T of another
            for a, wa in bucket:
                for b, wb in self._transposed.get(key, ()):
                    if a != b and np.array_equal(wa, wb):
                        out.update((a, b))
        return out
