"""Data-informed sensitivities and the shared error budget of SiPP and PFP.

After Baykal, Liebenwein et al., "SiPPing Neural Networks: Sensitivity-informed Provable Pruning
of Neural Networks" (SiPP, arXiv 1910.05422) and Liebenwein et al., "Provable Filter Pruning for
Efficient Neural Networks" (PFP, ICLR 2020).

Edge sensitivity of j -> i on a batch S of real inputs: s_ij = max_{x in S} w_ij a_j(x) / sum_k
w_ik a_k(x). Positive and negative parts are separate sub-problems: the papers split by the sign
of w (activations after a ReLU are >= 0); here the split is by the sign of the contribution
w_ij a_j(x), which is the same thing for a >= 0 and still a ratio in [0, 1] when a layer reads
signed inputs (a network's normalized input). Convs are taken per patch (im2col) and reduced by the
max over patches. PFP scores an input channel j by its whole contribution to output i at a patch
(the sum over the kernel positions), maxed over samples, patches and outputs.

Sample complexity at error eps: m(eps) = ceil(3 (6 + 2 eps) alpha S / eps^2), S the sum of the
sensitivities, alpha = 2 * 3 * log(8 (P + 1) k / delta). The papers leave P and k to the layer;
here P = patches per sample (1 for a Linear) and k = output units (the union bound runs over
patches and outputs). delta = 1e-16 / eta (eta: units in the network), and the batch has
|S| = ceil(3 log(8 eta* / delta)) samples (eta*: the widest layer), capped by the data given.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sqexport.toolchain.hooks import run_with_hooks

__all__ = ["C_CONSTANT", "failure_delta", "sample_size", "alpha", "samples_needed", "contributions",
           "edge_sensitivity", "channel_contributions", "channel_sensitivity", "collect_sensitivities", "bisect_eps", "supported"]

C_CONSTANT = 3.0
CHUNK_ELEMENTS = 8_000_000  # floats per contribution tensor chunk (~32 MB): bounded memory on big layers


def failure_delta(eta: int) -> float:
    return 1e-16 / max(1, eta)


def sample_size(eta: int, eta_star: int, available: int | None = None, c: float = C_CONSTANT) -> int:
    """|S| = ceil(c log(8 eta* / delta)), delta = 1e-16 / eta; at most `available`."""
    size = math.ceil(c * math.log(8 * eta_star / failure_delta(eta)))
    return min(size, available) if available is not None else size


def alpha(patches: int, outputs: int, delta: float) -> float:
    return 2 * 3 * math.log(8 * (patches + 1) * outputs / delta)


def samples_needed(eps: float, alpha_: float, total_sensitivity: torch.Tensor | float):
    """m(eps) = ceil(3 (6 + 2 eps) alpha S / eps^2), elementwise when S is a tensor."""
    m = 3.0 * (6.0 + 2.0 * eps) * alpha_ * total_sensitivity / eps ** 2
    return torch.ceil(m) if isinstance(m, torch.Tensor) else math.ceil(m)


def supported(layer: nn.Module) -> bool:
    """Dense Linear and Conv1d/Conv2d layers; grouped (depthwise) convs have no cross-channel sum."""
    return isinstance(layer, nn.Linear) or (isinstance(layer, (nn.Conv1d, nn.Conv2d)) and layer.groups == 1)


def _patches(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, K, L): every patch the layer multiplies (K = in * kernel positions; L = 1 for a Linear)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])[:, :, None]
    if isinstance(layer, nn.Conv1d):
        x, k = x[:, :, None, :], (1, layer.kernel_size[0])
        pad, stride, dil = (0, layer.padding[0]), (1, layer.stride[0]), (1, layer.dilation[0])
    else:
        k, pad, stride, dil = layer.kernel_size, layer.padding, layer.stride, layer.dilation
    if isinstance(pad, str):
        raise ValueError("string padding is not supported")
    return F.unfold(x, k, dilation=dil, padding=pad, stride=stride)


def contributions(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, O, K, L): w_ik a_k(x) for every output i, input edge k and patch."""
    w = layer.weight.detach().float().reshape(layer.weight.shape[0], -1)
    return w[None, :, :, None] * _patches(layer, x.float())[:, None, :, :]


def _ratio_max(g: torch.Tensor, dim: int) -> torch.Tensor:
    """max(pos / sum pos, neg / sum neg) along `dim`; an empty side contributes 0."""
    pos, neg = g.clamp_min(0), (-g).clamp_min(0)
    return torch.maximum(pos / pos.sum(dim, keepdim=True).clamp_min(1e-30),
                         neg / neg.sum(dim, keepdim=True).clamp_min(1e-30))


def _chunks(layer: nn.Module, x: torch.Tensor):
    per_sample = layer.weight.numel() * max(1, _patches(layer, x[:1].float()).shape[-1])
    step = max(1, CHUNK_ELEMENTS // per_sample)
    for i in range(0, x.shape[0], step):
        yield x[i:i + step]


@torch.no_grad()
def edge_sensitivity(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiPP: s_ij (shape of the weight, flattened per output: (O, K)), max over samples and patches."""
    out = None
    for part in _chunks(layer, x):
        s = _ratio_max(contributions(layer, part), dim=2).amax(dim=(0, 3))
        out = s if out is None else torch.maximum(out, s)
    return out


def channel_contributions(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, O, C, L): input channel j's contribution to output i at each patch. For a conv this is
    one grouped convolution (every channel convolved with its own slice of every filter), which
    costs far less than im2col followed by a sum over the kernel positions."""
    w, x = layer.weight.detach().float(), x.float()
    if isinstance(layer, nn.Linear):
        return contributions(layer, x)
    out_ch, channels = w.shape[:2]
    per_channel = w.transpose(0, 1).reshape(channels * out_ch, 1, *w.shape[2:])  # channel-major
    conv = F.conv2d if isinstance(layer, nn.Conv2d) else F.conv1d
    y = conv(x, per_channel, None, layer.stride, layer.padding, layer.dilation, groups=channels)
    return y.reshape(y.shape[0], channels, out_ch, -1).transpose(1, 2)


@torch.no_grad()
def channel_sensitivity(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PFP: s_j per input channel, its whole contribution (summed over kernel positions) relative to
    the output's, maxed over samples, patches and outputs."""
    out = None
    for part in _chunks(layer, x):
        g = channel_contributions(layer, part)  # (B, O, C, L)
        s = _ratio_max(g, dim=2).amax(dim=(0, 1, 3))
        out = s if out is None else torch.maximum(out, s)
    return out


def collect_sensitivities(model: nn.Module, batches, run: Callable, layers: dict[str, nn.Module],
                          limit: int, per: str) -> tuple[dict[str, torch.Tensor], dict[str, int], int]:
    """Run the first `limit` samples of `batches`; per = "edge" (SiPP) or "channel" (PFP). Returns
    (layer name -> sensitivities, layer name -> patches per sample, samples used)."""
    fn = edge_sensitivity if per == "edge" else channel_sensitivity
    result, patches = {}, {}
    names = {m: n for n, m in layers.items()}

    def hook(mod, inp, _out):
        x = inp[0].detach()
        s = fn(mod, x)
        name = names[mod]
        result[name] = s if name not in result else torch.maximum(result[name], s)
        patches[name] = _patches(mod, x[:1].float()).shape[-1]

    taken, chosen = 0, []
    for b in batches:
        if taken >= limit:
            break
        n = min(limit - taken, len(next(iter(b.values()))))
        chosen.append({k: v[:n] for k, v in b.items()})
        taken += n
    handles = [m.register_forward_hook(hook) for m in layers.values()]
    run_with_hooks(model, handles, chosen, run)
    return result, patches, taken


def bisect_eps(kept: Callable[[float], float], budget: float, lo: float = 1e-6, hi: float = 1e6,
               steps: int = 100) -> float:
    """The smallest error level eps whose kept count `kept(eps)` (non-increasing in eps) fits the
    budget: bisection on log eps. Returns `hi` when even that keeps too much."""
    if kept(hi) > budget:
        return hi
    if kept(lo) <= budget:
        return lo
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        if kept(mid) <= budget:
            hi = mid
        else:
            lo = mid
        if hi / lo < 1 + 1e-9:
            break
    return hi
