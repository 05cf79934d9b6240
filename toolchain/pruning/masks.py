"""Which weights are prunable, how masks are applied and how sparsity is measured."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CONV_TYPES", "PRUNABLE_TYPES", "prunable_layers", "apply_masks", "layer_sparsity", "overall_sparsity"]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # not transposed: pruned and quantized as weight layers
PRUNABLE_TYPES = CONV_TYPES + (nn.Linear,)


def prunable_layers(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """Conv and linear layers whose weight has dim > 1; biases, norms and embeddings are excluded.

    `prefix` restricts the scope (e.g. "encoder." for a transformer's encoder only).
    """
    return {
        name: mod for name, mod in model.named_modules()
        if isinstance(mod, PRUNABLE_TYPES) and mod.weight.dim() > 1 and name.startswith(prefix)
    }


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Bake masks into weights: masked entries become exact zeros."""
    for name, mask in masks.items():
        layers[name].weight.mul_(mask.to(layers[name].weight.dtype))


def _dense_numel(layers: dict[str, nn.Module], dense: dict[str, int] | None) -> dict[str, int]:
    return {n: (dense or {}).get(n, m.weight.numel()) for n, m in layers.items()}


def layer_sparsity(layers: dict[str, nn.Module], dense: dict[str, int] | None = None) -> dict[str, float]:
    """Fraction of each layer's weights that are zero or gone. `dense` = weight counts before
    pruning: structured pruning physically removes weights, and those count as removed too."""
    total = _dense_numel(layers, dense)
    return {n: 1.0 - float((m.weight != 0).sum()) / total[n] for n, m in layers.items()}


def overall_sparsity(layers: dict[str, nn.Module], dense: dict[str, int] | None = None) -> float:
    kept = sum(int((m.weight != 0).sum()) for m in layers.values())
    # `dense` counts every layer before pruning, also those a method replaced under new names
    # (low-rank factors): the fraction removed is measured against all of them
    total = sum(dense.values()) if dense else sum(_dense_numel(layers, dense).values())
    return 1.0 - kept / total if total else 0.0


def smallest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask zeroing exactly the k smallest scores (stable order breaks ties deterministically)."""
    flat = scores.flatten()
    mask = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        order = torch.sort(flat, stable=True).indices
        mask[order[:k]] = False
    return mask.view_as(scores)
