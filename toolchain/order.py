"""The order of sparsity (S) and quantization (Q), as a study option.

Harma et al., "Effective Interplay between Sparsity and Quantization: From Theory to Practice"
(arXiv 2405.20935, ICLR 2025): with magnitude sparsity and max-scaled (per-channel) quantization,
S then Q adds no error beyond the two individual ones (Thm 3.5): pruning never removes a channel's
largest weight unless it removes the whole channel, so the scale is unchanged and zeros stay zero.
Q then S can be strictly worse (Thm 3.6): rounding ties or reorders magnitudes, so pruning the
quantized values can delete a larger original weight. S->Q is the default; `order: q_then_s`
in a recipe quantizes the prunable weights first (per-channel symmetric, the int8 code in
contracts.quant) and prunes the quantized values, so the difference can be measured.

Errors are e_f(W) = ||f(W) - W||_F of the whole transform f applied to the FP32 weight W.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sqexport.contracts.quant import quantize_weight_per_channel
from sqexport.contracts.weight_grid import WeightGrid

__all__ = ["ORDERS", "DEFAULT_ORDER", "fake_quant_weight", "quantize_layers_", "order_errors"]

ORDERS = ("s_then_q", "q_then_s")
DEFAULT_ORDER = "s_then_q"


def fake_quant_weight(w: torch.Tensor, qmax: int | WeightGrid) -> torch.Tensor:
    """Per-output-channel symmetric fake quantization with the int8 params code (scale = max|w_c| / qmax)."""
    return torch.from_numpy(quantize_weight_per_channel(w.detach().numpy(), qmax).dequantized()).to(w.dtype)


@torch.no_grad()
def quantize_layers_(layers: dict[str, nn.Module], qmax: int | WeightGrid) -> None:
    """Q before S: every prunable weight replaced by its fake-quantized value, in place."""
    for mod in layers.values():
        mod.weight.copy_(fake_quant_weight(mod.weight, qmax))


def order_errors(dense: dict[str, torch.Tensor], masks_sq: dict[str, torch.Tensor],
                 masks_qs: dict[str, torch.Tensor], qmax: int | WeightGrid) -> dict[str, dict[str, float]]:
    """Per layer: ||Q(M_S(W) * W) - W|| (S->Q, masks chosen on W) and ||M_S(Q(W)) * Q(W) - W||
    (Q->S, masks chosen on Q(W)). Layers without both masks are left out."""
    out = {}
    for name, w in dense.items():
        if name not in masks_sq or name not in masks_qs:
            continue
        sq = fake_quant_weight(w * masks_sq[name], qmax)
        qs = fake_quant_weight(w, qmax) * masks_qs[name]
        out[name] = {"s_then_q": float(np.linalg.norm((sq - w).numpy())),
                     "q_then_s": float(np.linalg.norm((qs - w).numpy()))}
    return out
