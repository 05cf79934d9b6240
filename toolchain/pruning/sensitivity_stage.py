"""`prune.sensitivity`: data-informed pruning with provable error bounds, structured (PFP, the
default: whole channels, so the exported model is faster) or unstructured (SiPP: zeros, size
only). See toolchain/pruning/sensitivity.py for the sensitivities and the shared error level,
pfp.py and sipp.py for the two methods."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning import structured as S
from sqexport.toolchain.pruning.masks import PRUNABLE_TYPES
from sqexport.toolchain.pruning.pfp import pfp_prune
from sqexport.toolchain.pruning.sipp import sipp_prune
from sqexport.toolchain.pruning.structured_stage import structure_of
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import PruneContext, PruneResult

__all__ = ["SensitivityPruneConfig", "prune_sensitivity", "SENSITIVITY_VARIANTS"]

SENSITIVITY_VARIANTS = ("pfp", "sipp-deterministic", "sipp-sampling", "sipp-hybrid")
PFP_NOTE = ("PFP removes whole channels: the exported model is smaller and does less work, which is real "
            "CPU speed")
SIPP_NOTE = ("SiPP zeros are unstructured: they shrink the compressed download; onnxruntime's CPU kernels "
             "do not skip them, so they add no speed")


@dataclass(frozen=True)
class SensitivityPruneConfig:
    """`sparsity`: fraction of the prunable conv/linear weights removed (the global budget the
    shared error level is bisected to meet). `variant`: `pfp` (default; filters/channels, real
    speed), `sipp-deterministic`, `sipp-sampling` (seeded by the run's seed) or `sipp-hybrid`
    (per neuron, the smaller error bound). `round_to`: PFP's kept widths are multiples of it, as
    for `--prune structured`. `recover_steps`: distillation from the dense model right after
    pruning (masks held), as the papers retrain; 0 = none (a recipe's recover stage can add more).
    The defaults keep digits-cnn and mnist-resnet within 1 point at 50%
    (benchmarks/results/pqi-sensitivity.md)."""

    sparsity: float = 0.5
    variant: str = "pfp"
    round_to: int = 8
    recover_steps: int = 200
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "prune"
    default_recovery_steps: ClassVar[int | None] = None  # fine-tunes inside the method (ctx.fine_tune)
    requires_calibration: ClassVar[bool] = True  # sensitivities are measured on real inputs

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.variant not in SENSITIVITY_VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(SENSITIVITY_VARIANTS)}, got '{self.variant}'")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")
        if self.recover_steps < 0:
            raise ConfigError(f"recover_steps must be >= 0, got {self.recover_steps}")


def _shapes(model: nn.Module) -> dict[str, tuple]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES)}


def _pfp(model: nn.Module, config: SensitivityPruneConfig, ctx: PruneContext) -> PruneResult:
    before, counts0 = _shapes(model), S.count_macs_params(model, ctx.example_inputs)
    details = pfp_prune(model, config.sparsity, config.round_to, ctx.calib_batches, ctx.run, ctx.example_inputs,
                        ctx.layers)
    counts1 = S.count_macs_params(model, ctx.example_inputs)
    removed = {"channels": details.pop("channels"), "groups": details.pop("groups")}
    structure = structure_of(before, _shapes(model), (counts0[0], counts1[0]), (counts0[1], counts1[1]), removed)
    return PruneResult(masks={}, speed_note=PFP_NOTE, extra={"structure": structure, "sensitivity": details})


@register("prune", "sensitivity", SensitivityPruneConfig,
          "data-informed sensitivity: PFP channels (default; real CPU speed) or SiPP zeros (size only)")
def prune_sensitivity(model: nn.Module, config: SensitivityPruneConfig, ctx: PruneContext) -> PruneResult:
    if not ctx.calib_batches or ctx.run is None:
        raise ConfigError("prune.sensitivity measures sensitivities on calibration data; none was given")
    if config.variant == "pfp":
        result = _pfp(model, config, ctx)
    else:
        masks, details, skipped = sipp_prune(model, config.sparsity, config.variant.split("-", 1)[1], ctx.seed,
                                             ctx.calib_batches, ctx.run, ctx.layers)
        result = PruneResult(masks=masks, speed_note=SIPP_NOTE, extra={"sensitivity": details}, skipped=skipped)
    if config.recover_steps and ctx.fine_tune is not None:
        info = ctx.fine_tune(model, result.masks, config.recover_steps, 0)
        result.extra["sensitivity"]["recovery"] = {k: info[k] for k in ("steps", "seconds", "metric", "unit",
                                                                       "metric_before", "metric_after", "metric_dense")}
    return result
