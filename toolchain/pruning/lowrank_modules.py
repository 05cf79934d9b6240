"""Factored layers as plain torch modules, so BatchNorm folding, int8 quantization and both
exporters (torch.onnx, optimum) see ordinary nn.Linear / nn.Conv2d and export ordinary, smaller
MatMul / Gemm / Conv nodes.

A factored layer at `name` becomes nn.Sequential(first, second): `first` is new, `second` is the
original module object with its weight (and shape attributes) replaced, so references to the old
module (the pipeline's layer table) see the smaller weight, and its bias stays where it was.
"""
from __future__ import annotations

import torch
from torch import nn

from sqexport.toolchain.pruning.lowrank_math import Block

__all__ = ["factored_linear", "separable_conv", "channel_conv", "HMatrixLinear", "replace_module"]


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=False)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def factored_linear(linear: nn.Linear, b: torch.Tensor, a: torch.Tensor) -> nn.Sequential:
    """x -> (x A^T) B^T + bias: Linear(in, r, no bias), then the original Linear reshaped to (out, r)."""
    r = a.shape[0]
    first = nn.Linear(linear.in_features, r, bias=False)
    first.weight = _param(a)
    linear.weight = _param(b)
    linear.in_features = r
    return nn.Sequential(first, linear)


@torch.no_grad()
def separable_conv(conv: nn.Conv2d, vertical: torch.Tensor, horizontal: torch.Tensor) -> nn.Sequential:
    """kh x 1 conv C_in -> R (vertical stride, padding, dilation), then the original conv as a
    1 x kw conv R -> C_out (horizontal ones, and the bias). Zero padding splits exactly: the first
    conv's output at the horizontally padded positions would be zero anyway."""
    r = vertical.shape[0]
    first = nn.Conv2d(conv.in_channels, r, (conv.kernel_size[0], 1), stride=(conv.stride[0], 1),
                      padding=(conv.padding[0], 0), dilation=(conv.dilation[0], 1), bias=False)
    first.weight = _param(vertical)
    conv.weight = _param(horizontal)
    conv.in_channels, conv.kernel_size = r, (1, conv.kernel_size[1])
    conv.stride, conv.padding, conv.dilation = (1, conv.stride[1]), (0, conv.padding[1]), (1, conv.dilation[1])
    return nn.Sequential(first, conv)


@torch.no_grad()
def channel_conv(conv: nn.Conv1d | nn.Conv2d, b: torch.Tensor, a: torch.Tensor) -> nn.Sequential:
    """SVD of W viewed as C_out x (C_in * kernel): the full kernel C_in -> r (with the original
    stride, padding, dilation), then the original conv as a 1 x 1 conv r -> C_out with the bias.
    Used for 1 x 1 kernels and Conv1d, where a separable split has nothing to separate."""
    r = a.shape[0]
    cls = type(conv)
    first = cls(conv.in_channels, r, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, bias=False)
    first.weight = _param(a.reshape(r, *conv.weight.shape[1:]))
    ones = (1,) * len(conv.kernel_size)
    conv.weight = _param(b.reshape(conv.out_channels, r, *ones))
    conv.in_channels, conv.kernel_size = r, ones
    conv.stride, conv.padding, conv.dilation = ones, (0,) * len(ones), ones
    return nn.Sequential(first, conv)


class HMatrixLinear(nn.Module):
    """y = x W^T + bias with W given by H-matrix leaves. Each leaf is plain Linears reading a
    column slice of x (low rank: Linear(cols, k) then Linear(k, rows); dense: Linear(cols, rows)).
    The output is the concatenation, over the finest row segments, of the sum of the leaf outputs
    covering that segment: Slice, MatMul, Add and Concat in ONNX, nothing else."""

    def __init__(self, blocks: list[Block], out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spans = [(b.r0, b.r1, b.c0, b.c1) for b in blocks]
        leaves = []
        for b in blocks:
            if b.dense is not None:
                leaf = nn.Linear(b.c1 - b.c0, b.r1 - b.r0, bias=False)
                leaf.weight = _param(b.dense)
                leaves.append(leaf)
            else:
                first = nn.Linear(b.c1 - b.c0, b.a.shape[0], bias=False)
                second = nn.Linear(b.a.shape[0], b.r1 - b.r0, bias=False)
                first.weight, second.weight = _param(b.a), _param(b.b)
                leaves.append(nn.Sequential(first, second))
        self.leaves = nn.ModuleList(leaves)
        self.bias = None if bias is None else _param(bias)
        cuts = sorted({b.r0 for b in blocks} | {b.r1 for b in blocks})
        self.segments = list(zip(cuts[:-1], cuts[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [leaf(x[..., c0:c1]) for leaf, (_, _, c0, c1) in zip(self.leaves, self.spans)]
        parts = []
        for s0, s1 in self.segments:
            terms = [out[..., s0 - r0:s1 - r0] if (r0, r1) != (s0, s1) else out
                     for out, (r0, r1, _, _) in zip(outs, self.spans) if r0 <= s0 and s1 <= r1]
            total = terms[0]
            for t in terms[1:]:
                total = total + t
            parts.append(total)
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return y + self.bias if self.bias is not None else y
