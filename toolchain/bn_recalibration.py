"""Re-estimate BatchNorm running statistics after pruning.

Pruning shifts every channel's activation statistics, so the dense model's running mean/var no
longer normalize correctly; re-estimating them on calibration data (no gradient step, no labels)
recovers most of the loss for free (standard practice in pruning pipelines).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, run: Callable) -> int:
    """Reset and re-accumulate BN running stats (cumulative average) over `batches`; returns the
    number of BN layers updated. Only BN layers switch to train mode, so dropout stays off."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return len(bns)
