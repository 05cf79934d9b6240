"""Low-rank factorization arithmetic (torch tensors in, factors out; no modules).

- Truncated SVD of a matrix W (out x in) = B A with B (out x r), A (r x in): the best rank-r
  approximation in Frobenius norm (Eckart-Young), relative error sqrt(sum_{i>r} s_i^2) / ||W||_F.
- Rank by energy: the smallest r with sum_{i<=r} s_i^2 >= tau * sum_i s_i^2.
- Separable k x 1 / 1 x k factorization of a conv kernel W (C_out, C_in, kh, kw): the kernel as
  a sum of R outer products of vertical and horizontal filters (Boukraichi et al. 2023, post-hoc
  via SVD). We use the standard construction with R intermediate channels (Jaderberg et al. 2014
  "scheme 2", closed form of Tai et al. 2016): unfold W into M[(c, i), (n, j)] = W[n, c, i, j]
  (C_in*kh x C_out*kw); its truncated SVD M ~ U_R S_R V_R^T gives a kh x 1 conv C_in -> R
  (V[r, c, i] = sqrt(s_r) U[(c, i), r]) followed by a 1 x kw conv R -> C_out
  (H[n, r, j] = sqrt(s_r) V[(n, j), r]). It is exact when M has rank <= R (e.g. a kernel
  W[n, c, i, j] = a[c, i] b[n, j]) and otherwise optimal in Frobenius norm for that structure.
- Hierarchical (H-matrix) approximation with a bounded error (Mango & Katende, arXiv 2409.07028):
  recursively bisect rows and columns; each block keeps the smallest rank k whose Frobenius tail
  sqrt(sum_{i>k} s_i^2) <= eps * ||block||_F, or stays dense. Because the blocks partition W, the
  squared tails add up: ||W - H||_F <= eps * ||W||_F for the whole matrix, whatever the partition.
  We use the Frobenius-tail rule (not s_{k+1} <= eps s_1) because it is the one that bounds the
  overall relative Frobenius error; the partition is the cheapest (fewest parameters) one the
  recursion finds, down to `min_block` rows/columns.

SVDs run in float64 so that the reported errors are the errors of the float32 factors to ~1e-7.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["energy_rank", "round_rank", "tail_rank", "svd_factors", "relative_tail", "pays", "conv_unfold",
           "separable_factors", "Block", "hmatrix", "hmatrix_dense", "hmatrix_params"]


def energy_rank(s: torch.Tensor, tau: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= tau * sum s_i^2 (s sorted descending); 0 for a zero matrix."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(energy, 0)
    # a relative slack of 1e-12 keeps tau = 1 (and exact-rank matrices) from failing on rounding
    return int(torch.searchsorted(cum, torch.tensor(tau * total * (1 - 1e-12), dtype=cum.dtype)).item()) + 1


def round_rank(r: int, multiple: int, cap: int) -> int:
    """`r` rounded up to a multiple of `multiple`, at most `cap` (the full rank). Rounding up only
    adds singular values, so the kept energy stays >= the tau that chose `r`. Why multiples of 8:
    int8 kernels work on channel blocks; onnxruntime's fast symmetric int8 conv (MlasConvSym)
    takes only output channel counts that are multiples of 8 (and >= 16) and input counts that are
    multiples of 4; other counts fall back to im2col + GEMM, several times slower for the same
    layer (benchmarks/results/lowrank.md)."""
    if multiple <= 1 or r <= 0:
        return min(r, cap)
    return min(-(-r // multiple) * multiple, cap)


def tail_rank(s: torch.Tensor, eps: float) -> int:
    """Smallest k with sqrt(sum_{i>k} s_i^2) <= eps * sqrt(sum s_i^2)."""
    energy = s.double() ** 2
    total = float(energy.sum())
    if total == 0.0:
        return 0
    tails = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # tails[k] = sum_{i>=k} (0-based)
    tails = torch.cat([tails, tails.new_zeros(1)])
    ok = (tails <= (eps ** 2) * total).nonzero()
    return int(ok[0].item())


def relative_tail(s: torch.Tensor, r: int) -> float:
    """||W - W_r||_F / ||W||_F from the singular values."""
    energy = s.double() ** 2
    total = float(energy.sum())
    return float(energy[r:].sum() / total) ** 0.5 if total > 0 else 0.0


def pays(r: int, m: int, n: int) -> bool:
    """Two factors (m x r)(r x n) hold fewer parameters (and multiply-adds) than m x n."""
    return r * (m + n) < m * n


def svd_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B (m x r), A (r x n), s): W ~ B @ A, the singular values split evenly (sqrt) between factors
    so both have similar ranges (the int8 per-channel scales of each factor stay balanced)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).to(w.dtype), (root[:, None] * vh[:r]).to(w.dtype), s


def conv_unfold(w: torch.Tensor) -> torch.Tensor:
    """M[(c, i), (n, j)] = W[n, c, i, j]: (C_in*kh) x (C_out*kw)."""
    c_out, c_in, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)


def separable_factors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(V (R, C_in, kh, 1), H (C_out, R, 1, kw), s) with conv(conv(x, V), H) ~ conv(x, W)."""
    c_out, c_in, kh, kw = w.shape
    left, right, s = svd_factors(conv_unfold(w), r)  # (C_in*kh, R), (R, C_out*kw)
    vertical = left.T.reshape(r, c_in, kh, 1)
    horizontal = right.reshape(r, c_out, kw).permute(1, 0, 2).reshape(c_out, r, 1, kw)
    return vertical.contiguous(), horizontal.contiguous(), s


@dataclass
class Block:
    """One leaf of the H-matrix: rows [r0, r1), columns [c0, c1); low rank (B @ A) or dense."""

    r0: int
    r1: int
    c0: int
    c1: int
    b: torch.Tensor | None = None  # (rows, k)
    a: torch.Tensor | None = None  # (k, cols)
    dense: torch.Tensor | None = None
    tail_sq: float = 0.0  # squared Frobenius error of this block

    @property
    def params(self) -> int:
        return self.dense.numel() if self.dense is not None else self.b.numel() + self.a.numel()

    @property
    def rank(self) -> int | None:
        return None if self.dense is not None else self.a.shape[0]


def _leaf(w: torch.Tensor, r0: int, c0: int, eps: float) -> tuple[Block, int]:
    m, n = w.shape
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    k = tail_rank(s, eps)
    if k == 0:  # an all-zero block costs nothing: a rank-0 pair of empty factors would not export
        k = 1
    if pays(k, m, n):
        root = s[:k].sqrt()
        tail = float((s[k:].double() ** 2).sum())
        b, a = (u[:, :k] * root).to(w.dtype), (root[:, None] * vh[:k]).to(w.dtype)
        return Block(r0, r0 + m, c0, c0 + n, b=b, a=a, tail_sq=tail), k * (m + n)
    return Block(r0, r0 + m, c0, c0 + n, dense=w.clone()), m * n


def _split(w: torch.Tensor, r0: int, c0: int, eps: float, min_block: int) -> tuple[list[Block], int]:
    """The cheaper of: this block as one leaf, or its four quadrants each split recursively."""
    leaf, cost = _leaf(w, r0, c0, eps)
    m, n = w.shape
    if min(m, n) < 2 * min_block or (leaf.dense is None and leaf.rank == 1):
        return [leaf], cost
    hm, hn = m // 2, n // 2
    blocks, total = [], 0
    for rs, rr in ((slice(0, hm), r0), (slice(hm, m), r0 + hm)):
        for cs, cc in ((slice(0, hn), c0), (slice(hn, n), c0 + hn)):
            sub, sub_cost = _split(w[rs, cs], rr, cc, eps, min_block)
            blocks += sub
            total += sub_cost
            if total >= cost:  # already dearer than the single leaf
                return [leaf], cost
    return blocks, total


def hmatrix(w: torch.Tensor, eps: float, min_block: int = 32) -> tuple[list[Block], float]:
    """Leaves covering W (out x in) and the achieved relative Frobenius error (<= eps)."""
    blocks, _ = _split(w.detach(), 0, 0, eps, min_block)
    norm_sq = float((w.double() ** 2).sum())
    err = (sum(b.tail_sq for b in blocks) / norm_sq) ** 0.5 if norm_sq > 0 else 0.0
    return blocks, err


def hmatrix_dense(blocks: list[Block], shape: tuple[int, int]) -> torch.Tensor:
    """The matrix the leaves represent (tests, measured error)."""
    out = torch.zeros(shape, dtype=torch.float64)
    for b in blocks:
        out[b.r0:b.r1, b.c0:b.c1] = b.dense.double() if b.dense is not None else b.b.double() @ b.a.double()
    return out


def hmatrix_params(blocks: list[Block]) -> int:
    return sum(b.params for b in blocks)
