"""Provable Filter Pruning (Liebenwein et al., ICLR 2020): channels ranked by their data-informed
sensitivity, widths allocated by one error level shared by every layer.

Channels are removed through torch-pruning's dependency groups (toolchain/pruning/structured.py),
so removing input channel j of a layer removes filter j of the layer that wrote it, with everything
coupled to it (BatchNorm, residual adds). A group's sensitivity per channel is the largest PFP
sensitivity any layer reading the channel gives it; its kept width at error eps is
min(size, m(eps)) (deterministic PFP: the top channels), rounded like `--prune structured`. eps
is found by bisection so that the conv/linear weights kept meet the budget.
"""
from __future__ import annotations

import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.pruning import sensitivity as sens
from sqexport.toolchain.pruning import structured as S
from sqexport.toolchain.pruning.masks import CONV_TYPES

__all__ = ["pfp_prune"]


def _handlers():
    tp = S._tp()
    return (tp.prune_conv_out_channels, tp.prune_linear_out_channels), \
        (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


def _group_scores(groups, measured: dict, names: dict, patches: dict, delta: float) -> dict[int, float]:
    """Fill each group's scores (per root channel) from its readers; returns group index -> alpha.
    A group no supported layer reads keeps every channel (scores stay None)."""
    alphas = {}
    for i, g in enumerate(groups):
        scores, alpha = None, 0.0
        for module, idxs, root_idxs in S._consumers(g.group):
            name = names.get(module)
            if name not in measured:
                continue
            s = measured[name]
            scores = torch.zeros(g.size) if scores is None else scores
            for k, r in zip(idxs, root_idxs):
                if r is not None and k < s.numel():
                    scores[r] = max(float(scores[r]), float(s[k]))
            alpha = max(alpha, sens.alpha(patches[name], module.weight.shape[0], delta))
        g.scores = scores
        if scores is not None:
            alphas[i] = alpha
    return alphas


def _param_model(groups, layers: dict[str, nn.Module]):
    """kept_params(keep) for the conv/linear weights: each weight scales with the kept fraction of
    the group owning its output channels and of the group owning its input channels."""
    out_fns, in_fns = _handlers()
    out_of, in_of = {}, {}
    for i, g in enumerate(groups):
        for item in g.group:
            mod = item.dep.target.module
            if item.dep.handler in out_fns:
                out_of[mod] = i
            elif item.dep.handler in in_fns:
                in_of[mod] = i
    mods = list(layers.values())

    def kept_params(keep: dict[int, int]) -> float:
        total = 0.0
        for m in mods:
            f = m.weight.numel()
            if m in out_of:
                f *= keep[out_of[m]] / groups[out_of[m]].size
            if m in in_of and not (isinstance(m, CONV_TYPES) and m.groups > 1):
                f *= keep[in_of[m]] / groups[in_of[m]].size
            total += f
        return total

    return kept_params


def pfp_prune(model: nn.Module, sparsity: float, round_to: int, batches, run, example: dict,
              layers: dict[str, nn.Module]) -> dict:
    """Remove channels; returns the report's `sensitivity` details (eps, samples, groups)."""
    graph, groups = S.channel_groups(model, example)
    if not groups:
        raise ConfigError("PFP found no prunable channel groups in this model")
    readers = {m for g in groups for m, _, _ in S._consumers(g.group) if sens.supported(m)}
    names = {m: n for n, m in model.named_modules() if m in readers}
    eta = sum(m.weight.shape[0] for m in layers.values())
    eta_star = max(m.weight.shape[0] for m in layers.values())
    available = sum(len(next(iter(b.values()))) for b in batches)
    size = sens.sample_size(eta, eta_star, available)
    measured, patches, used = sens.collect_sensitivities(model, batches, run, {names[m]: m for m in readers},
                                                         size, "channel")
    alphas = _group_scores(groups, measured, names, patches, sens.failure_delta(eta))
    totals = {i: float(groups[i].scores.sum()) for i in alphas}
    kept_params = _param_model(groups, layers)

    def keep_at(eps: float) -> dict[int, int]:
        keep = {}
        for i, g in enumerate(groups):
            if i not in alphas:
                keep[i] = g.size
                continue
            m = sens.samples_needed(eps, alphas[i], totals[i])
            keep[i] = S._round_keep(min(g.size, max(1, m)), g.size, round_to)
        return keep

    budget = (1.0 - sparsity) * sum(m.weight.numel() for m in layers.values())
    eps = sens.bisect_eps(lambda e: kept_params(keep_at(e)), budget)
    keep = keep_at(eps)
    for i, g in enumerate(groups):
        if g.scores is None:
            g.scores = torch.zeros(g.size)  # kept whole: prune_groups drops nothing
    removed = S.prune_groups(graph, groups, keep)
    return {"variant": "pfp", "eps": eps, "samples": used, "sample_size_wanted": size,
            "channels": {name: len(idx) for name, idx in removed.items()},
            "groups": {g.name: {"size": g.size, "kept": keep[i],
                                "sensitivity_sum": round(totals.get(i, 0.0), 6)} for i, g in enumerate(groups)}}
