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

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.progress import NULL_PROGRESS, Progress, track
from sqexport.contracts.quant import ObservedRanges
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import TransformContext, TransformResult

__all__ = ["SmoothQuantConfig", "SmoothedLinear", "find_shared_input_groups", "smooth_model", "smoothquant",
           "public_name"]

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


class _LinearStatistics:
    """What one FP32 pass over the calibration data records at every Linear: per input channel
    min and max of each shared-input group's input (max |X_j| = max(max X_j, -min X_j) exactly, for
    the smoothing scales), the plain min/max of every other Linear's input, and every Linear's
    output min/max: with the scales, the min-max calibration ranges of the smoothed model follow
    (ranges_after), so int8 calibration needs no pass of its own."""

    def __init__(self, modules: dict, groups: list[list[str]]):
        self.leaders = {g[0] for g in groups}
        self.grouped = {n for g in groups for n in g}
        self.channel_min: dict[str, torch.Tensor] = {}
        self.channel_max: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, tuple[float, float]] = {}
        self.outputs: dict[str, tuple[float, float]] = {}
        self.samples = 0
        self.handles = []
        for name, mod in modules.items():
            if not isinstance(mod, nn.Linear):
                continue
            if name in self.leaders or name not in self.grouped:
                self.handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: self._input(n, a[0])))
            self.handles.append(mod.register_forward_hook(lambda m, a, out, n=name: self._output(n, out)))

    @staticmethod
    def _merge(store: dict, key: str, lo: float, hi: float) -> None:
        old = store.get(key)
        store[key] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))

    def _input(self, name: str, x: torch.Tensor) -> None:
        x = x.detach()
        if name in self.leaders:
            rows = x.reshape(-1, x.shape[-1])
            lo, hi = rows.amin(dim=0), rows.amax(dim=0)
            if name in self.channel_min:
                lo, hi = torch.minimum(self.channel_min[name], lo), torch.maximum(self.channel_max[name], hi)
            self.channel_min[name], self.channel_max[name] = lo, hi
        elif x.numel():
            self._merge(self.inputs, name, float(x.min()), float(x.max()))

    def _output(self, name: str, out: torch.Tensor) -> None:
        if out.numel():
            self._merge(self.outputs, name, float(out.detach().min()), float(out.detach().max()))

    def abs_max(self, leader: str) -> torch.Tensor:
        return torch.maximum(-self.channel_min[leader], self.channel_max[leader])

    def ranges_after(self, groups: list[list[str]], inv_scales: list[torch.Tensor]) -> ObservedRanges:
        """Ranges keyed by the smoothed model's names (a smoothed Linear lives at `<name>.linear`).
        Its input is x_j * inv_s_j with inv_s_j > 0, and rounding is monotonic, so the min over
        tokens of the float32 products is the product of the per-channel min: exactly what a pass
        over the smoothed model observes at the first smoothed layers; deeper layers see the same
        function up to float32 rounding (smoothing is exact in real arithmetic)."""
        ranges = ObservedRanges(inputs=dict(self.inputs), samples=self.samples, source="transform.smoothquant")
        for group, inv in zip(groups, inv_scales):
            lo = float((self.channel_min[group[0]] * inv).min())
            hi = float((self.channel_max[group[0]] * inv).max())
            for name in group:
                ranges.inputs[f"{name}.linear"] = (lo, hi)
        for name, bounds in self.outputs.items():
            ranges.outputs[f"{name}.linear" if name in self.grouped else name] = bounds
        return ranges


@torch.no_grad()
def smooth_model(model: nn.Module, batches: Iterable, run: Callable, alpha: float = 0.5,
                 progress: Progress = NULL_PROGRESS, ranges: ObservedRanges | None = None) -> list[dict]:
    """Smooth every shared-input group in place (Linears become SmoothedLinear); returns a summary.
    `ranges` (optional) is filled with the min-max ranges of the smoothed model's Linears on
    `batches` (_LinearStatistics), observed in the same pass; left empty when nothing is smoothed."""
    batches = list(batches)
    if not batches or not any(isinstance(m, nn.Linear) for m in model.modules()):
        return []
    groups = find_shared_input_groups(model, batches[0], run)
    if not groups:  # e.g. a CNN's classifier reads a pooled (rank-2) vector: nothing to smooth
        return []
    modules = dict(model.named_modules())
    stats = _LinearStatistics(modules, groups)
    stats.samples = sum(len(next(iter(b.values()))) for b in batches)
    run_with_hooks(model, stats.handles, track(progress, batches, "SmoothQuant statistics", "batches"), run)
    summary, inv_scales = [], []
    for group in groups:
        a = stats.abs_max(group[0]).clamp(min=1e-5)
        w = torch.stack([modules[n].weight.abs().amax(dim=0) for n in group]).amax(dim=0).clamp(min=1e-5)
        s = (a.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)
        inv = (1.0 / s).to(modules[group[0]].weight.dtype)
        inv_scales.append(inv)
        for name in group:
            linear = modules[name]
            linear.weight.mul_(s)
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, SmoothedLinear(linear, inv))
        summary.append({"linears": group, "max_scale": float(s.max()), "min_scale": float(s.min())})
    if ranges is not None:
        observed = stats.ranges_after(groups, inv_scales)
        ranges.inputs, ranges.outputs = observed.inputs, observed.outputs
        ranges.samples, ranges.source = observed.samples, observed.source
    return summary


@register("transform", "smoothquant", SmoothQuantConfig,
          "SmoothQuant: per-channel scales move activation outliers of token-sequence Linears into weights")
def smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: TransformContext) -> TransformResult:
    ranges = ObservedRanges()
    groups = smooth_model(model, ctx.calib_batches, ctx.run, config.alpha, ctx.progress, ranges)
    return TransformResult(model, {"groups": len(groups), "layers": sum(len(g["linears"]) for g in groups)},
                           ranges if groups else None)


def public_name(work: torch.nn.Module) -> Callable[[str], str]:
    """Report layers by their model names: a smoothed Linear lives at `<name>.linear`."""
    modules = dict(work.named_modules())

    def name_of(module: str) -> str:
        parent = module.rpartition(".")[0]
        return parent if isinstance(modules.get(parent), SmoothedLinear) else module
    return name_of
