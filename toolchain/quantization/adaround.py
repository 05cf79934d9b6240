"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML
2020): per layer, learn whether each weight rounds up or down so that the layer's output, not the
weight, stays close to FP32.

With s the per-channel scale of contracts.quant.quantize_weight_per_channel (unchanged, so the
QDQ graph and int32 biases are written as for nearest rounding) and h(V) the rectified sigmoid
clip(sigmoid(V)(zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1:

    W~ = s * clip(floor(W / s) + h(V), -qmax, qmax)
    min_V  || f(W x + b) - f(W~ x~ + b) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

then h(V) is rounded to {0, 1}. Choices, following the paper's practice (section 5, "asymmetric
reconstruction" and the activation function in the loss, its best ablation rows):
- x~ is the layer's input in the already-quantized model: earlier layers carry their AdaRound
  weights, and every activation quantizer is on, so the layer learns to absorb the error it will
  actually receive; the target W x uses the FP32 model's input. Layers are rounded one after the
  other, each on inputs collected after the ones before it were rounded (AdaRoundConfig.passes
  can group them to save forward passes, at a cost in accuracy it documents).
- f is what sits between the layer and its quantized output (ReLU / ReLU6 of the anchor), so
  errors the rectifier clips away cost nothing.
- beta anneals from 20 to 2 (cosine) after a warm-up of 20% of the iterations without the
  regularizer; lambda = 0.01 on a loss summed over output channels and averaged over positions,
  the normalization of the authors' AIMET implementation.
Pruned weights (exact zeros) are masked: they stay q = 0. Layers are visited in execution order.
Cost control: a subset of calibration inputs, and for convolutions a random subset of output
positions per input; each iteration uses a random minibatch of those positions. The optimizer
steps on patches gathered at those positions only, so a step is one small matmul, not a conv.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.contracts.quant import QuantParams, WeightQuant
from sqexport.contracts.weight_grid import WeightGrid, as_grid, enforce_grid
from sqexport.toolchain.quantization.params import rectify
from sqexport.toolchain.quantization.static import fake_quantized

__all__ = ["AdaRoundConfig", "adaround_weights"]

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (paper, section 4)
BETA_START, BETA_END = 20.0, 2.0
WARMUP = 0.2  # share of iterations with the reconstruction loss only
# Adam's step: the paper's 1e-3 is for 10k iterations; with a few hundred, V must still be able
# to cross 0 (flip a rounding) from its initial |V| <= 2.4
LEARNING_RATE = 1e-2
SUBSET_BATCH = 16  # calibration inputs per forward pass while collecting layer inputs


@dataclass(frozen=True)
class AdaRoundConfig:
    """Learned rounding of static int8 weights. In a recipe: `adaround: true` or
    `adaround: {enabled: true, iterations: 300, samples: 64, ...}`."""

    enabled: bool = False
    iterations: int = 200  # optimizer steps per layer
    samples: int = 32  # calibration inputs used (evenly spread over the calibration set)
    positions: int = 1024  # output positions per layer (conv: random pixels of those inputs)
    batch: int = 256  # positions per optimizer step
    reg_weight: float = 0.01  # lambda of the rounding regularizer
    # forward passes that collect the layers' quantized inputs: 0 = one per layer, the paper's
    # fully sequential scheme (the default); N = the layers, in execution order, form N groups
    # whose inputs come from the model with the AdaRound weights of the groups before it and
    # nearest rounding within the group. Grouping is cheaper but wrong in a way that adds up:
    # AdaRound flips 15-30 % of a layer's roundings, so a later layer of the group is fitted to
    # inputs it will not receive. Pretrained EfficientNet-Lite0, 8 photos, KL to FP32 on its own
    # calibration crops: nearest 0.029, 4 groups 0.064, sequential 0.0019 (held-out photos: 0.073,
    # 0.125, 0.014), at 153 s instead of 81 s for the quantize stage.
    passes: int = 0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"adaround.enabled must be true or false, got {self.enabled!r}")
        for name in ("iterations", "samples", "positions", "batch", "passes", "seed"):
            value = getattr(self, name)
            least = 0 if name in ("seed", "passes") else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"adaround.{name} must be an integer >= {least}, got {value!r}")
        if not (isinstance(self.reg_weight, (int, float)) and 0.0 <= self.reg_weight < math.inf):
            raise ConfigError(f"adaround.reg_weight must be a finite number >= 0, got {self.reg_weight!r}")

    @classmethod
    def coerce(cls, value) -> "AdaRoundConfig":
        """From what a recipe or a Python caller gives: a config, a bool or a mapping."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if isinstance(value, dict):
            known = [f.name for f in fields(cls)]
            unknown = sorted(str(k) for k in set(value) - set(known))
            if unknown:
                raise ConfigError(f"adaround: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
            return cls(**value)
        raise ConfigError(f"adaround must be true, false or a mapping of {{enabled, iterations, ...}}, got {value!r}")


class _Stop(Exception):
    """Raised by the input hook: nothing after the layer being rounded needs to run."""


class _Geometry:
    """Patches of a Conv1d/Conv2d input (or rows of a Linear input) at chosen output positions,
    and the layer applied to them: (P, groups, K) patches x (out, K) weight -> (P, out)."""

    def __init__(self, mod: nn.Module):
        self.linear = isinstance(mod, nn.Linear)
        self.groups = 1 if self.linear else mod.groups
        if self.linear:
            return
        # a Conv1d is a Conv2d over a height-1 input
        two = (lambda t: tuple(t)) if isinstance(mod, nn.Conv2d) else (lambda t: (1,) + tuple(t))
        self.kernel, self.stride, self.dilation = two(mod.kernel_size), two(mod.stride), two(mod.dilation)
        if mod.padding_mode != "zeros":
            raise ValueError("only zero padding")
        if isinstance(mod.padding, str):  # 'valid' or 'same' (torch puts the odd pixel at the end)
            total = [0 if mod.padding == "valid" else d * (k - 1) for k, d in zip(self.kernel, self.dilation)]
            self.pads = [(t // 2, t - t // 2) for t in total]
        else:
            pads = tuple(mod.padding) if isinstance(mod, nn.Conv2d) else (0,) + tuple(mod.padding)
            self.pads = [(p, p) for p in pads]
        self.conv1d = isinstance(mod, nn.Conv1d)

    def _as_2d(self, t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(2) if self.conv1d else t

    def positions(self, out: torch.Tensor, per_sample: int, gen: torch.Generator) -> torch.Tensor:
        """(P, 3) indices (sample, row, col) of output pixels, `per_sample` random ones per sample;
        Linear: (P, 1) row indices into the input flattened to (rows, features)."""
        if self.linear:  # token rows of a sequence input count as positions too
            rows = out.reshape(-1, out.shape[-1]).shape[0]
            take = min(rows, per_sample * out.shape[0])
            return torch.randperm(rows, generator=gen)[:take].sort().values[:, None]
        o = self._as_2d(out)
        n, _, h, w = o.shape
        k = min(per_sample, h * w)
        picks = [torch.randperm(h * w, generator=gen)[:k] for _ in range(n)]
        flat = torch.cat(picks)
        sample = torch.arange(n).repeat_interleave(k)
        return torch.stack([sample, flat // w, flat % w], 1)

    def gather_output(self, out: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return out.reshape(-1, out.shape[-1])[pos[:, 0]]
        o = self._as_2d(out)
        return o[pos[:, 0], :, pos[:, 1], pos[:, 2]]

    def gather_input(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(P, groups, K) with K = in/groups * kernel, in the weight's flattening order."""
        if self.linear:
            return x.reshape(-1, x.shape[-1])[pos[:, 0]][:, None, :]
        x = self._as_2d(x)
        (pt, pb), (pl, pr) = self.pads
        xp = nn.functional.pad(x, (pl, pr, pt, pb))
        rows = pos[:, 1:2] * self.stride[0] + torch.arange(self.kernel[0]) * self.dilation[0]
        cols = pos[:, 2:3] * self.stride[1] + torch.arange(self.kernel[1]) * self.dilation[1]
        chans = torch.arange(x.shape[1])
        patch = xp[pos[:, 0, None, None, None], chans[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        return patch.reshape(len(pos), self.groups, -1)

    def apply(self, w: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(P, groups, K) patches, (out, K) weight -> (P, out)."""
        wg = w.reshape(self.groups, -1, w.shape[1])
        if self.groups == 1:
            return patches[:, 0] @ wg[0].t()
        return torch.einsum("gok,pgk->pgo", wg, patches).reshape(len(patches), -1)


class _Adam:
    """Adam (Kingma & Ba 2015) on one tensor, in place. Written out because torch.optim's first
    use imports torch._dynamo, which can take longer than a small model's whole AdaRound."""

    def __init__(self, param: torch.Tensor, lr: float = LEARNING_RATE, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m, self.v, self.t = torch.zeros_like(param), torch.zeros_like(param), 0

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.t))


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _beta(step: int, total: int) -> float:
    """Cosine decay from BETA_START to BETA_END over the iterations after the warm-up."""
    start = WARMUP * total
    t = min(1.0, max(0.0, (step - start) / max(1.0, total - start)))
    return BETA_END + 0.5 * (BETA_START - BETA_END) * (1 + math.cos(math.pi * t))


def round_layer(weight: torch.Tensor, scale: torch.Tensor, qmax: int, geometry: _Geometry, patches: torch.Tensor,
                target: torch.Tensor, bias: torch.Tensor | None, bounds: tuple[float, float],
                config: AdaRoundConfig, gen: torch.Generator) -> np.ndarray:
    """int8 q (the weight's shape) minimizing the rectified output error on `patches` (P, groups,
    K) against `target` (P, out), each q within +-1 of W / s and 0 where W is 0."""
    w = weight.detach().reshape(weight.shape[0], -1).float()
    s = scale.reshape(-1, 1).float()
    ws = w / s
    base = torch.floor(ws)
    mask = (w != 0).float()
    rest = (ws - base).clamp(0.0, 1.0)
    # start at W~ = W: h(V0) = rest, i.e. sigmoid(V0) = (rest - gamma) / (zeta - gamma)
    p0 = ((rest - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    v = torch.log(p0 / (1 - p0)).requires_grad_(True)
    adam = _Adam(v)
    b = bias.detach().float() if bias is not None else 0.0
    n = len(patches)
    for step in range(config.iterations):
        idx = torch.randint(n, (min(config.batch, n),), generator=gen) if config.batch < n else slice(None)
        h = _h(v)
        wq = s * torch.clamp(base + h, -qmax, qmax) * mask
        out = rectify(geometry.apply(wq, patches[idx]) + b, bounds)
        loss = (out - target[idx]).pow(2).sum(1).mean()
        if step >= WARMUP * config.iterations and config.reg_weight > 0:
            loss = loss + config.reg_weight * ((1 - (2 * h - 1).abs().pow(_beta(step, config.iterations))) * mask).sum()
        (grad,) = torch.autograd.grad(loss, v)
        adam.step(grad)
    with torch.no_grad():
        q = torch.clamp(base + (v >= 0).float(), -qmax, qmax) * mask
    return q.reshape(weight.shape).numpy().astype(np.int8)


def _subset(batches: list[dict], n: int) -> list[dict]:
    """`n` inputs evenly spread over the calibration set (its leading inputs may all be crops of
    one photo), in batches of SUBSET_BATCH."""
    keys = list(batches[0])
    full = {k: np.concatenate([b[k] for b in batches]) for k in keys}
    total = len(full[keys[0]])
    idx = np.unique(np.linspace(0, total - 1, min(n, total)).round().astype(int))
    return [{k: full[k][idx[i:i + SUBSET_BATCH]] for k in keys} for i in range(0, len(idx), SUBSET_BATCH)]


def _fp32_targets(model: nn.Module, layers: dict[str, nn.Module], geoms: dict[str, _Geometry],
                  bounds: dict[str, tuple[float, float]], batches: list[dict], run: Callable,
                  per_sample: int, gen: torch.Generator) -> tuple[list[str], dict, dict]:
    """One FP32 pass: execution order of the layers, the output positions chosen per (layer,
    batch), and the rectified FP32 outputs there. A module called twice in one forward pass is
    fitted on its first call."""
    order: list[str] = []
    pos: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    tgt: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    seen = [0]  # batches started

    def hook(name):
        def fn(m, args, out):
            if len(pos[name]) > seen[0]:
                return
            if name not in order:
                order.append(name)
            p = geoms[name].positions(out, per_sample, gen)
            pos[name].append(p)
            tgt[name].append(rectify(geoms[name].gather_output(out.detach(), p), bounds[name]))
        return fn
    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        for batch in batches:
            run(model, batch)
            seen[0] += 1
    finally:
        for h in handles:
            h.remove()
    return order, pos, {n: torch.cat(t) for n, t in tgt.items() if t}


def _quantized_inputs(model: nn.Module, group: list[str], layers: dict[str, nn.Module], geoms: dict[str, _Geometry],
                      positions: dict[str, list[torch.Tensor]], batches: list[dict], run: Callable
                      ) -> dict[str, torch.Tensor]:
    """The (fake-quantized) input patches of the layers in `group` in the current quantized model;
    each forward pass stops after the group's last layer. The hooks run after the input
    quantizers' (registered earlier)."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in group}
    seen = [0]

    def hook(name):
        def fn(m, args):
            if len(got[name]) == seen[0]:
                got[name].append(geoms[name].gather_input(args[0].detach(), positions[name][seen[0]]))
            if name == group[-1]:
                raise _Stop
        return fn
    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in group]
    try:
        for batch in batches:
            try:
                run(model, batch)
            except _Stop:
                pass
            seen[0] += 1
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(p) for n, p in got.items()}


@torch.no_grad()
def _write(mod: nn.Module, wq: WeightQuant) -> None:
    mod.weight.copy_(torch.from_numpy(wq.dequantized()))


def adaround_weights(model: nn.Module, params: QuantParams, batches: list[dict], run: Callable, grid: int | WeightGrid,
                     config: AdaRoundConfig, progress: Progress = NULL_PROGRESS) -> dict[str, WeightQuant]:
    """AdaRound int8 weights for the Conv/Linear anchors of `params` (activation params already
    calibrated, weights rounded to nearest); same scales as params.weights. `model` is unchanged.
    On a pair-limited grid the learned integers are then moved onto its pair limit."""
    grid = as_grid(grid)
    modules = dict(model.named_modules())
    anchors = {a.module: a for a in params.anchors if a.module in params.weights}
    layers = {n: modules[n] for n in anchors if isinstance(modules[n], (nn.Conv1d, nn.Conv2d, nn.Linear))}
    geoms: dict[str, _Geometry] = {}
    for n, m in layers.items():
        try:
            geoms[n] = _Geometry(m)
        except ValueError:  # a padding mode the patch gather does not reproduce: keeps nearest rounding
            continue
    layers = {n: m for n, m in layers.items() if n in geoms}
    bounds = {n: (a.output_range if a.quantize_output else (-math.inf, math.inf)) for n, a in anchors.items()}
    subset = _subset(batches, config.samples)
    n_inputs = sum(len(next(iter(b.values()))) for b in subset)
    gen = torch.Generator().manual_seed(config.seed)
    per_sample = max(1, math.ceil(config.positions / n_inputs))
    order, positions, targets = _fp32_targets(model, layers, geoms, bounds, subset, run, per_sample, gen)
    fp32 = {n: (layers[n].weight.detach().clone(), None if layers[n].bias is None else layers[n].bias.detach().clone())
            for n in order}
    out = dict(params.weights)
    n_groups = len(order) if config.passes == 0 else min(config.passes, len(order))
    groups = [list(g) for g in np.array_split(np.array(order, dtype=object), n_groups) if len(g)]
    with fake_quantized(model, params), progress.task("AdaRound", len(order), "layers") as task:
        for group in groups:  # fake_quantized restores the FP32 weights on exit
            inputs = _quantized_inputs(model, group, layers, geoms, positions, subset, run)
            for name in group:
                weight, bias = fp32[name]
                scale = torch.from_numpy(params.weights[name].scale)
                q = round_layer(weight, scale, grid.qmax, geoms[name], inputs.pop(name), targets.pop(name), bias,
                                bounds[name], config, gen)
                q, moved = enforce_grid(q, weight.numpy(), params.weights[name].scale, grid)
                out[name] = WeightQuant(q=q, scale=params.weights[name].scale, limited_pairs=moved)
                _write(layers[name], out[name])  # later groups see this layer's rounded weights
                task.advance()
    return out
