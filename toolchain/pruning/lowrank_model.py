"""Does factoring pay *in the model*? Timing each layer alone (lowrank_latency.py) misses what the
whole int8 graph does: onnxruntime fuses Q/DQ pairs into QLinearConv / QLinearAdd, runs convs in
NHWC with the transposes hoisted out, and picks a kernel per node from its channel counts. On
mnist-resnet every layer timed faster alone while the whole factored model was 0.84x int8 alone.

So, for models the spec's exporter can export (single-input models):
- `model_int8_graph`: the whole model as the pipeline will ship it (BatchNorm folded, int8 QDQ
  weights and activations, residual adds quantized), from a deep copy.
- `layer_times`: each layer's cost read *in context* from onnxruntime's per-node profile of such
  graphs (runtime_check/node_timing.py, which also holds the whole-model A/B `time_pair` and
  `revert_until_faster`): the dense layer's QLinearConv vs the sum of its factors' nodes,
  profiled at the same moments.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import onnx
from torch import nn

from sqexport.contracts.weight_grid import WeightGrid
from sqexport.exporters.graph import merge_duplicate_nodes
from sqexport.exporters.qdq import anchors_for, find_sites, insert_qdq
from sqexport.runtime_check.node_timing import node_time
from sqexport.toolchain.folding import fold_batchnorm
from sqexport.toolchain.pruning.masks import prunable_layers
from sqexport.toolchain.quantization.static import calibrate, quantize_weights

__all__ = ["model_int8_graph", "layer_times"]


def model_int8_graph(model: nn.Module, export: Callable, batches: list[dict], run: Callable, path: Path,
                     qmax: int | WeightGrid) -> dict[str, str]:
    """Write the int8 QDQ graph of a copy of `model` to `path`; return torch module -> ONNX node
    (the node consuming its weight: the QLinearConv / QGemm onnxruntime fuses it into). The same
    placement as the pipeline's quantize step (toolchain/quantize_step.plan_quantization, which
    this module cannot import: it imports the pruning package): weights and inputs of every
    Conv/Linear, rectified or linear outputs, and a skip path's sum where a conv reads it (so the
    residual Adds become QLinearAdd). Ranges come from `batches`; they shape no kernel choice."""
    work, _ = fold_batchnorm(copy.deepcopy(model).eval())
    prepared = export(work, path)
    merge_duplicate_nodes(prepared)
    sites = find_sites(prepared, {n: m.weight.detach().numpy() for n, m in prunable_layers(work).items()})
    anchors = anchors_for(sites)
    ins, outs, _ = calibrate(work, anchors, batches, run)
    params = quantize_weights(work, anchors, ins, qmax)
    params.outputs = outs
    onnx.save(insert_qdq(prepared, sites, params, inplace=True), str(path))
    return {name: site.node for name, site in sites.items()}


def layer_times(site_nodes: dict[str, str], times: dict[str, float], names: list[str]) -> dict[str, float | None]:
    """Microseconds of each named layer: its own node, or the sum of its factors' nodes (modules
    under `name.`); None when a node cannot be found in the profile (then it is not judged here)."""
    out = {}
    for name in names:
        nodes = [node for module, node in site_nodes.items() if module == name or module.startswith(name + ".")]
        found = [node_time(n, times) for n in nodes]
        out[name] = float(sum(found)) if nodes and None not in found else None
    return out
