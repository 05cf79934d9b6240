"""SiPP (Baykal, Liebenwein et al., "SiPPing Neural Networks"): unstructured pruning of each
neuron's incoming weights by data-informed sensitivity, one error level eps shared by all layers.

Per neuron i (a Linear row, a conv filter) with sensitivities s_ij and S_i = sum_j s_ij, the budget
at eps is m_i = m(eps) samples (toolchain/pruning/sensitivity.py):
- deterministic: keep the m_i most sensitive weights; its error bound is the sensitivity mass
  dropped, sum of s_ij over the pruned j;
- sampling: draw m_i indices with replacement from p_j = s_ij / S_i (seeded), keep the drawn
  weights and reweight each by count_j / (m_i p_j) (an unbiased estimate of the neuron's
  pre-activation); its error bound is eps itself;
- hybrid: per neuron, whichever of the two bounds is smaller.
eps is bisected so the expected kept weights meet the budget (sampling: the expected number of
distinct draws, sum_j 1 - (1 - p_j)^m). When m_i exceeds SAMPLING_CAP x fan-in, sampling keeps the
whole neuron: every weight would be drawn and each reweighting factor is ~1.
"""
from __future__ import annotations

import torch
from torch import nn

from sqexport.toolchain.pruning import sensitivity as sens

__all__ = ["VARIANTS", "sipp_prune", "neuron_plan"]

VARIANTS = ("deterministic", "sampling", "hybrid")
SAMPLING_CAP = 20


class _Neurons:
    """One layer's sensitivities (O, K) with what every bisection step reuses, computed once."""

    def __init__(self, s: torch.Tensor, alpha: float):
        self.s, self.alpha = s, alpha
        self.total = s.sum(1)
        self.p = s / self.total[:, None].clamp_min(1e-30)
        self.nonzero = (s > 0).sum(1).float()
        ordered = torch.sort(s, dim=1, descending=True, stable=True).values
        self.mass_top = torch.cat([torch.zeros(s.shape[0], 1), ordered.cumsum(1)], dim=1)  # mass of the top-m

    def plan(self, eps: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(m per neuron, True where the neuron is sampled) at error eps."""
        m = sens.samples_needed(eps, self.alpha, self.total).clamp_min(1.0)
        if variant == "deterministic":
            return m, torch.zeros_like(m, dtype=torch.bool)
        if variant == "sampling":
            return m, self.total > 0
        return m, (self.total > 0) & (self.det_error(m) > eps)

    def det_error(self, m: torch.Tensor) -> torch.Tensor:
        """Sensitivity mass outside each neuron's top-m (the deterministic variant's bound)."""
        top = m.clamp_max(self.s.shape[1]).long()
        return self.total - self.mass_top.gather(1, top[:, None]).squeeze(1)

    def kept(self, eps: float, variant: str) -> float:
        m, sampled = self.plan(eps, variant)
        fan_in = float(self.s.shape[1])
        expected = (1.0 - (1.0 - self.p).pow(m[:, None])).sum(1)
        sampled_kept = torch.where(m > SAMPLING_CAP * fan_in, torch.full_like(m, fan_in), expected)
        kept = torch.where(sampled, sampled_kept, torch.minimum(m, self.nonzero))
        dead = self.total == 0  # no signal on the batch: kept whole (see _apply)
        return float(torch.where(dead, torch.full_like(kept, fan_in), kept).sum())


def neuron_plan(s: torch.Tensor, alpha: float, eps: float, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(m per neuron, True where the neuron is sampled) at error eps."""
    return _Neurons(s, alpha).plan(eps, variant)


@torch.no_grad()
def _apply(layer: nn.Module, s: torch.Tensor, m: torch.Tensor, sampled: torch.Tensor,
           gen: torch.Generator) -> torch.Tensor:
    """Mask (weight-shaped) and, for sampled neurons, reweighted weights written in place."""
    w = layer.weight.data.view(s.shape[0], -1)
    keep = torch.zeros_like(s, dtype=torch.bool)
    totals = s.sum(1)
    for i in range(s.shape[0]):
        if totals[i] == 0:
            keep[i] = True
            continue
        mi = int(m[i])
        if not sampled[i]:
            keep[i, torch.sort(s[i], descending=True, stable=True).indices[:mi]] = True
            continue
        if mi > SAMPLING_CAP * s.shape[1]:
            keep[i] = True
            continue
        p = s[i] / totals[i]
        counts = torch.bincount(torch.multinomial(p, mi, replacement=True, generator=gen), minlength=s.shape[1])
        keep[i] = counts > 0
        factor = torch.where(keep[i], counts.float() / (mi * p).clamp_min(1e-30), torch.zeros_like(p))
        w[i] *= factor.to(w.dtype)
    w.mul_(keep.to(w.dtype))
    return keep.view_as(layer.weight)


def sipp_prune(model: nn.Module, sparsity: float, variant: str, seed: int, batches, run,
               layers: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(masks, the report's details, skipped layers with the reason)."""
    usable = {n: m for n, m in layers.items() if sens.supported(m)}
    skipped = {n: "grouped conv: no sum over input channels to take a sensitivity against"
               for n in layers if n not in usable}
    eta = sum(m.weight.shape[0] for m in layers.values())
    eta_star = max(m.weight.shape[0] for m in layers.values())
    available = sum(len(next(iter(b.values()))) for b in batches)
    size = sens.sample_size(eta, eta_star, available)
    measured, patches, used = sens.collect_sensitivities(model, batches, run, usable, size, "edge")
    delta = sens.failure_delta(eta)
    alphas = {n: sens.alpha(patches[n], usable[n].weight.shape[0], delta) for n in measured}
    fixed = sum(m.weight.numel() for n, m in layers.items() if n not in measured)
    budget = (1.0 - sparsity) * sum(m.weight.numel() for m in layers.values()) - fixed
    neurons = {n: _Neurons(measured[n], alphas[n]) for n in measured}
    eps = sens.bisect_eps(lambda e: sum(nr.kept(e, variant) for nr in neurons.values()), budget)
    gen = torch.Generator().manual_seed(seed)
    masks, sampled_neurons = {}, 0
    for name in measured:  # layer order: the generator's draws are reproducible
        m, sampled = neurons[name].plan(eps, variant)
        sampled_neurons += int(sampled.sum())
        masks[name] = _apply(usable[name], measured[name], m, sampled, gen)
    details = {"variant": f"sipp-{variant}", "eps": eps, "samples": used, "sample_size_wanted": size,
               "sampled_neurons": sampled_neurons,
               "neurons": sum(s.shape[0] for s in measured.values())}
    return masks, details, skipped
