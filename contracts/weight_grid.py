"""Which integers int8 weights may take, so that the kernels that run them compute what the graph says.

onnxruntime's x86 int8 kernels without VNNI (AVX2, AVX-512 without VNNI) multiply u8 activations by
s8 weights with vpmaddubsw, which adds the two products of *adjacent* weights into one saturating
int16. With activations up to 255, a pair saturates only when its weights have the same sign and
255 * (|q_a| + |q_b|) > 32767, i.e. |q_a| + |q_b| > 128. Opposite signs never do (255 * 127 fits).

So full 8-bit weights stay exact there if every same-sign adjacent pair sums to at most 128 in
magnitude. Which weights are adjacent is fixed by the kernels' reduction order: a Linear's input
features in order (MatMul's K), a convolution's (kernel row, kernel column, input channel)
flattened, because onnxruntime runs QLinearConv channels-last (checked on every conv form, including
depthwise and grouped, under an emulated AVX2 CPU: tests/runtime_check/test_avx2_emulation.py);
pairs are (0, 1), (2, 3), ... of that order, an odd last element pairs with padding.

Most pairs are far from the limit; the few that exceed it are moved to the nearest pair on it, and
each output channel picks the scale (qmax between 64 and 127) that gives its weights the least
squared error: with qmax <= 64 no pair can exceed 128, so this is never worse than 7-bit weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WeightGrid", "PAIR_SUM_LIMIT", "as_grid", "reduction_pairs", "from_reduction_pairs", "limit_pairs",
           "pair_limited_per_channel", "pair_violations", "enforce_grid"]

PAIR_SUM_LIMIT = 32767 // 255  # 128: the largest |q_a| + |q_b| whose products with 255 fit an int16
# per-channel qmax candidates of the pair-limited grid; 64 is where no pair can exceed the limit
SCALE_CANDIDATES = (127, 120, 112, 104, 96, 88, 80, 72, 64)


@dataclass(frozen=True)
class WeightGrid:
    """Symmetric int8 weights in [-qmax, qmax]; with `pair_limit`, same-sign weights that the kernel
    adds into one int16 also keep |q_a| + |q_b| <= pair_limit, and each channel picks its own qmax."""

    qmax: int = 127
    pair_limit: int | None = None

    @property
    def scheme(self) -> str:
        if self.pair_limit is not None:
            return "int8-pair-limited"
        return "int8" if self.qmax >= 127 else f"int{int(np.log2(self.qmax + 1)) + 1}"


def as_grid(grid: int | WeightGrid) -> WeightGrid:
    return grid if isinstance(grid, WeightGrid) else WeightGrid(qmax=int(grid))


def reduction_pairs(weight: np.ndarray) -> np.ndarray:
    """(out, pairs, 2) copy of a weight in torch layout (out, in) or (out, in/groups, *kernel), in the
    order onnxruntime's x86 kernels reduce it; zero-padded to an even length."""
    w = np.asarray(weight)
    rows = np.moveaxis(w, 1, -1) if w.ndim > 2 else w
    rows = rows.reshape(w.shape[0], -1)
    if rows.shape[1] % 2:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], 1), rows.dtype)], axis=1)
    return rows.reshape(w.shape[0], -1, 2)


def from_reduction_pairs(pairs: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of reduction_pairs for a weight of `shape`."""
    flat = pairs.reshape(shape[0], -1)[:, :int(np.prod(shape[1:]))]
    if len(shape) <= 2:
        return flat.reshape(shape)
    moved = flat.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
    return np.moveaxis(moved, -1, 1)


def pair_violations(q_pairs: np.ndarray, limit: int = PAIR_SUM_LIMIT) -> np.ndarray:
    """Boolean (out, pairs): same-sign pairs whose magnitudes sum above `limit`."""
    a, b = q_pairs[..., 0], q_pairs[..., 1]
    if a.dtype.kind in "iu":
        a, b = a.astype(np.int32), b.astype(np.int32)
    return (a * b > 0) & (np.abs(a + b) > limit)  # same sign: |a| + |b| = |a + b|


def limit_pairs(q_pairs: np.ndarray, u_pairs: np.ndarray, qmax: int, limit: int = PAIR_SUM_LIMIT
                ) -> tuple[np.ndarray, int]:
    """Move every violating pair to the integer pair on |a| + |b| = limit nearest to the real values
    `u_pairs` (weights / scale); returns the new integers (a copy, float32 if `u_pairs` is float) and
    how many pairs moved. Zeros never move."""
    q = q_pairs.astype(np.float32 if q_pairs.dtype.kind == "f" else np.int32)
    bad = pair_violations(q, limit)
    count = int(np.count_nonzero(bad))
    if not count:
        return q, 0
    ua, ub = np.abs(u_pairs[..., 0][bad]), np.abs(u_pairs[..., 1][bad])
    lo = max(limit - qmax, 0)
    a = np.clip(np.rint((ua - ub + limit) / 2.0), lo, min(qmax, limit))
    sign = np.sign(q[..., 0][bad])
    q[..., 0][bad] = sign * a
    q[..., 1][bad] = sign * (limit - a)
    return q, count


def _nearest(pairs: np.ndarray, absmax: np.ndarray, qmax: int, limit: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per channel at one qmax: scales, pair-limited integers (float32), their squared error and how
    many of the channel's pairs had to move."""
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    u = pairs * (1.0 / scale)[:, None, None]
    nearest = np.clip(np.rint(u), -qmax, qmax)
    moved = np.count_nonzero(pair_violations(nearest, limit), axis=1)
    q, _ = limit_pairs(nearest, u, qmax, limit) if moved.any() else (nearest, 0)
    diff = q - u
    err = np.einsum("ij,ij->i", diff.reshape(len(scale), -1), diff.reshape(len(scale), -1)) * scale.astype(np.float64) ** 2
    return scale, q, err, moved


def pair_limited_per_channel(weight: np.ndarray, limit: int = PAIR_SUM_LIMIT
                             ) -> tuple[np.ndarray, np.ndarray, int]:
    """int8 weights (torch layout) and per-channel scales on the pair-limited grid, and how many pairs
    had to move to the limit."""
    w = np.asarray(weight, dtype=np.float32)
    pairs = reduction_pairs(w)
    absmax = np.abs(pairs).reshape(len(w), -1).max(axis=1)
    scale, q, err, moved = _nearest(pairs, absmax, SCALE_CANDIDATES[0], limit)
    # channels exact at full range keep it: a coarser grid only adds rounding error there
    open_rows = np.flatnonzero(moved)
    if open_rows.size:
        sub, sub_max = pairs[open_rows], absmax[open_rows]
        best_scale, best_q, best_err, best_moved = scale[open_rows], q[open_rows], err[open_rows], moved[open_rows]
        for qmax in SCALE_CANDIDATES[1:]:
            s, qq, e, m = _nearest(sub, sub_max, qmax, limit)
            better = e < best_err
            best_scale, best_err = np.where(better, s, best_scale), np.where(better, e, best_err)
            best_moved = np.where(better, m, best_moved)
            best_q = np.where(better[:, None, None], qq, best_q)
        scale[open_rows], q[open_rows], moved[open_rows] = best_scale, best_q, best_moved
    return from_reduction_pairs(q, w.shape).astype(np.int8), scale, int(moved.sum())


def enforce_grid(q: np.ndarray, weight: np.ndarray, scale: np.ndarray, grid: WeightGrid) -> tuple[np.ndarray, int]:
    """Integers (torch layout) some other rounding chose (AdaRound), moved onto `grid`'s pair limit
    nearest to weight / scale; returns them and how many pairs moved."""
    if grid.pair_limit is None:
        return q, 0
    u = reduction_pairs(np.asarray(weight, np.float32) / scale.reshape((-1,) + (1,) * (q.ndim - 1)))
    fixed, moved = limit_pairs(reduction_pairs(q), u, grid.qmax, grid.pair_limit)
    return from_reduction_pairs(fixed, q.shape).astype(np.int8), moved
