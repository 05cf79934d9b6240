"""The plug-in contract: what a method of each stage kind receives, returns and declares.

A method is a frozen config dataclass plus a handler registered for it (toolchain.registry):

    @register("prune", "magnitude", MagnitudePruneConfig, "one-line summary")
    def prune_magnitude(model, config, ctx: PruneContext) -> PruneResult: ...

Every handler has the shape `handler(model, config, ctx)`; the context type depends on the kind
and sits next to its protocol below. The pipeline never probes a config's fields: what a method
needs is declared on its config class (StageConfig), and the pipeline reads only the declarations.

Stage kinds run in this order (a recipe is validated against it when it loads):
    prune      zero or remove weights of the working copy, in place          -> PruneResult
    recover    fine-tune the pruned copy (e.g. distillation from the dense)  -> dict (report "recovery")
    transform  function-preserving rewrites before export (e.g. SmoothQuant)  -> TransformResult
    quantize   int8 parameters computed in torch for the exported graph       -> QuantParams
Observers (kind "observer") are registered the same way but are not stages: a quantize method
uses them to turn observed activations into a range (toolchain.quantization.observers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.contracts.quant import Anchor, ObservedRanges, QuantParams
from sqexport.contracts.weight_grid import WeightGrid
from sqexport.runtime_check.isa import weight_grid

if TYPE_CHECKING:
    from sqexport.models.spec import ModelSpec

__all__ = [
    "STAGE_KINDS", "StageConfig", "Runner", "FineTune",
    "PruneContext", "PruneResult", "PruneMethod", "RecoverContext", "RecoverMethod",
    "TransformContext", "TransformResult", "TransformMethod",
    "QuantContext", "QuantizeMethod",
]

STAGE_KINDS = ("prune", "recover", "transform", "quantize")  # also the order stages run in

Runner = Callable[[nn.Module, dict], list[np.ndarray]]  # run(model, batch) -> outputs as numpy
# fine_tune(model, masks, steps, round) -> the recovery record (metric_before / metric_after, ...):
# distillation from the dense model for `steps` optimizer steps, masks (layer name -> 1 = kept)
# re-applied after each step; `round` varies the seed between calls of one run
FineTune = Callable[[nn.Module, dict, int, int], dict]


@runtime_checkable
class StageConfig(Protocol):
    """Declared on every method's config class (class attributes, never read from instances'
    fields): the stage kind, whether the method reads calibration data, the config's schema
    version (recipes and reports store it)."""

    kind: ClassVar[str]
    requires_calibration: ClassVar[bool]
    VERSION: ClassVar[int]


# ---- prune -------------------------------------------------------------------------------------

@dataclass
class PruneContext:
    """Unstructured methods read `layers`; structured ones change `model` itself and read the
    example inputs (dependency graph), the data, and `export` (latency-aware allocation)."""

    layers: dict[str, nn.Module]  # the prunable Conv/Linear layers of `model`, by qualified name
    calib_batches: list[dict] = field(default_factory=list)
    run: Runner | None = None
    progress: Progress = NULL_PROGRESS  # loops over batches report here (contracts.progress.track)
    example_inputs: dict = field(default_factory=dict)
    export: Callable[[nn.Module, Path], Any] | None = None  # the spec's exporter, for timing variants
    threads: int = 1
    fine_tune: FineTune | None = None  # iterative methods recover between rounds; None = not available
    seed: int = 0  # the run's seed, for methods that sample
    # () -> more unlabeled batches beyond calibration (the spec's recovery data), loaded on request:
    # statistics that need many tokens (the transformer refit's Gram matrices) read them too
    more_batches: Callable[[], list[dict]] | None = None


@dataclass
class PruneResult:
    masks: dict[str, torch.Tensor]  # 1 = kept; already applied to the weights
    speed_note: str  # what these zeros buy on the target (the report repeats it)
    extra: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why the method could not prune it (reported)
    # False: the method left the model exactly as it was (lowrank factored no layer); a recover
    # stage after it then has nothing to recover and is skipped
    changed: bool = True


class PruneMethod(Protocol):
    def __call__(self, model: nn.Module, config: Any, ctx: PruneContext) -> PruneResult: ...


# ---- recover -------------------------------------------------------------------------------------

@dataclass
class RecoverContext:
    spec: "ModelSpec"  # the dense model is the teacher; its data feed the student
    seed: int = 0
    progress: Progress = NULL_PROGRESS
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> 1 = kept; zeros stay zeros


class RecoverMethod(Protocol):
    """Fine-tunes `model` in place; returns the report's `recovery` section."""

    def __call__(self, model: nn.Module, config: Any, ctx: RecoverContext) -> dict: ...


# ---- transform ---------------------------------------------------------------------------------

@dataclass
class TransformContext:
    calib_batches: list[dict]
    run: Runner
    progress: Progress = NULL_PROGRESS


@dataclass
class TransformResult:
    """`model` is the transformed model (the same object when changed in place); `info` goes into
    the stage's record in the report; `ranges`: min-max activation ranges of the returned model on
    the calibration data, when the method observed them in its own pass (the pipeline hands them
    to the quantize stage, whose min-max calibration then runs no pass of its own)."""

    model: nn.Module
    info: dict = field(default_factory=dict)
    ranges: ObservedRanges | None = None


class TransformMethod(Protocol):
    def __call__(self, model: nn.Module, config: Any, ctx: TransformContext) -> TransformResult: ...


# ---- quantize ----------------------------------------------------------------------------------

@dataclass
class QuantContext:
    anchors: list[Anchor]  # where the exported graph can take int8 (exporters.qdq.find_sites)
    calib_batches: list[dict]
    run: Runner | None
    # the integers weights may take on the target's kernels, unless a config says otherwise
    weight_grid: WeightGrid = field(default_factory=weight_grid)
    progress: Progress = NULL_PROGRESS
    # weightless modules whose outputs get quantized as they are (residual adds, QuantPlan.tensor_sites)
    tensors: list[str] = field(default_factory=list)
    # min-max ranges a transform stage observed on the calibration data for this very model
    # (TransformResult.ranges); a min-max calibration that finds all it needs there runs no pass
    observed_ranges: ObservedRanges | None = None
    # how far a candidate's outputs land from FP32's on calibration data (quantize_step binds it with
    # the task's measure); a method choosing between settings reads it, None: nothing to score with
    output_error: Callable[[QuantParams], float] | None = None
    # what the method decided, for the report (e.g. int8's range choice)
    decisions: dict = field(default_factory=dict)


class QuantizeMethod(Protocol):
    """Returns the params of every anchor it quantizes (a subset of ctx.anchors). A config that
    declares `supports_fallback = True` also carries a `fallback: FallbackPolicy` field, and the
    pipeline may then return its worst layers to FP32 (toolchain.quantization.fallback)."""

    def __call__(self, model: nn.Module, config: Any, ctx: QuantContext) -> QuantParams: ...
