"""prepared.onnx derived from baseline.onnx where the recipe changes the model only by smoothing.

The pipeline exports the user's FP32 model (baseline.onnx) and, after the torch-side stages, the
compressed copy (prepared.onnx, where int8 gets written). When no stage prunes, recovers or
rewrites the model and every transform is SmoothQuant, the second graph is the first one with
one Mul per smoothed group and the smoothed weights (exporters/smoothed_graph.py): it is written
from the baseline graph, kept in memory for that, instead of exporting again.

The baseline's Linears are located on their weights when the baseline is exported, before any
stage runs: smoothing scales the weights in place (the very weights of the user's model when
the run may change it), and the smoothed weights divided by the scales are not the originals
bit for bit. The graph is kept without those weights; they come back from the model as it is
at export.model. Whatever does not match makes the pipeline export as before, and the report
says why.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx
from torch import nn

from sqexport.exporters.qdq import Site, find_sites
from sqexport.exporters.smoothed_graph import GraphMismatch, SmoothedGroup, with_weights, without_weights
from sqexport.exporters.weight_index import WeightIndex
from sqexport.toolchain.order import DEFAULT_ORDER
from sqexport.toolchain.quantization.smoothing import SmoothedLinear
from sqexport.toolchain.recipe import Recipe

__all__ = ["BaselineGraph", "GraphMismatch", "recipe_blocker", "keep_baseline", "smoothed_groups", "derive_prepared"]

DERIVABLE_TRANSFORMS = ("smoothquant",)


@dataclass
class BaselineGraph:
    """baseline.onnx as exported, with the Linears of the model it came from located by content;
    `model` lacks their weight initializers (exporters.smoothed_graph.without_weights)."""

    model: onnx.ModelProto
    sites: dict[str, Site]  # Linear name -> its MatMul/Gemm and weight initializer
    shapes: dict[str, tuple]  # weight initializer -> its shape in the graph
    linears: set[str]  # every Linear of the model (a stage that adds or removes one rules derivation out)
    twins: set[str]  # Linears whose weight equals another's: which initializer is whose is unknown


def recipe_blocker(recipe: Recipe) -> str | None:
    """Why the recipe changes the model in ways only an export shows, or None."""
    for stage in recipe.stages:
        if stage.kind in ("prune", "recover"):
            return f"{stage.qualified} changes the model: it is exported"
        if stage.kind == "transform" and stage.name not in DERIVABLE_TRANSFORMS:
            return f"{stage.qualified} is not derived from the baseline graph: the model is exported"
    if recipe.order != DEFAULT_ORDER:
        return f"order {recipe.order} quantizes the weights before pruning: the model is exported"
    return None


def _linear_weights(model: nn.Module) -> dict:
    return {name: m.weight.detach().numpy() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def keep_baseline(graph: onnx.ModelProto, model: nn.Module) -> BaselineGraph:
    """`graph` exported from `model`, before any stage changed the model; `graph` is taken apart
    (its weights are not kept). Raises GraphMismatch where a weight is not plain float32."""
    weights = _linear_weights(model)
    sites = find_sites(graph, weights)
    skeleton, shapes = without_weights(graph, sites)
    return BaselineGraph(skeleton, sites, shapes, set(weights), WeightIndex(weights).twins())


def _original_name(name: str, smoothed: dict) -> str:
    """A smoothed Linear lives at `<name>.linear`: the name it had before smoothing."""
    parent = name.rpartition(".")[0]
    return parent if parent in smoothed else name


def smoothed_groups(work: nn.Module) -> list[SmoothedGroup]:
    """The SmoothedLinears of `work`, grouped as smoothing built them: one scale tensor per group."""
    by_scale: dict[int, list[tuple[str, SmoothedLinear]]] = defaultdict(list)
    for name, module in work.named_modules():
        if isinstance(module, SmoothedLinear):
            by_scale[id(module.inv_scale)].append((name, module))
    return [SmoothedGroup(members[0][1].inv_scale.detach().numpy(), tuple(name for name, _ in members))
            for members in by_scale.values()]


def derive_prepared(baseline: BaselineGraph, work: nn.Module) -> tuple[onnx.ModelProto, int]:
    """(the FP32 graph of `work`, number of smoothed groups), rewriting `baseline.model` in place;
    raises GraphMismatch (with the reason) where the graph of `work` must come from an export."""
    smoothed = {n: m for n, m in work.named_modules() if isinstance(m, SmoothedLinear)}
    weights = {_original_name(n, smoothed): w for n, w in _linear_weights(work).items()}
    linears = set(weights)
    if linears != baseline.linears:
        changed = sorted(linears ^ baseline.linears)
        raise GraphMismatch(f"the model's Linears changed since the baseline export ({changed[0]})")
    groups = smoothed_groups(work)
    twins = sorted(baseline.twins & {n for g in groups for n in g.modules})
    if twins:
        raise GraphMismatch(f"smoothed Linear {twins[0]} has the same weight as another Linear: "
                            "its initializer in the baseline graph is ambiguous")
    with_weights(baseline.model, baseline.sites, baseline.shapes, weights, groups)
    return baseline.model, len(groups)
