"""Equal kept-parameter budgets for benchmarks/methods.py: which setting of each pruning method
keeps a given fraction of the prunable weights, and the Pareto front of the results.

Pure functions (no torch, no onnxruntime), unit-tested in tests/test_benchmark_budget.py.
"""
from __future__ import annotations

import math

__all__ = ["nm_for", "channel_sparsity_for", "fitted_exponent", "pareto_front"]


def nm_for(kept: float, group_sizes: tuple[int, ...] = (4, 8)) -> tuple[int, int] | None:
    """The N:M pattern keeping exactly `kept` of the weights, M = 4 preferred (the pattern sparse
    hardware runs: 0.5 -> 2:4, 0.25 -> 1:4), then 8 (0.375 -> 3:8); None when none fits."""
    for m in group_sizes:
        n = round(kept * m)
        if 0 < n < m and abs(n - kept * m) < 1e-9:
            return n, m
    return None


def channel_sparsity_for(kept: float, exponent: float) -> float:
    """Fraction of channels to remove so that (1 - s) ** exponent of the weights stay.

    Removing a fraction s of a conv's output channels also removes them from the next layer's
    inputs, so a CNN keeps about (1 - s)^2 of its weights (exponent 2); heads and FFN neurons are
    one dimension of each Linear they touch, so a transformer keeps about 1 - s (exponent 1)."""
    if not 0.0 < kept <= 1.0 or exponent <= 0:
        raise ValueError(f"need 0 < kept <= 1 and exponent > 0, got {kept}, {exponent}")
    return 1.0 - kept ** (1.0 / exponent)


def fitted_exponent(channel_sparsity: float, kept: float) -> float | None:
    """The exponent a in kept = (1 - s)^a that one measured run implies (None when it says nothing:
    s = 0, or nothing / everything kept)."""
    if not 0.0 < channel_sparsity < 1.0 or not 0.0 < kept < 1.0:
        return None
    return math.log(kept) / math.log(1.0 - channel_sparsity)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indexes of the points no other point beats on both axes (higher x and higher y are better),
    in increasing x. A point equal to another on both axes is kept once (the first)."""
    front, best_y = [], -math.inf
    # scan from the highest x down; among equal x the highest y first
    for i in sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i)):
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front[::-1]
