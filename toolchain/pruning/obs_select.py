"""Which input units (FFN neurons, attention heads) of a dense layer y = W x + b to remove, by
the error the least-squares refit cannot take back (Optimal Brain Surgeon for groups; ZipLM,
Kurtic et al. 2023; the layer-wise reconstruction of Kwon et al. 2022).

With H = G + lambda I (G = sum [x;1][x;1]^T over calibration tokens, last row the constant input)
and H^-1 its inverse, removing the columns S of W and refitting the others optimally raises
sum ||W x - W' x||^2 by

    E(S) = tr(W_S (H^-1_SS)^-1 W_S^T),

and the optimal update of the rest is W <- W - W_S (H^-1_SS)^-1 H^-1_{S,:}. A unit whose
contribution the others can reproduce (correlated neurons, heads that attend alike) costs little
even when its activations are large, which activation x weight norm cannot see.

`greedy_drop` removes units a chunk at a time and updates W and H^-1 after each chunk (removing
S from H^-1 is a Schur complement), so later choices see what earlier removals left behind.
"""
from __future__ import annotations

import torch

__all__ = ["obs_saliency", "greedy_drop", "damped_inverse"]


def damped_inverse(G: torch.Tensor, damp: float) -> torch.Tensor:
    G = G.double()
    lam = damp * torch.diagonal(G).mean()
    return torch.linalg.inv(G + lam * torch.eye(len(G), dtype=G.dtype))


def _blocks(Hinv: torch.Tensor, unit: int, units: list[int]) -> torch.Tensor:
    """[len(units), unit, unit]: the diagonal blocks of H^-1 for the given units."""
    idx = torch.tensor([[u * unit + j for j in range(unit)] for u in units])
    return Hinv[idx.unsqueeze(-1), idx.unsqueeze(-2)]


def obs_saliency(W: torch.Tensor, Hinv: torch.Tensor, unit: int, units: list[int] | None = None) -> torch.Tensor:
    """E({u}) for each unit u of `unit` consecutive columns of W (all units when `units` is None)."""
    W = W.double()
    units = list(range(W.shape[1] // unit)) if units is None else units
    if not units:
        return torch.zeros(0, dtype=torch.float64)
    Wu = W.view(W.shape[0], -1, unit)[:, units].permute(1, 0, 2)  # [units, out, unit]
    solved = torch.linalg.solve(_blocks(Hinv, unit, units), Wu.transpose(1, 2))  # (H^-1_uu)^-1 W_u^T
    return (Wu * solved.transpose(1, 2)).sum((1, 2)).clamp_min(0)


def greedy_drop(W: torch.Tensor, G: torch.Tensor, unit: int, n_drop: int, damp: float,
                chunks: int = 8) -> list[int]:
    """The `n_drop` units to remove, chosen in `chunks` rounds of lowest saliency with W and H^-1
    updated in between (one round = the one-shot OBS choice)."""
    n_units = W.shape[1] // unit
    if n_drop <= 0:
        return []
    W = torch.cat([W.double(), torch.zeros(W.shape[0], 1, dtype=torch.float64)], dim=1)  # bias column
    Hinv = damped_inverse(G, damp)
    alive, dropped = list(range(n_units)), []
    for r in range(chunks):
        take = (n_drop * (r + 1)) // chunks - len(dropped)
        if take <= 0:
            continue
        scores = obs_saliency(W[:, :-1], Hinv[:-1, :-1], unit, alive)
        order = torch.sort(scores, stable=True).indices[:take].tolist()
        chosen = [alive[i] for i in order]
        cols = torch.tensor([u * unit + j for u in chosen for j in range(unit)])
        block_inv = torch.linalg.inv(Hinv[cols][:, cols])
        W = W - W[:, cols] @ block_inv @ Hinv[cols]
        Hinv = Hinv - Hinv[:, cols] @ block_inv @ Hinv[cols]
        W[:, cols] = 0.0
        dropped += chosen
        alive = [u for u in alive if u not in set(chosen)]
    return sorted(dropped)
