"""`prune.lowrank`: replace Linear and Conv layers by products of smaller ones where that pays.

- Linear W (out x in): truncated SVD, two Linears (out x r)(r x in), r by energy (`rank_energy`);
  with `eps` set, the error-bounded hierarchical (H-matrix) variant instead (lowrank_math.hmatrix).
- Conv2d k x k, two schemes (`conv_scheme`; `auto` = both candidates, the faster one wins):
  `separable`: k x 1 conv C_in -> R then 1 x k conv R -> C_out (SVD of the unfolded kernel);
  `channel`: k x k conv C_in -> r then 1 x 1 conv r -> C_out (SVD of W as C_out x C_in*k*k,
  Zhang et al. 2015 / Jaderberg et al. 2014 scheme 1). 1 x 1 convs and Conv1d: the channel form.
- Ranks: the smallest r keeping `rank_energy` of the squared singular values, rounded up to a
  multiple of `rank_multiple` (int8 kernels work on channel blocks; the kept energy only grows).
A layer is factored only if the factors hold fewer parameters (r(m + n) < mn) and, with
`decide: latency` (default), it measured faster: for single-input models each layer's time is read
in the whole int8 model (onnxruntime's per-node profile of the dense and of the factored graph,
lowrank_model.py), then the whole factored model is timed against the dense one, interleaved, and
layers go back to dense (least gain first) until the whole model is faster by `min_gain`.
Multi-input models time each layer alone as a small int8 graph (lowrank_latency.py).
Factoring changes the function, so recovery (distillation, toolchain/recovery.py) runs after it by
default (`default_recovery_steps`); --no-recover turns it off.
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.progress import track
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.pruning import lowrank_math as L
from sqexport.toolchain.pruning.lowrank_latency import layer_inputs, time_variants
from sqexport.runtime_check.node_timing import profile_node_times, revert_until_faster, time_pair
from sqexport.toolchain.pruning.lowrank_model import layer_times, model_int8_graph
from sqexport.toolchain.pruning.lowrank_modules import (
    HMatrixLinear, channel_conv, factored_linear, replace_module, separable_conv,
)
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import PruneContext, PruneResult

__all__ = ["LowRankPruneConfig", "prune_lowrank", "plan_layer", "plan_candidates"]

DECISIONS = ("latency", "params")
CONV_SCHEMES = ("auto", "separable", "channel")


@dataclass(frozen=True)
class LowRankPruneConfig:
    """`rank_energy` (tau): rank = smallest r keeping tau of the squared singular values, rounded up
    to a multiple of `rank_multiple` (1 = no rounding). `eps`: None = truncated SVD for Linears; a
    number = H-matrix Linears with overall relative Frobenius error <= eps. `min_block`: smallest
    H-matrix block side. `conv_scheme`: k x k convs as `separable` (k x 1, 1 x k), `channel`
    (k x k to r channels, 1 x 1) or `auto` (both planned, the faster/smaller one chosen).
    `decide`: `latency` (factor a layer only if it measured faster by at least `min_gain`) or
    `params` (whenever the factors are smaller). `whole_model`: with `latency`, check the whole
    factored model against the dense one and revert layers until it is faster by `min_gain`.
    `convs`: factor convolutions too."""

    rank_energy: float = 0.6
    eps: float | None = None
    min_block: int = 32
    decide: str = "latency"
    min_gain: float = 0.05
    convs: bool = True
    conv_scheme: str = "auto"
    rank_multiple: int = 8
    whole_model: bool = True
    max_checks: int = 8  # whole-model measurements at most (layers revert in chunks to fit)
    VERSION: ClassVar[int] = 2
    kind: ClassVar[str] = "prune"
    requires_calibration: ClassVar[bool] = False
    # factoring moves every weight: distillation after it, unless --no-recover (steps: about one
    # pass over ~600 images or texts; benchmarks/results/lowrank.md)
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
        if self.conv_scheme not in CONV_SCHEMES:
            raise ConfigError(f"conv_scheme must be one of {', '.join(CONV_SCHEMES)}, got '{self.conv_scheme}'")
        if self.rank_multiple < 1:
            raise ConfigError(f"rank_multiple must be >= 1, got {self.rank_multiple}")
        if self.max_checks < 2:
            raise ConfigError(f"max_checks must be >= 2, got {self.max_checks}")


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


def _schemes(mod: nn.Module, config: LowRankPruneConfig) -> tuple[str, ...]:
    if isinstance(mod, nn.Linear):
        return ("hmatrix",) if config.eps is not None else ("svd",)
    if isinstance(mod, nn.Conv2d) and min(mod.kernel_size) > 1:
        return ("separable", "channel") if config.conv_scheme == "auto" else (config.conv_scheme,)
    return ("svd",)  # 1 x 1 convs, Conv1d: the channel form (kernel conv to r, then 1 x 1)


def _plan_hmatrix(mod: nn.Linear, config: LowRankPruneConfig, entry: dict):
    w = mod.weight.detach()
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


def plan_layer(mod: nn.Module, config: LowRankPruneConfig, scheme: str | None = None
               ) -> tuple[dict, Callable[[nn.Module], nn.Module] | None]:
    """(report entry, builder or None) for one layer in one scheme (default: the first of
    `_schemes`). `build(layer)` turns `layer` (this one, or its twin in a copy of the model) into
    its factored replacement; planning itself changes nothing."""
    scheme = scheme or _schemes(mod, config)[0]
    w = mod.weight.detach()
    entry = {"shape": list(w.shape), "params_before": w.numel()}
    if scheme == "hmatrix":
        return _plan_hmatrix(mod, config, entry)
    separable = scheme == "separable"
    matrix = L.conv_unfold(w) if separable else w.reshape(w.shape[0], -1)
    s = torch.linalg.svdvals(matrix.double())
    m, n = matrix.shape
    by_energy = max(1, L.energy_rank(s, config.rank_energy))
    r = L.round_rank(by_energy, config.rank_multiple, min(m, n))
    entry.update(method="channel" if scheme == "channel" else scheme, rank=r, rank_by_energy=by_energy,
                 max_rank=min(m, n), energy=round(1.0 - L.relative_tail(s, r) ** 2, 6))
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


def plan_candidates(mod: nn.Module, config: LowRankPruneConfig) -> dict[str, tuple[dict, Callable | None]]:
    """scheme -> plan_layer(mod, config, scheme) for every scheme the config allows for this layer."""
    return {scheme: plan_layer(mod, config, scheme) for scheme in _schemes(mod, config)}


# ---- choosing by measured speed ------------------------------------------------------------------

def _in_context(ctx: PruneContext) -> bool:
    """Whole-model timing needs the spec's exporter and one input tensor (multi-input models, e.g.
    transformers with masks, keep the per-layer timing: their export is slow and each check
    re-exports)."""
    return ctx.export is not None and ctx.run is not None and len(ctx.example_inputs) == 1


def _variant(model: nn.Module, options: dict, selection: dict[str, str]) -> nn.Module:
    """A copy of `model` with the layers in `selection` (name -> scheme) factored."""
    twin = copy.deepcopy(model)
    for name, scheme in selection.items():
        replace_module(twin, name, options[name][scheme][1](twin.get_submodule(name)))
    return twin


class _Bench:
    """Whole int8 graphs of variants of `model` in one temporary folder (the dense one built once)."""

    def __init__(self, model: nn.Module, options: dict, ctx: PruneContext, tmp: Path):
        self.model, self.options, self.ctx, self.tmp = model, options, ctx, tmp
        self.batches = ctx.calib_batches[:1] or [ctx.example_inputs]  # ranges only shape the graph here
        self.feed, self.qmax, self.built = ctx.example_inputs, weight_grid(), 0
        self.dense_path = tmp / "dense.onnx"
        self.dense_nodes = self._graph(model, self.dense_path)

    def _graph(self, model: nn.Module, path: Path) -> dict[str, str]:
        self.built += 1
        return model_int8_graph(model, self.ctx.export, self.batches, self.ctx.run, path, self.qmax)

    def build(self, selection: dict[str, str]) -> tuple[Path, dict[str, str]]:
        path = self.tmp / f"variant{self.built}.onnx"
        return path, self._graph(_variant(self.model, self.options, selection), path)


def _times_in_context(bench: _Bench, options: dict) -> dict[str, dict[str, float | None]]:
    """Per layer, microseconds in the whole int8 model: dense, and per scheme with every layer that
    has that scheme factored at once (one graph per scheme, all profiled interleaved)."""
    graphs = {"dense": (bench.dense_path, bench.dense_nodes, list(options))}
    for scheme in sorted({s for o in options.values() for s in o}):
        selection = {n: scheme for n, o in options.items() if scheme in o}
        graphs[scheme] = (*bench.build(selection), list(selection))
    profiles = profile_node_times({k: g[0] for k, g in graphs.items()}, bench.feed, threads=1)
    out: dict[str, dict[str, float | None]] = {n: {} for n in options}
    for key, (_, nodes, names) in graphs.items():
        for n, t in layer_times(nodes, profiles[key], names).items():
            out[n][key] = t
    return out


def _times_alone(mod: nn.Module, schemes: dict, x) -> dict[str, float]:
    """Milliseconds of the layer and of each factored candidate, each alone as an int8 graph."""
    variants = {"dense": mod, **{s: build(copy.deepcopy(mod)) for s, (_, build) in schemes.items()}}
    return time_variants(variants, x, threads=1, qmax=weight_grid())


def _pick(times: dict[str, float | None], config: LowRankPruneConfig) -> tuple[str | None, float, float]:
    """(fastest scheme if it beats dense by min_gain else None, its speedup, time saved)."""
    dense = times["dense"]
    scheme = min((s for s in times if s != "dense"), key=lambda s: times[s])
    speedup = dense / times[scheme] if times[scheme] > 0 else float("inf")
    return (scheme if speedup >= 1.0 / (1.0 - config.min_gain) else None), speedup, dense - times[scheme]


def _choose_by_latency(model: nn.Module, options: dict, ctx: PruneContext, config: LowRankPruneConfig,
                       layers: dict, bench: _Bench | None) -> tuple[dict[str, str], dict[str, float]]:
    """(layer -> chosen scheme, layer -> measured time saved); the measurements and the reasons
    for the layers left dense go into `layers`."""
    in_model = _times_in_context(bench, options) if bench is not None else {}
    need_alone = [n for n in options if None in in_model.get(n, {None: None}).values()]
    inputs = layer_inputs(model, need_alone, ctx.example_inputs, ctx.run) if need_alone else {}
    choice, gains = {}, {}
    for name in track(ctx.progress, list(options), "per-layer latency (int8, 1 thread)", "layers"):
        entry = layers[name]
        if name in need_alone:
            if inputs.get(name) is None:
                entry["reason"] = "the example inputs never reach this layer: not timed, left dense"
                continue
            times = _times_alone(model.get_submodule(name), options[name], inputs[name])
            unit, where = "ms", "the layer alone as an int8 graph, fastest run"
        else:
            times, unit, where = in_model[name], "us", "in the whole int8 model: median kernel time (onnxruntime profiler)"
        scheme, speedup, saved = _pick(times, config)
        entry[f"latency_{unit}"] = {k: round(v, 5) for k, v in times.items()}
        entry.update(timing=where, speedup=round(speedup, 3))
        if scheme is None:
            entry["reason"] = (f"factored int8 graph not faster by {config.min_gain:.0%} "
                               f"(best speedup {speedup:.2f}x): left dense")
        else:
            choice[name] = scheme
            gains[name] = saved / 1000.0 if unit == "us" else saved  # ms
    return choice, gains


def _whole_model_check(bench: _Bench, choice: dict[str, str], gains: dict[str, float],
                       config: LowRankPruneConfig, layers: dict) -> tuple[dict[str, str], dict]:
    """Time the whole factored model against the dense one; revert the least-gain layers until it
    is faster by min_gain (or nothing is left)."""
    threshold = 1.0 / (1.0 - config.min_gain)

    def measure(kept: list[str]) -> dict:
        path, _ = bench.build({n: choice[n] for n in kept})
        return time_pair({"dense": bench.dense_path, "factored": path}, bench.feed, threads=1)

    order = sorted(choice, key=lambda n: gains[n])
    kept, trace = revert_until_faster(order, measure, threshold, config.max_checks)
    for record in trace:
        for name in record.get("reverted", []):
            layers[name]["reason"] = (
                f"whole-model check: the model with {record['factored']} factored layers measured "
                f"{record['speedup']:.2f}x the dense int8 model (< {threshold:.2f}x); this layer saved the least "
                f"({gains[name] * 1000:.1f} us in context), so it went back to dense")
    final = trace[-1] if kept else None
    summary = {"threshold": round(threshold, 4), "checks": trace, "speedup": final["speedup"] if final else None,
               "reverted": [n for r in trace for n in r.get("reverted", [])],
               "result": (f"factored model {final['speedup']:.2f}x the dense int8 model at 1 thread" if final else
                          "no factored set measured faster: everything left dense")}
    return {n: choice[n] for n in kept}, summary


@register("prune", "lowrank", LowRankPruneConfig,
          "low-rank factorization (SVD Linears, separable / channel convs, H-matrix with --lowrank-eps) where it "
          "measures faster")
def prune_lowrank(model: nn.Module, config: LowRankPruneConfig, ctx: PruneContext) -> PruneResult:
    skipped, layers, options = {}, {}, {}
    candidates = {n: m for n, m in ctx.layers.items() if config.convs or isinstance(m, nn.Linear)}
    for name, mod in ctx.layers.items():
        if name not in candidates:
            layers[name] = {"shape": list(mod.weight.shape), "params_before": mod.weight.numel(),
                            "params_after": mod.weight.numel(), "reason": "convolutions excluded (convs: false)"}
        elif (why := _unsupported(mod)) is not None:
            skipped[name] = why
    for name in track(ctx.progress, [n for n in candidates if n not in skipped], "low-rank factorization", "layers"):
        plans = plan_candidates(candidates[name], config)
        paying = {s: p for s, p in plans.items() if p[1] is not None}
        # the report shows the smallest paying candidate until a choice is made (or the first one's reason)
        shown = min(paying.values(), key=lambda p: p[0]["params_after"])[0] if paying else next(iter(plans.values()))[0]
        layers[name] = dict(shown)
        if len(plans) > 1:
            layers[name]["candidates"] = {s: {k: p[0].get(k) for k in ("rank", "rank_by_energy", "energy",
                                                                     "params_after", "relative_error", "reason")
                                              if k in p[0]} for s, p in plans.items()}
        if paying:
            options[name] = paying
    whole = None
    if config.decide == "params":
        choice = {n: min(o, key=lambda s: o[s][0]["params_after"]) for n, o in options.items()}
    else:
        with tempfile.TemporaryDirectory(prefix="sqexport-lowrank-") as tmp:
            bench = _Bench(model, options, ctx, Path(tmp)) if options and _in_context(ctx) else None
            choice, gains = _choose_by_latency(model, options, ctx, config, layers, bench)
            if bench is not None and config.whole_model and choice:
                choice, whole = _whole_model_check(bench, choice, gains, config, layers)
    for name, scheme in choice.items():
        entry, build = options[name][scheme]
        layers[name] = {**layers[name], **entry, "decision": "factored"}
        layers[name].pop("reason", None)
        replace_module(model, name, build(candidates[name]))
    for name in options:
        if name not in choice:  # the error it would have had stays in the report; the layer itself is exact
            layers[name].update(decision="dense", params_after=layers[name]["params_before"],
                                factored_relative_error=layers[name]["relative_error"], relative_error=0.0)
    for entry in layers.values():
        entry.setdefault("decision", "dense")
    return PruneResult(masks={}, speed_note=_speed_note(layers, whole), skipped=skipped,
                       extra={"lowrank": _summary(layers, config, whole)}, changed=bool(choice))


def _summary(layers: dict, config: LowRankPruneConfig, whole: dict | None) -> dict:
    before = sum(e["params_before"] for e in layers.values())
    after = sum(e["params_after"] for e in layers.values())
    return {"rank_energy": config.rank_energy, "rank_multiple": config.rank_multiple, "eps": config.eps,
            "conv_scheme": config.conv_scheme, "decide": config.decide,
            "factored": sorted(n for n, e in layers.items() if e["decision"] == "factored"),
            "dense": sorted(n for n, e in layers.items() if e["decision"] == "dense"),
            "params": {"before": before, "after": after, "ratio": after / max(1, before)},
            "whole_model": whole, "layers": layers}


def _speed_note(layers: dict, whole: dict | None) -> str:
    done = sum(e["decision"] == "factored" for e in layers.values())
    checked = f"; whole-model check: {whole['result']}" if whole else ""
    return (f"low-rank: {done} of {len(layers)} layers factored into plain smaller MatMul/Conv nodes "
            f"(fewer multiply-adds, kept only where the int8 timing showed it){checked}; the rest stay dense")
