"""PQ Index (PQI) and Sparsity-informed Adaptive Pruning (SAP), after Diao et al., "Pruning Deep
Neural Networks from a Sparsity Perspective" (ICLR 2023).

For 0 < p < q and the d unmasked entries w of a scope,

    I_{p,q}(w) = 1 - d^{1/q - 1/p} ||w||_p / ||w||_q            in [0, 1 - d^{1/q - 1/p}]

is 0 for a constant vector and largest for a one-hot one: larger = sparser = more compressible.
One SAP round keeps at least r = ceil(d (1 + eta_r)^{-q/(q-p)} (1 - I)^{qp/(q-p)}) entries and
prunes c = floor(d min(gamma (1 - r/d), beta)) of them, the c smallest |w| among the unmasked.

Scopes: `global` (one vector: every prunable weight), `layer` (one per layer), `neuron` (one per
output row: a Linear's row, a conv's filter). Norms are computed in float64: ||w||_{1/2} squares a
sum of square roots, and float32 loses the small differences the index measures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["SCOPES", "SapParams", "pq_index", "retained_lower_bound", "prune_count", "sap_round"]

SCOPES = ("global", "layer", "neuron")


@dataclass(frozen=True)
class SapParams:
    p: float = 0.5
    q: float = 1.0
    eta_r: float = 0.0
    gamma: float = 1.0
    beta: float = 0.9


def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0) -> float:
    """I_{p,q} of the entries of `w` (all of them count in d; pass only the unmasked ones)."""
    a = w.detach().flatten().double().abs()
    d = a.numel()
    norm_q = a.pow(q).sum().pow(1.0 / q)
    if d == 0 or float(norm_q) == 0.0:
        return 0.0  # nothing left (or all zero): no evidence of compressibility
    norm_p = a.pow(p).sum().pow(1.0 / p)
    return float(1.0 - d ** (1.0 / q - 1.0 / p) * norm_p / norm_q)


def retained_lower_bound(d: int, index: float, sap: SapParams) -> int:
    """r: the fewest entries SAP keeps, from the index (the bound of the paper's Theorem)."""
    expo = sap.q / (sap.q - sap.p)
    r = d * (1.0 + sap.eta_r) ** (-expo) * max(0.0, 1.0 - index) ** (sap.p * expo)
    return min(d, math.ceil(round(r, 9)))  # round: 0.5 * 4 must not ceil to 3 through float error


def prune_count(d: int, index: float, sap: SapParams) -> int:
    """c = floor(d min(gamma (1 - r/d), beta)): how many of the d unmasked entries to prune."""
    if d == 0:
        return 0
    r = retained_lower_bound(d, index, sap)
    return max(0, math.floor(round(d * min(sap.gamma * (1.0 - r / d), sap.beta), 9)))


def _scopes(weights: dict[str, torch.Tensor], scope: str) -> list[list[tuple[str, slice | int | None]]]:
    """Each scope as a list of (layer, row) pieces; row None = the whole layer."""
    if scope == "global":
        return [[(n, None) for n in weights]]
    if scope == "layer":
        return [[(n, None)] for n in weights]
    return [[(n, i)] for n, w in weights.items() for i in range(w.shape[0])]


def _piece(t: torch.Tensor, row) -> torch.Tensor:
    return t.flatten() if row is None else t[row].flatten()


@torch.no_grad()
def sap_round(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], scope: str, sap: SapParams,
              limit: int | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One SAP round: new masks (1 = kept) and, per scope, {index, d, prune}. `limit` caps the total
    pruned this round (a target sparsity); every scope's count is then scaled down alike."""
    groups = _scopes(weights, scope)
    stats, kept_values = [], []
    for pieces in groups:
        kept = torch.cat([_piece(weights[n], r)[_piece(masks[n], r)] for n, r in pieces])
        index = pq_index(kept, sap.p, sap.q)
        stats.append({"index": index, "d": kept.numel(), "prune": prune_count(kept.numel(), index, sap)})
        kept_values.append(kept)
    total = sum(s["prune"] for s in stats)
    if limit is not None and total > limit:  # scale every scope alike; largest remainders take the rest
        shares = [s["prune"] * limit / total for s in stats]
        for s, share in zip(stats, shares):
            s["prune"] = math.floor(share)
        rest = limit - sum(s["prune"] for s in stats)
        for k in sorted(range(len(stats)), key=lambda k: (math.floor(shares[k]) - shares[k], k))[:rest]:
            stats[k]["prune"] += 1
    new = {n: m.clone() for n, m in masks.items()}
    for pieces, s, kept in zip(groups, stats, kept_values):
        if s["prune"] == 0:
            continue
        # threshold on |w| among the unmasked entries; ties broken by position (stable sort)
        flat_masks = [_piece(new[n], r) for n, r in pieces]
        positions = torch.cat([torch.nonzero(fm).flatten() for fm in flat_masks])
        owner = torch.cat([torch.full((int(fm.sum()),), k) for k, fm in enumerate(flat_masks)])
        order = torch.sort(kept.abs(), stable=True).indices[:s["prune"]]
        for k, (n, r) in enumerate(pieces):
            drop = positions[order[owner[order] == k]]
            view = new[n].view(-1) if r is None else new[n][r].view(-1)
            view[drop] = False
    return new, stats
