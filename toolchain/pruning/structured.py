"""Structured pruning of conv/linear channels: the model is physically slimmed, which is what
makes onnxruntime faster (unstructured zeros are not).

torch-pruning's DependencyGraph finds every tensor coupled to a channel (residual adds tie a whole
ResNet stage together, depthwise convs tie their input and output, BatchNorm follows its conv), so
one "group" is removed as a unit. What this module adds on top:

- importance per group channel: `activation` (default, data-informed) = sum over the layers that
  read the channel of RMS(input activation) x L2 norm of the weights reading it, i.e. the size of
  the channel's contribution to the next layer's output (the Wanda / FLAP criterion applied to
  whole channels); `magnitude` = L2 norm of every weight in the group (torch-pruning's group norm);
- allocation: `global` ranks channels of all groups together (scores normalized by their group's
  mean, so groups of different scale compare) and removes the lowest; `latency` divides each
  score by the time one channel of its group costs in onnxruntime (measured, see latency_table.py)
  so the cut goes where it buys time; `uniform` removes the same fraction from every group;
- kept widths rounded to a multiple of `round_to` (8: what int8/fp32 GEMM kernels block by).

`sparsity` is the fraction of prunable channels removed (the final classifier's outputs and the
model inputs are never prunable).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.hooks import run_with_hooks
from sqexport.toolchain.pruning.masks import CONV_TYPES, PRUNABLE_TYPES

__all__ = ["ChannelGroup", "channel_groups", "activation_rms", "group_importance", "allocate",
           "prune_groups", "count_macs_params", "IMPORTANCES", "ALLOCATIONS"]

IMPORTANCES = ("activation", "magnitude")
ALLOCATIONS = ("global", "latency", "uniform")
MIN_KEEP_FRACTION = 0.1  # never remove more than 90% of a group: a layer cut to nothing is a broken model


@dataclass
class ChannelGroup:
    """One set of coupled channels, rooted at `root` (a module whose output channels start it)."""

    name: str
    root: nn.Module
    group: object  # torch_pruning Group (full index range)
    size: int
    scores: torch.Tensor | None = None  # per root channel, higher = keep
    cost: float = 1.0  # per channel: seconds (latency allocation) or 1


def _tp():
    import torch_pruning as tp  # heavy import, only when structured pruning runs

    return tp


def _as_tensors(example: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in example.items()}


def _output_layers(model: nn.Module, example: dict) -> list[nn.Module]:
    """Layers whose outputs are the model's outputs (a classifier head): the last conv/linear that
    runs, and any whose output tensor is returned as is. Their output channels are never pruned."""
    order, outputs = [], {}

    def hook(mod, _inp, out):
        order.append(mod)
        outputs[id(out)] = mod

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    try:
        with torch.no_grad():
            out = model(**example)
    finally:
        for h in handles:
            h.remove()
    result = [order[-1]] if order else []
    for t in (out if isinstance(out, (tuple, list)) else [out]):
        if isinstance(t, torch.Tensor) and id(t) in outputs and outputs[id(t)] not in result:
            result.append(outputs[id(t)])
    return result


def channel_groups(model: nn.Module, example: dict, ignored: list[nn.Module] | None = None):
    """(DependencyGraph, [ChannelGroup]) for every prunable coupled-channel group of `model`."""
    tp = _tp()
    example = _as_tensors(example)
    model.eval()
    ignored = list(ignored or []) + _output_layers(model, example)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(True)  # torch-pruning traces the autograd graph
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for g in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE_TYPES)):
        root = g[0].dep.target.module
        if root in ignored:
            continue
        groups.append(ChannelGroup(names.get(root, "?"), root, g, len(g[0].idxs)))
    return graph, groups


@torch.no_grad()
def activation_rms(model: nn.Module, batches, run: Callable, layers: list[nn.Module]) -> dict:
    """Per-input-channel RMS of what each layer in `layers` reads, over the calibration batches."""
    sums: dict[nn.Module, torch.Tensor] = {}
    counts: dict[nn.Module, int] = {}

    def hook(mod, inp, _out):
        x = inp[0].detach().float()
        x = x.movedim(1, -1) if isinstance(mod, CONV_TYPES) else x
        x = x.reshape(-1, x.shape[-1])
        sums[mod] = sums.get(mod, 0) + x.pow(2).sum(0)
        counts[mod] = counts.get(mod, 0) + x.shape[0]

    run_with_hooks(model, [m.register_forward_hook(hook) for m in set(layers)], batches, run)
    return {m: (sums[m] / counts[m]).sqrt() for m in sums}


def _column_norms(layer: nn.Module) -> torch.Tensor:
    """L2 norm of the weights reading each input channel (grouped convs: per input channel too)."""
    w = layer.weight.detach()
    if isinstance(layer, nn.Linear):
        return w.norm(dim=0)
    per_in = w.transpose(0, 1).flatten(1).norm(dim=1)  # (in / groups,)
    if layer.groups > 1:
        # output channels o*k..o*k+k-1 read input channel block g; input channel c of block g is
        # read by that block's filters only
        out_per_group = w.shape[0] // layer.groups
        blocks = w.view(layer.groups, out_per_group, w.shape[1], -1)
        per_in = blocks.pow(2).sum(dim=(1, 3)).sqrt().flatten()  # (groups * in/groups,)
    return per_in


def _consumers(group) -> list[tuple[nn.Module, list[int], list[int]]]:
    tp = _tp()
    fns = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
    out = []
    for item in group:
        dep = item.dep
        if dep.handler in fns and isinstance(dep.target.module, PRUNABLE_TYPES):
            out.append((dep.target.module, list(item.idxs), list(item.root_idxs)))
    return out


@torch.no_grad()
def group_importance(groups: list[ChannelGroup], importance: str, act: dict | None = None) -> None:
    """Fill each group's `scores` (one per root channel)."""
    if importance not in IMPORTANCES:
        raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)}, got '{importance}'")
    magnitude = _tp().importance.GroupMagnitudeImportance(p=2, normalizer=None, group_reduction="mean")
    for g in groups:
        consumers = _consumers(g.group) if importance == "activation" else []
        if not consumers or act is None or any(m not in act for m, _, _ in consumers):
            g.scores = magnitude(g.group).float()
            continue
        scores = torch.zeros(g.size)
        for module, idxs, root_idxs in consumers:
            contrib = act[module] * _column_norms(module)
            valid = [(i, r) for i, r in zip(idxs, root_idxs) if r is not None and i < contrib.numel()]
            if valid:
                scores.index_add_(0, torch.tensor([r for _, r in valid]), contrib[[i for i, _ in valid]].float())
        g.scores = scores


def _round_keep(keep: int, size: int, round_to: int) -> int:
    floor = max(1, math.ceil(size * MIN_KEEP_FRACTION))
    keep = max(keep, floor)
    if round_to > 1 and size % round_to == 0 and size >= 2 * round_to:
        keep = max(round_to, int(round(keep / round_to)) * round_to)
    return min(keep, size)


def allocate(groups: list[ChannelGroup], sparsity: float, allocation: str, round_to: int = 8) -> dict[int, int]:
    """How many channels each group keeps (index into `groups` -> kept count)."""
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got '{allocation}'")
    total = sum(g.size for g in groups)
    n_remove = int(round(sparsity * total))
    if allocation == "uniform":
        return {i: _round_keep(g.size - int(round(sparsity * g.size)), g.size, round_to) for i, g in enumerate(groups)}
    ranked = []
    for i, g in enumerate(groups):
        norm = g.scores / g.scores.mean().clamp_min(1e-12)
        per_cost = norm / (g.cost if allocation == "latency" else 1.0)
        ranked += [(float(s), i) for s in per_cost]
    ranked.sort()
    removed = {i: 0 for i in range(len(groups))}
    floor = {i: max(1, math.ceil(g.size * MIN_KEEP_FRACTION)) for i, g in enumerate(groups)}
    done = 0
    for _score, i in ranked:
        if done >= n_remove:
            break
        if groups[i].size - removed[i] > floor[i]:
            removed[i] += 1
            done += 1
    return {i: _round_keep(g.size - removed[i], g.size, round_to) for i, g in enumerate(groups)}


def prune_groups(graph, groups: list[ChannelGroup], keep: dict[int, int]) -> dict[str, list[int]]:
    """Remove each group's lowest-scoring channels so it keeps keep[i]; returns name -> removed
    channel indices (of the group's root layer)."""
    removed = {}
    for i, g in enumerate(groups):
        n_drop = g.size - keep[i]
        if n_drop <= 0:
            continue
        # stable sort: ties broken by index, so the same scores always remove the same channels
        drop = torch.sort(g.scores, stable=True).indices[:n_drop].sort().values.tolist()
        pg = graph.get_pruning_group(g.root, g.group[0].dep.handler, idxs=drop)
        if graph.check_pruning_group(pg):
            pg.prune()
            removed[g.name] = drop
    return removed


@torch.no_grad()
def count_macs_params(model: nn.Module, example: dict) -> tuple[int, int]:
    """(multiply-accumulates of the conv/linear layers for one forward pass, parameter count)."""
    macs = [0]

    def hook(mod, _inp, out):
        per_out = mod.weight[0].numel()  # conv: (in/groups)*kh*kw; linear: in
        macs[0] += out.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, PRUNABLE_TYPES)]
    try:
        model(**_as_tensors(example))
    finally:
        for h in handles:
            h.remove()
    return int(macs[0]), sum(p.numel() for p in model.parameters())
