"""Fold BatchNorm into the preceding conv/linear before quantization, so int8 weight scales are
computed on the weights the runtime actually multiplies with."""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["fold_batchnorm", "copy_for_compression"]


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """Return (model with conv+BN fused, number of BN layers folded). Per-channel rescaling keeps
    pruned zeros exactly zero. Models that torch.fx cannot trace are returned unchanged."""
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if n_bn == 0:
        return model, 0
    from torch.fx.experimental.optimization import fuse

    try:  # a GraphModule as it is: tracing it again would inline the modules it calls by design
        # (models.graph_module's activations, sums and concatenations)
        fused = fuse(model.eval(), inplace=False, no_trace=isinstance(model, torch.fx.GraphModule))
    except Exception:  # not traceable: keep BN, quantization still works on the unfused conv
        return model, 0
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused.eval(), n_bn - left


def copy_for_compression(model: nn.Module) -> nn.Module:
    """An eval-mode copy without gradients: the user's model is never modified."""
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work

