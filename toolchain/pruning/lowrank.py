"""`prune.lowrank`: replace Linear and Conv layers by products of smaller ones where that pays.

- Linear W (out x in): truncated SVD, two Linears (out x r)(r x in), r by energy (`rank_energy`);
  with `eps` set, the error-bounded hierarchical (H-matrix) variant instead (lowrank_math.hmatrix).
- Conv2d k x k: separable k x 1 conv C_in -> R then 1 x k conv R -> C_out (lowrank_math), R by
  energy of the unfolded kernel; 1 x 1 convs and Conv1d: SVD over (C_in * kernel), kernel conv to
  r channels then a 1 x 1 conv.
A layer is factored only if the factors hold fewer parameters (r(m + n) < mn) and, with
`decide: latency` (default), its int8 graph measured faster in onnxruntime at one thread than the
dense layer's (lowrank_latency.py); otherwise it stays dense and the report says why.
Factoring changes the function, so recovery (distillation, toolchain/recovery.py) runs after it by
default (`default_recovery_steps`); --no-recover turns it off.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from contracts.errors import ConfigError
from contracts.progress import track
from runtime_check.isa import weight_qmax
from toolchain.pruning import lowrank_math as L
from toolchain.pruning.lowrank_latency import layer_inputs, time_variants
from toolchain.pruning.lowrank_modules import (
    HMatrixLinear, channel_conv, factored_linear, replace_module, separable_conv,
)
from toolchain.registry import register
from toolchain.stages import PruneContext, PruneResult

__all__ = ["LowRankPruneConfig", "prune_lowrank", "plan_layer"]

DECISIONS = ("latency", "params")


@dataclass(frozen=True)
class LowRankPruneConfig:
    """`rank_energy` (tau): rank = smallest r keeping tau of the squared singular values.
    `eps`: None = truncated SVD for Linears; a number = H-matrix Linears with overall relative
    Frobenius error <= eps. `min_block`: smallest H-matrix block side. `decide`: `latency`
    (factor a layer only if its int8 graph is measured faster, by at least `min_gain`) or
    `params` (whenever the factors are smaller). `convs`: factor convolutions too."""

    rank_energy: float = 0.8
    eps: float | None = None
    min_block: int = 32
    decide: str = "latency"
    min_gain: float = 0.05
    convs: bool = True
    VERSION: ClassVar[int] = 1
    kind: ClassVar[str] = "prune"
    requires_calibration: ClassVar[bool] = False
    # factoring moves every weight: distillation after it, unless --no-recover (steps: one pass
    # of ~600 images-or-texts' worth of batches recovered digits-cnn and mnist-resnet, see README)
    default_recovery_steps: ClassVar[int | None] = 300

    def __post_init__(self):
        if not 0.0 < self.rank_energy <= 1.0:
            raise ConfigError(f"rank_energy must be in (0, 1], got {self.rank_energy}")
        if self.eps is not None and not 0.0 < self.eps < 1.0:
            raise ConfigError(f"eps must be in (0, 1), got {self.eps}")
        if self.min_block < 1:
            raise ConfigError(f"min_block must be >= 1, got {self.min_block}")
        if self.decide not in DECISIONS:
            raise ConfigError(f"decide must be one of {', '.join(DECISIONS)}, got '{self.decide}'")
        if not 0.0 <= self.min_gain < 1.0:
            raise ConfigError(f"min_gain must be in [0, 1), got {self.min_gain}")


def _rel_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(w.double().norm())
    return float((w.double() - approx.double()).norm()) / norm if norm > 0 else 0.0


def _unsupported(mod: nn.Module) -> str | None:
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        if mod.groups != 1:
            return f"grouped convolution (groups={mod.groups}): a factor would mix channels across groups"
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            return "padding other than explicit zeros does not split between the two factors"
    elif not isinstance(mod, nn.Linear):
        return f"{type(mod).__name__} is not a Linear or Conv layer"
    return None


def plan_layer(mod: nn.Module, config: LowRankPruneConfig) -> tuple[dict, Callable[[nn.Module], nn.Module] | None]:
    """(report entry, builder or None) for one layer. `build(layer)` turns `layer` (this one, or a
    copy to time) into its factored replacement; planning itself changes nothing."""
    w = mod.weight.detach()
    entry = {"shape": list(w.shape), "params_before": w.numel()}
    if isinstance(mod, nn.Linear) and config.eps is not None:
        blocks, err = L.hmatrix(w, config.eps, config.min_block)
        after = L.hmatrix_params(blocks)
        entry.update(method="hmatrix", blocks=len(blocks), error_bound=config.eps, params_after=after,
                     ranks=sorted(b.rank for b in blocks if b.rank is not None),
                     dense_blocks=sum(b.dense is not None for b in blocks),
                     relative_error=_rel_error(w, L.hmatrix_dense(blocks, tuple(w.shape))))
        if after >= w.numel():
            return {**entry, "params_after": w.numel(), "relative_error": 0.0,
                    "reason": "no block partition is smaller than W"}, None
        if len(blocks) == 1:  # the whole matrix is one low-rank leaf: two plain Linears, no Slice/Concat
            return entry, lambda layer: factored_linear(layer, blocks[0].b, blocks[0].a)
        return entry, lambda layer: HMatrixLinear(blocks, layer.out_features, layer.in_features, layer.bias)
    separable = isinstance(mod, nn.Conv2d) and min(mod.kernel_size) > 1
    matrix = L.conv_unfold(w) if separable else w.reshape(w.shape[0], -1)
    s = torch.linalg.svdvals(matrix.double())
    r = max(1, L.energy_rank(s, config.rank_energy))
    m, n = matrix.shape
    entry.update(method="separable" if separable else "svd", rank=r, max_rank=min(m, n),
                 energy=round(1.0 - L.relative_tail(s, r) ** 2, 6))
    if not L.pays(r, m, n):
        return {**entry, "params_after": w.numel(), "relative_error": 0.0,
                "reason": f"rank {r} does not pay: r(m+n) = {r * (m + n)} >= mn = {m * n}"}, None
    if separable:
        vertical, horizontal, _ = L.separable_factors(w, r)
        approx = torch.einsum("nrj,rci->ncij", horizontal[:, :, 0, :], vertical[..., 0])

        def build(layer):
            return separable_conv(layer, vertical, horizontal)
    else:
        b, a, _ = L.svd_factors(matrix, r)
        approx = (b @ a).reshape(w.shape)

        def build(layer):
            return factored_linear(layer, b, a) if isinstance(layer, nn.Linear) else channel_conv(layer, b, a)
    entry.update(params_after=r * (m + n), relative_error=_rel_error(w, approx))
    return entry, build


def _check_speed(mod: nn.Module, build, x, config: LowRankPruneConfig) -> tuple[dict, bool]:
    times = time_variants({"dense": mod, "factored": build(copy.deepcopy(mod))}, x, threads=1, qmax=weight_qmax())
    speedup = times["dense"] / times["factored"] if times["factored"] > 0 else float("inf")
    record = {"latency_ms": {"dense": round(times["dense"], 5), "factored": round(times["factored"], 5),
                             "threads": 1, "int8": True,
                             "statistic": "fastest run"}, "speedup": round(speedup, 3)}
    return record, speedup >= 1.0 / (1.0 - config.min_gain)


def _why_dense(mod: nn.Module, build, x, entry: dict, config: LowRankPruneConfig) -> str | None:
    """None if the planned factors should replace `mod`; else why it stays dense (timing in `entry`)."""
    if config.decide != "latency":
        return None
    if x is None:
        return "the example inputs never reach this layer: not timed, left dense"
    record, faster = _check_speed(mod, build, x, config)
    entry.update(record)
    return None if faster else (f"factored int8 graph not faster by {config.min_gain:.0%} "
                                f"(speedup {record['speedup']:.2f}x): left dense")


@register("prune", "lowrank", LowRankPruneConfig,
          "low-rank factorization (SVD Linears, separable convs, H-matrix with --lowrank-eps) where it measures faster")
def prune_lowrank(model: nn.Module, config: LowRankPruneConfig, ctx: PruneContext) -> PruneResult:
    skipped, layers = {}, {}
    candidates = {n: m for n, m in ctx.layers.items()
                  if config.convs or isinstance(m, nn.Linear)}
    for name, mod in ctx.layers.items():
        if name not in candidates:
            layers[name] = {"shape": list(mod.weight.shape), "params_before": mod.weight.numel(),
                            "params_after": mod.weight.numel(), "reason": "convolutions excluded (convs: false)"}
        elif (why := _unsupported(mod)) is not None:
            skipped[name] = why
    plans = {}
    for name in track(ctx.progress, [n for n in candidates if n not in skipped], "low-rank factorization", "layers"):
        entry, build = plan_layer(candidates[name], config)
        layers[name] = entry
        if build is not None:
            plans[name] = build
    inputs = layer_inputs(model, list(plans), ctx.example_inputs, ctx.run) if config.decide == "latency" else {}
    names = list(plans)
    if config.decide == "latency":
        names = track(ctx.progress, names, "per-layer latency (int8, 1 thread)", "layers")
    for name in names:
        why_dense = _why_dense(candidates[name], plans[name], inputs.get(name), layers[name], config)
        if why_dense is None:
            replace_module(model, name, plans[name](candidates[name]))
            layers[name]["decision"] = "factored"
        else:  # the error it would have had stays in the report; the layer itself is exact
            layers[name].update(decision="dense", reason=why_dense, params_after=layers[name]["params_before"],
                                factored_relative_error=layers[name]["relative_error"], relative_error=0.0)
    for entry in layers.values():
        entry.setdefault("decision", "dense")
    return PruneResult(masks={}, speed_note=_speed_note(layers), skipped=skipped,
                       extra={"lowrank": _summary(layers, config)})


def _summary(layers: dict, config: LowRankPruneConfig) -> dict:
    before = sum(e["params_before"] for e in layers.values())
    after = sum(e["params_after"] for e in layers.values())
    return {"rank_energy": config.rank_energy, "eps": config.eps, "decide": config.decide,
            "factored": sorted(n for n, e in layers.items() if e["decision"] == "factored"),
            "dense": sorted(n for n, e in layers.items() if e["decision"] == "dense"),
            "params": {"before": before, "after": after, "ratio": after / max(1, before)},
            "layers": layers}


def _speed_note(layers: dict) -> str:
    done = sum(e["decision"] == "factored" for e in layers.values())
    return (f"low-rank: {done} of {len(layers)} layers factored into plain smaller MatMul/Conv nodes "
            "(fewer multiply-adds: real CPU speed where the per-layer timing showed it); the rest stay dense")
