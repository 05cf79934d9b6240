"""Per-group latency table measured in onnxruntime: what one channel of each group costs.

For every channel group, a copy of the model with half of that group's channels removed is
exported and timed against the dense model, all interleaved in one run (so machine noise hits
every variant alike). cost per channel = (t_dense - t_half) / channels removed. The structured
pruner's `latency` allocation divides importance by this cost, so the cut goes where it buys time
on the target rather than where parameters or MACs are.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Callable

import torch

from sqexport.runtime_check.latency import measure_interleaved

__all__ = ["measure_group_costs"]

FLOOR_FRACTION = 0.02  # a group whose removal measures as free still costs a little: noise is not speed


def measure_group_costs(model: torch.nn.Module, example: dict, n_groups: int,
                        prune_half: Callable[[torch.nn.Module, int], int],
                        export: Callable[[torch.nn.Module, Path], None], threads: int,
                        budget_s: float = 6.0) -> list[float]:
    """Seconds saved per removed channel, one entry per group.

    `prune_half(model_copy, i)` removes half of group i from the copy and returns how many
    channels it removed; `export(model, path)` writes an ONNX file."""
    with tempfile.TemporaryDirectory(prefix="sqexport-latency-") as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx"}
        export(model, paths["dense"])
        removed = {}
        for i in range(n_groups):
            variant = copy.deepcopy(model)
            removed[i] = prune_half(variant, i)
            paths[i] = Path(tmp) / f"group{i}.onnx"
            export(variant, paths[i])
        times = measure_interleaved(paths, example, threads, warmup=3, max_iters=200, budget_s=budget_s)
    dense = times["dense"]["p50"] / 1000.0
    floor = FLOOR_FRACTION * dense / max(1, sum(removed.values()))
    return [max((dense - times[i]["p50"] / 1000.0) / max(1, removed[i]), floor) for i in range(n_groups)]
