"""N:M semi-structured pruning: in each group of M contiguous input weights keep the N largest |w|."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.masks import apply_masks
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import PruneContext, PruneResult

__all__ = ["NMPruneConfig", "nm_mask", "nm_skip_reason", "parse_nm"]


MAX_M = 256


def parse_nm(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"--nm must look like N:M (e.g. 2:4), got '{text}'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ConfigError(f"--nm needs 0 < N < M, got {n}:{m}")
    return n, m


@dataclass(frozen=True)
class NMPruneConfig:
    n: int = 2
    m: int = 4
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "prune"
    requires_calibration: ClassVar[bool] = False
    default_recovery_steps: ClassVar[int | None] = None  # no recovery unless asked (--recover)

    def __post_init__(self):
        if not 0 < self.n < self.m:
            raise ConfigError(f"N:M pruning needs 0 < N < M, got {self.n}:{self.m}")
        if self.m > MAX_M:  # each row is padded to a multiple of M: a huge M only exhausts memory
            raise ConfigError(f"N:M pruning needs M <= {MAX_M}, got {self.n}:{self.m}")


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Groups run along the input-channel axis (the ASP convention): a Linear (out, in) is grouped
    along `in`; a conv (out, in, kh, kw) along `in` at each kernel position. The last group is
    zero-padded, and padding never wins a kept slot over a real weight of equal magnitude."""
    w = weight.movedim(1, -1) if weight.dim() > 2 else weight  # (..., in)
    lead, fan_in = w.shape[:-1], w.shape[-1]
    pad = (-fan_in) % m
    scores = F.pad(w.abs(), (0, pad), value=-1.0).reshape(*lead, -1, m)
    keep_idx = torch.topk(scores, n, dim=-1, sorted=False).indices
    mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, keep_idx, True)
    mask = mask.reshape(*lead, fan_in + pad)[..., :fan_in]
    return mask.movedim(-1, 1) if weight.dim() > 2 else mask


def nm_skip_reason(weight: torch.Tensor, n: int, m: int) -> str | None:
    """Why a layer cannot be N:M-pruned, or None. Groups run along input channels, so a layer with
    at most N of them (a 1-channel stem conv) has at most N real weights per group of M: it already
    fits the pattern and nothing can be removed. Such a layer is skipped and the report says so."""
    fan_in = weight.shape[1]
    if fan_in <= n:
        return (f"{fan_in} input channel(s): each group of {m} holds at most {fan_in} weight(s), "
                f"already within {n}:{m}, so nothing can be pruned")
    return None


@register("prune", "nm", NMPruneConfig,
          "N:M semi-structured (default 2:4) along input channels; zeros = size, not CPU speed")
def prune_nm(model, config: NMPruneConfig, ctx: PruneContext) -> PruneResult:
    layers = ctx.layers
    skipped = {name: why for name, mod in layers.items() if (why := nm_skip_reason(mod.weight, config.n, config.m))}
    masks = {name: nm_mask(mod.weight, config.n, config.m) for name, mod in layers.items() if name not in skipped}
    apply_masks(layers, masks)
    return PruneResult(masks=masks, speed_note=f"{config.n}:{config.m} zeros shrink the compressed "
                       "download; onnxruntime's CPU kernels have no N:M path, so they add no speed",
                       skipped=skipped)
