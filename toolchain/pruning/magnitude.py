"""Unstructured magnitude pruning: zero the fraction `sparsity` of smallest |w|."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.masks import apply_masks, smallest_k_mask
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import PruneContext, PruneResult

__all__ = ["MagnitudePruneConfig", "magnitude_masks"]


@dataclass(frozen=True)
class MagnitudePruneConfig:
    """`scope`: "global" (default) ranks all prunable weights together, so layers with more
    redundancy give up more; "layer" prunes every layer to exactly `sparsity`. Global is the
    default because it keeps accuracy better at the same overall sparsity
    (benchmarks/results/defaults.md)."""

    sparsity: float = 0.5
    scope: str = "global"
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "prune"
    # without --sparsity the run chooses the amount within the accuracy budget (sparsity_search.py)
    auto_sparsity: ClassVar[bool] = True
    requires_calibration: ClassVar[bool] = False
    default_recovery_steps: ClassVar[int | None] = None  # no recovery unless asked (--recover)

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope must be 'layer' or 'global', got '{self.scope}'")


def _count(sparsity: float, n: int) -> int:
    # round first: 0.29 * 100 is 28.999999999999996 in binary floating point
    return math.floor(round(sparsity * n, 6))


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    if scope == "layer":
        return {n: smallest_k_mask(w.abs(), _count(sparsity, w.numel())) for n, w in weights.items()}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    keep = smallest_k_mask(flat, _count(sparsity, flat.numel()))
    masks, start = {}, 0
    for n, w in weights.items():
        masks[n] = keep[start:start + w.numel()].view_as(w)
        start += w.numel()
    return masks


@register("prune", "magnitude", MagnitudePruneConfig,
          "unstructured magnitude pruning (layer-wise or global); zeros = size, not CPU speed")
def prune_magnitude(model, config: MagnitudePruneConfig, ctx: PruneContext) -> PruneResult:
    masks = magnitude_masks({n: m.weight for n, m in ctx.layers.items()}, config.sparsity, config.scope)
    apply_masks(ctx.layers, masks)
    return PruneResult(masks=masks, speed_note="unstructured zeros shrink the compressed download; "
                       "onnxruntime's CPU kernels do not skip them, so they add no speed")
