"""SmoothQuant-style smoothing (Xiao et al., 2023) for post-LayerNorm transformers like BERT.

A few channels of a transformer's hidden state carry values 10-100x larger than the rest; with one
per-tensor int8 scale for a Linear's input they waste nearly all levels. Smoothing divides input
channel j by s_j and multiplies weight column j by s_j, so the FP32 function is unchanged and
s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) balances the two ranges. Pruned zeros stay zero.

The paper folds 1/s into the preceding LayerNorm; in a post-LN model (BERT) that LayerNorm's
output is also the residual stream, so folding would change the model. Here the division stays an
explicit per-channel multiply in front of the Linear (one cheap elementwise op per group of
Linears that read the same tensor, e.g. Q/K/V), and the int8 activation quantizer sits after it.
Only Linears reading token sequences (input rank >= 3) are smoothed; on other models the stage
changes nothing.

The recipe stage is `transform.smoothquant` (alpha); it needs a quantize stage after it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch
from torch import nn

from contracts.errors import ConfigError
from contracts.progress import NULL_PROGRESS, Progress, track
from toolchain.hooks import run_with_hooks
from toolchain.registry import register
from toolchain.stages import TransformContext, TransformResult

__all__ = ["SmoothQuantConfig", "SmoothedLinear", "find_shared_input_groups", "smooth_model", "smoothquant"]

DEFAULT_ALPHA = 0.85  # all-MiniLM-L6-v2: the best mean cosine of int8 QDQ in a sweep over alpha


@dataclass(frozen=True)
class SmoothQuantConfig:
    """`alpha` in (0, 1] moves that much of each channel's range from activations to weights."""

    alpha: float = DEFAULT_ALPHA
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "transform"
    requires_calibration: ClassVar[bool] = True
    requires_quantization: ClassVar[bool] = True  # only useful ahead of int8: a recipe checks it

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"smoothquant alpha must be in (0, 1], got {self.alpha!r} "
                              "(to disable smoothing, leave the stage out)")


class SmoothedLinear(nn.Module):
    """linear(x * inv_scale), with the linear's weight columns already multiplied by scale."""

    def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


@torch.no_grad()
def find_shared_input_groups(model: nn.Module, batch, run: Callable) -> list[list[str]]:
    """Groups of Linear layers that read the very same (rank >= 3) input tensor."""
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}  # inputs kept alive: ids of freed tensors get reused

    def record(name: str, x: torch.Tensor) -> None:
        if x.dim() < 3:
            return
        entry = seen.get(id(x))
        if entry is not None and entry[0] is x:
            entry[1].append(name)
        else:
            seen[id(x)] = (x, [name])

    handles = [mod.register_forward_pre_hook(lambda m, a, n=name: record(n, a[0]))
               for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    run_with_hooks(model, handles, [batch], run)
    groups = [sorted(set(names)) for _, names in seen.values()]
    seen.clear()
    return groups


@torch.no_grad()
def smooth_model(model: nn.Module, batches: Iterable, run: Callable, alpha: float = 0.5,
                 progress: Progress = NULL_PROGRESS) -> list[dict]:
    """Smooth every shared-input group in place (Linears become SmoothedLinear); returns a summary."""
    batches = list(batches)
    if not batches or not any(isinstance(m, nn.Linear) for m in model.modules()):
        return []
    groups = find_shared_input_groups(model, batches[0], run)
    if not groups:  # e.g. a CNN's classifier reads a pooled (rank-2) vector: nothing to smooth
        return []
    modules = dict(model.named_modules())
    act_max: dict[str, torch.Tensor] = {}

    def observe(key: str, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)
        act_max[key] = m if key not in act_max else torch.maximum(act_max[key], m)

    handles = [modules[g[0]].register_forward_pre_hook(lambda m, a, k=g[0]: observe(k, a[0])) for g in groups]
    run_with_hooks(model, handles, track(progress, batches, "SmoothQuant statistics", "batches"), run)
    summary = []
    for group in groups:
        a = act_max[group[0]].clamp(min=1e-5)
        w = torch.stack([modules[n].weight.abs().amax(dim=0) for n in group]).amax(dim=0).clamp(min=1e-5)
        s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
        for name in group:
            linear = modules[name]
            linear.weight.mul_(s)
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, SmoothedLinear(linear, (1.0 / s).to(linear.weight.dtype)))
        summary.append({"linears": group, "max_scale": float(s.max()), "min_scale": float(s.min())})
    return summary


@register("transform", "smoothquant", SmoothQuantConfig,
          "SmoothQuant: per-channel scales move activation outliers of token-sequence Linears into weights")
def smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: TransformContext) -> TransformResult:
    groups = smooth_model(model, ctx.calib_batches, ctx.run, config.alpha, ctx.progress)
    return TransformResult(model, {"groups": len(groups), "layers": sum(len(g["linears"]) for g in groups)})
