"""`prune.structured`: remove whole channels (CNNs) or attention heads and FFN neurons
(transformers) so the exported model is physically smaller and faster in onnxruntime."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning import structured as S
from sqexport.toolchain.pruning.masks import PRUNABLE_TYPES
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import PruneContext, PruneResult

__all__ = ["StructuredPruneConfig", "prune_structured", "structure_of", "IMPORTANCES"]

IMPORTANCES = ("auto",) + S.IMPORTANCES + ("reconstruction",)


@dataclass(frozen=True)
class StructuredPruneConfig:
    """`sparsity`: fraction of prunable structure removed (channels; for transformers the same
    fraction of attention heads and of FFN neurons). `importance`: `auto` (default: `reconstruction`
    for transformers, `activation` for CNNs), `activation` (data-informed), `magnitude`, or
    `reconstruction` (transformers: the error the least-squares refit cannot take back, see
    transformer_structured.py). `allocation`: `global` (rank all channels together), `latency`
    (importance per unit of onnxruntime time, measured on the target) or `uniform`. `round_to`:
    kept widths are multiples of it (CNN channels, FFN neurons). `repair`: least-squares refit of
    the layer reading the removed units, with bias compensation (transformers; see
    transformer_structured.py)."""

    sparsity: float = 0.5
    importance: str = "auto"
    allocation: str = "global"
    round_to: int = 8
    repair: bool = True
    VERSION: ClassVar[int] = 2  # 2: importance `auto` (reconstruction for transformers)
    kind: ClassVar[str] = "prune"
    # without --sparsity the run chooses the amount within the accuracy budget (sparsity_search.py)
    auto_sparsity: ClassVar[bool] = True
    requires_calibration: ClassVar[bool] = True  # activation importance reads calibration data
    default_recovery_steps: ClassVar[int | None] = None  # no recovery unless asked (--recover)

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)}, got '{self.importance}'")
        if self.allocation not in S.ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(S.ALLOCATIONS)}, got '{self.allocation}'")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")


def _is_transformer(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "num_attention_heads") and hasattr(config, "intermediate_size")


def _layer_shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES)}


def structure_of(before: dict, after: dict, macs: tuple, params: tuple, removed: dict) -> dict:
    """The report's `structure` section."""
    layers = {n: {"before": list(before[n]), "after": list(after[n])} for n in before
              if n in after and before[n] != after[n]}
    return {"removed": removed, "layers": layers,
            "params": {"before": params[0], "after": params[1], "ratio": params[1] / max(1, params[0])},
            "macs": {"before": macs[0], "after": macs[1], "ratio": macs[1] / max(1, macs[0])}}


def _prune_cnn(model: nn.Module, config: StructuredPruneConfig, ctx: PruneContext) -> dict:
    graph, groups = S.channel_groups(model, ctx.example_inputs)
    if not groups:
        raise ConfigError("structured pruning found no prunable channel groups in this model")
    act = None
    if config.importance == "activation":
        consumers = [m for g in groups for m, _, _ in S._consumers(g.group)]
        act = S.activation_rms(model, ctx.calib_batches, ctx.run, consumers)
    S.group_importance(groups, config.importance, act)
    if config.allocation == "latency":
        from sqexport.toolchain.pruning.latency_table import measure_group_costs

        costs = measure_group_costs(model, ctx.example_inputs, len(groups), _half_pruner(ctx.example_inputs),
                                    ctx.export, ctx.threads)
        for g, c in zip(groups, costs):
            g.cost = c
    keep = S.allocate(groups, config.sparsity, config.allocation, config.round_to)
    removed = S.prune_groups(graph, groups, keep)
    return {"channels": {name: len(idx) for name, idx in removed.items()},
            "groups": {g.name: {"size": g.size, "kept": keep[i], **({"seconds_per_channel": g.cost}
                                                                   if config.allocation == "latency" else {})}
                       for i, g in enumerate(groups)}}


def _half_pruner(example: dict):
    def prune_half(variant: nn.Module, i: int) -> int:
        graph, groups = S.channel_groups(variant, example)
        g = groups[i]
        g.scores = torch.arange(g.size, dtype=torch.float32)  # which half does not matter for timing
        keep = {j: (gg.size if j != i else gg.size - gg.size // 2) for j, gg in enumerate(groups)}
        return len(S.prune_groups(graph, groups, keep).get(g.name, []))
    return prune_half


@register("prune", "structured", StructuredPruneConfig,
          "remove whole channels / attention heads / FFN neurons (physically smaller: real CPU speed)")
def prune_structured(model: nn.Module, config: StructuredPruneConfig, ctx: PruneContext) -> PruneResult:
    transformer = _is_transformer(model)
    importance = config.importance if config.importance != "auto" else \
        ("reconstruction" if transformer else "activation")
    if importance == "reconstruction" and not transformer:
        raise ConfigError("importance 'reconstruction' is for transformers (heads and FFN neurons); "
                          "use 'activation' or 'magnitude' for CNN channels")
    config = replace(config, importance=importance)
    before, macs0 = _layer_shapes(model), S.count_macs_params(model, ctx.example_inputs)
    if transformer:
        from sqexport.toolchain.pruning.transformer_structured import prune_transformer

        removed = prune_transformer(model, config, ctx)
    else:
        removed = _prune_cnn(model, config, ctx)
    removed["importance"] = importance
    macs1 = S.count_macs_params(model, ctx.example_inputs)
    after = _layer_shapes(model)
    structure = structure_of(before, after, (macs0[0], macs1[0]), (macs0[1], macs1[1]), removed)
    return PruneResult(masks={}, speed_note="structured pruning removes whole channels/heads/neurons: the "
                       "exported model is smaller and does less work, which is real CPU speed",
                       extra={"structure": structure}, changed=after != before)
