"""`prune.pqi`: iterative SAP pruning driven by the PQ Index (toolchain/pruning/pqi.py), with
distillation between rounds (Diao et al., ICLR 2023: prune, retrain, repeat).

Each round: measure the PQI of every scope's unmasked weights, prune that scope's SAP count,
then fine-tune from the dense model for `recover_steps` steps with the masks held (the pipeline's
recovery, toolchain/recover_step.py). The loop ends after `rounds` rounds, when the overall
sparsity reaches `target_sparsity`, or when the metric after recovery falls more than `max_drop`
below the dense model's (that round is then undone: its weights and masks are restored). The
per-round trace (PQI per scope, sparsity, metric) goes into report.json `pqi` and a plot.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning.masks import apply_masks
from sqexport.toolchain.pruning.pqi import SCOPES, SapParams, sap_round
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import PruneContext, PruneResult

__all__ = ["PqiPruneConfig", "prune_pqi"]

SPEED_NOTE = ("PQI/SAP zeros are unstructured: they shrink the compressed download; onnxruntime's CPU "
              "kernels do not skip them, so they add no speed")


@dataclass(frozen=True)
class PqiPruneConfig:
    """`p`, `q` (0 < p < q), `eta_r` (>= 0), `gamma` (> 0), `beta` (in (0, 1)): SAP's parameters,
    the paper's defaults; larger gamma, eta_r > 0 or p close to q prune more per round. `scope`:
    global (default, one index over every prunable weight), layer or neuron (per output row).
    `rounds`: the most prune-recover rounds (T). `recover_steps`: distillation steps after each
    round (0 = none; needs calibration data). `target_sparsity`: stop once the overall sparsity
    reaches it (the last round is capped to land on it). `max_drop`: accuracy floor in the
    metric's unit (points for top-1), read from the recovery's metric on the first 2000 eval
    samples: a round that falls below dense - max_drop is undone and the loop stops. Off by
    default, because choosing a model by the eval split's labels makes the final drop optimistic."""

    p: float = 0.5
    q: float = 1.0
    eta_r: float = 0.0
    gamma: float = 1.0
    beta: float = 0.9
    scope: str = "global"
    rounds: int = 5
    recover_steps: int = 60
    target_sparsity: float | None = None
    max_drop: float | None = None
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "prune"
    default_recovery_steps: ClassVar[int | None] = None  # recovers between its own rounds (fine_tune)
    requires_calibration: ClassVar[bool] = False  # recovery between rounds uses it when there is some

    def __post_init__(self):
        if not 0.0 < self.p < self.q:
            raise ConfigError(f"pqi needs 0 < p < q, got p={self.p}, q={self.q}")
        if self.eta_r < 0 or not self.gamma > 0 or not 0.0 < self.beta < 1.0:
            raise ConfigError(f"pqi needs eta_r >= 0, gamma > 0 and 0 < beta < 1, got eta_r={self.eta_r}, "
                              f"gamma={self.gamma}, beta={self.beta}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got '{self.scope}'")
        if self.rounds < 1 or self.recover_steps < 0:
            raise ConfigError(f"pqi needs rounds >= 1 and recover_steps >= 0, got {self.rounds}, {self.recover_steps}")
        if self.target_sparsity is not None and not 0.0 < self.target_sparsity < 1.0:
            raise ConfigError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ConfigError(f"max_drop must be >= 0, got {self.max_drop}")

    @property
    def sap(self) -> SapParams:
        return SapParams(self.p, self.q, self.eta_r, self.gamma, self.beta)


def _sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def _limit(config: PqiPruneConfig, masks: dict[str, torch.Tensor]) -> int | None:
    if config.target_sparsity is None:
        return None
    total = sum(m.numel() for m in masks.values())
    return max(0, int(round(config.target_sparsity * total)) - sum(int((~m).sum()) for m in masks.values()))


def _index_summary(stats: list[dict], weights: dict[str, torch.Tensor], scope: str) -> dict:
    """The round's PQI: one value (global), one per layer, or per layer the mean over its rows (neuron)."""
    if scope == "global":
        return {"global": round(stats[0]["index"], 6)}
    if scope == "layer":
        return {n: round(s["index"], 6) for n, s in zip(weights, stats)}
    out, start = {}, 0
    for name, w in weights.items():
        rows = stats[start:start + w.shape[0]]
        out[name] = round(sum(s["index"] for s in rows) / len(rows), 6)
        start += w.shape[0]
    return out


def _round(model: nn.Module, config: PqiPruneConfig, ctx: PruneContext, masks: dict, i: int) -> tuple[dict, dict]:
    weights = {n: m.weight.detach() for n, m in ctx.layers.items()}
    masks, stats = sap_round(weights, masks, config.scope, config.sap, _limit(config, masks))
    apply_masks(ctx.layers, masks)
    entry = {"round": i + 1, "pqi": _index_summary(stats, weights, config.scope),
             "pruned": sum(s["prune"] for s in stats), "sparsity": round(_sparsity(masks), 6)}
    if ctx.fine_tune is not None and config.recover_steps > 0:
        info = ctx.fine_tune(model, masks, config.recover_steps, i)
        entry.update(metric_before=info["metric_before"], metric_after=info["metric_after"], steps=info["steps"],
                     metric=info["metric"], unit=info["unit"], metric_dense=info.get("metric_dense"))
    return masks, entry


@register("prune", "pqi", PqiPruneConfig,
          "PQ Index + SAP: adaptive unstructured pruning, prune-recover rounds; zeros = size, not CPU speed")
def prune_pqi(model: nn.Module, config: PqiPruneConfig, ctx: PruneContext) -> PruneResult:
    masks = {n: m.weight.detach() != 0 for n, m in ctx.layers.items()}  # earlier zeros stay masked
    trace, stopped = [], "rounds"
    for i in range(config.rounds):
        # only an accuracy floor can undo a round, so only then is the state worth a copy
        saved = (copy.deepcopy(model.state_dict()), masks) if config.max_drop is not None else None
        masks, entry = _round(model, config, ctx, masks, i)
        trace.append(entry)
        dense = entry.get("metric_dense")
        if config.max_drop is not None and dense is not None and entry["metric_after"] < dense - config.max_drop:
            model.load_state_dict(saved[0])  # undo the round that broke the floor
            masks = saved[1]
            entry["undone"] = True
            stopped = "max_drop"
            break
        if entry["pruned"] == 0:
            stopped = "converged"  # SAP found nothing more to prune
            break
        if config.target_sparsity is not None and entry["sparsity"] >= config.target_sparsity - 1e-9:
            stopped = "target_sparsity"
            break
    section = {"scope": config.scope, "p": config.p, "q": config.q, "stopped": stopped,
               "sparsity": round(_sparsity(masks), 6), "trace": trace}
    return PruneResult(masks=masks, speed_note=SPEED_NOTE, extra={"pqi": section})
