"""Run a model over batches with temporary forward hooks (calibration, smoothing, SNR)."""
from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["run_with_hooks"]


@torch.no_grad()
def run_with_hooks(model: torch.nn.Module, handles: list, batches: Iterable, run: Callable) -> None:
    """`run(model, batch)` for every batch; the hook handles are removed whatever happens."""
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
