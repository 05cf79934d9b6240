"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and
Bias Correction", ICCV 2019).

For two consecutive layers W1 -> act -> W2 where act is positively homogeneous (ReLU, identity;
ReLU6 with its clip adjusted), scaling output channel i of W1 (and its bias) by 1/s_i and input
channel i of W2 by s_i leaves the function unchanged. With r1_i = max|W1[i, ...]| and
r2_i = max|W2[:, i, ...]| (for a depthwise W2, max|W2[i, ...]|), s_i = sqrt(r1_i / r2_i) makes both
ranges sqrt(r1_i * r2_i): the per-tensor (or per-channel) int8 grid of each layer covers its
channels evenly. Pairs are found on the torch.fx graph (the BN-folded model is a GraphModule):
a Conv2d whose only user is an optional ReLU / ReLU6 whose only user is another Conv2d.

ReLU6 is clip(x, 0, 6): after scaling, channel i must clip at 6 / s_i. `relu6="exact"` puts a
per-channel clip module there (the FP32 function is preserved exactly; the graph then carries a
per-channel Min, which onnxruntime cannot fold into QLinearConv). `relu6="relu"` replaces the ReLU6
of an equalized pair with ReLU, as the paper and AIMET do: a small change of the FP32 function that
keeps the Conv+Relu pattern onnxruntime fuses. `relu6="skip"` leaves ReLU6 pairs alone.
Iterated a few times over all pairs, as the official implementation does, since a layer can sit
in two pairs (depthwise: input of one, output of the next).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import TransformContext, TransformResult

__all__ = ["ChannelClip", "EqualizeConfig", "EqualizedPair", "find_pairs", "equalize", "equalize_pair"]

RELU6_MODES = ("relu", "exact", "skip")

EPS = 1e-8


class ChannelClip(nn.Module):
    """clip(x, 0, upper[c]) per channel (ReLU6 after equalization, exactly)."""

    def __init__(self, upper: torch.Tensor):
        super().__init__()
        self.register_buffer("upper", upper.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.relu(x), self.upper)


@dataclass(frozen=True)
class EqualizedPair:
    first: str
    second: str
    activation: str | None  # module name of the ReLU / ReLU6 between them


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _usable(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and (conv.groups == 1 or _is_depthwise(conv))


def find_pairs(gm: fx.GraphModule, relu6: str = "relu") -> list[EqualizedPair]:
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _usable(modules[node.target]) or len(node.users) != 1:
            continue
        nxt, act = next(iter(node.users)), None
        if nxt.op == "call_module" and isinstance(modules[nxt.target], (nn.ReLU, nn.ReLU6)):
            if isinstance(modules[nxt.target], nn.ReLU6) and relu6 == "skip":
                continue
            act = nxt.target
            if len(nxt.users) != 1:
                continue
            nxt = next(iter(nxt.users))
        if nxt.op == "call_module" and _usable(modules[nxt.target]) and nxt.args[0] is (
                node if act is None else next(iter(node.users))):
            pairs.append(EqualizedPair(node.target, nxt.target, act))
    return pairs


def _in_ranges(conv: nn.Conv2d) -> torch.Tensor:
    w = conv.weight.detach()
    return w.abs().amax(dim=(1, 2, 3)) if _is_depthwise(conv) else w.abs().amax(dim=(0, 2, 3))


@torch.no_grad()
def equalize_pair(first: nn.Conv2d, second: nn.Conv2d) -> torch.Tensor:
    """Equalize in place; returns s (output channel i of `first` was divided by s_i)."""
    r1 = first.weight.abs().amax(dim=(1, 2, 3))
    r2 = _in_ranges(second)
    s = torch.where((r1 > EPS) & (r2 > EPS), torch.sqrt(r1 / r2.clamp_min(EPS)), torch.ones_like(r1))
    first.weight.div_(s.reshape(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.div_(s)
    if _is_depthwise(second):
        second.weight.mul_(s.reshape(-1, 1, 1, 1))
    else:
        second.weight.mul_(s.reshape(1, -1, 1, 1))
    return s


def _set_module(gm: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


def equalize(model: nn.Module, relu6: str = "relu", iterations: int = 4) -> list[EqualizedPair]:
    """Equalize every pair found, in place (`model` must be a GraphModule or fx-traceable; else
    nothing changes). Returns the pairs."""
    gm = model if isinstance(model, fx.GraphModule) else None
    if gm is None:
        try:
            gm = fx.symbolic_trace(model)
        except Exception:  # not traceable: nothing to equalize safely
            return []
    pairs = find_pairs(gm, relu6)
    modules = dict(gm.named_modules())
    total = {p.first: torch.ones(modules[p.first].out_channels) for p in pairs}
    for _ in range(iterations):
        for p in pairs:
            total[p.first] *= equalize_pair(modules[p.first], modules[p.second])
    for p in pairs:
        act = modules.get(p.activation) if p.activation else None
        if isinstance(act, nn.ReLU6):
            # model-owned modules: the GraphModule and the traced model share them
            new = ChannelClip(6.0 / total[p.first]) if relu6 == "exact" else nn.ReLU()
            _set_module(model, p.activation, new)
            if gm is not model:
                _set_module(gm, p.activation, new)
    return pairs


@dataclass(frozen=True)
class EqualizeConfig:
    """`relu6`: what happens to a ReLU6 between an equalized pair (module docstring): "relu"
    (keeps onnxruntime's QLinearConv fusion), "exact" (per-channel clip) or "skip" the pair."""

    relu6: str = "relu"
    iterations: int = 4
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "transform"
    requires_calibration: ClassVar[bool] = False  # data-free: weights only
    requires_quantization: ClassVar[bool] = True  # only useful ahead of int8

    def __post_init__(self):
        if self.relu6 not in RELU6_MODES:
            raise ConfigError(f"equalize relu6 must be one of {', '.join(RELU6_MODES)}, got {self.relu6!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"equalize iterations must be a positive integer, got {self.iterations!r}")


@register("transform", "equalize", EqualizeConfig,
          "cross-layer equalization of conv -> ReLU(6) -> conv pairs (data-free, before int8 of CNNs)")
def equalize_transform(model: nn.Module, config: EqualizeConfig, ctx: TransformContext) -> TransformResult:
    pairs = equalize(model, config.relu6, config.iterations)
    return TransformResult(model, {"pairs": len(pairs)})
