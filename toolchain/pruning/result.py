from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["PruneResult"]


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]
    speed_note: str
    extra: dict = field(default_factory=dict)  # sections added to report.json
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why the method could not prune it
