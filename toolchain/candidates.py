"""The pieces of one `--auto` search level: the model pruned (and recovered) at one structured
sparsity, then written in each quantization mode and measured.

A level runs the pipeline's own steps (prune, recalibrate, recover, fold, transform,
export_prepared) over a RunState in a scratch folder, so a candidate is built exactly as a plain
run with the same settings would build it. What is shared instead of recomputed:

- the FP32 outputs of baseline.onnx on the evaluation data (one pass for the whole search);
- the pruned model of a level: recovery continues from it rather than pruning again;
- the folded, exported graph of a level and its quantization plan (every mode writes from it);
- the int8 parameters (calibration statistics) of a level: the fallback variant starts from them.
"""
from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sqexport.contracts.quant import QuantParams
from sqexport.contracts.tasks import get_task
from sqexport.runtime_check.accuracy import run_session, task_metrics
from sqexport.runtime_check.gates import evaluate_gates
from sqexport.runtime_check.latency import measure_pair
from sqexport.runtime_check.session import make_session
from sqexport.toolchain import pipeline
from sqexport.toolchain.quantization.fallback import FallbackPolicy
from sqexport.toolchain.quantize_step import (
    QuantPlan, compute_params, plan_quantization, settle_params, weight_range_info, write_model,
)
from sqexport.toolchain.recipe import Recipe, Stage

__all__ = ["Mode", "Built", "Evaluator", "PairTimer", "SCREEN_LATENCY_S", "pruned_level", "with_recovery", "finish_level", "write_mode",
           "dynamic_applicable"]


@dataclass(frozen=True)
class Mode:
    """How a level is written: `quant` is a registered quantize method or "none" (the pruned
    model in FP32); `fallback`: accuracy-aware fallback of the worst layers to FP32."""

    quant: str
    fallback: bool = False

    @property
    def label(self) -> str:
        return self.quant + (" +fallback" if self.fallback else "")


@dataclass
class Built:
    """One written candidate: its model file, the level state it came from, and what the report
    needs if it is chosen."""

    mode: Mode
    path: Path
    state: pipeline.RunState
    recipe: Recipe
    params: QuantParams | None
    quant_info: dict = field(default_factory=dict)


SCREEN_LATENCY_S = 3.0  # per candidate; the chosen one is measured again in full


@dataclass(frozen=True)
class PairTimer:
    """The candidates' latency screen: model vs baseline p50 ratio, interleaved, a short budget."""

    feed: dict
    threads: int

    def __call__(self, baseline: Path, model: Path) -> dict:
        return measure_pair(baseline, model, self.feed, self.threads, warmup=5, budget_s=SCREEN_LATENCY_S)


class Evaluator:
    """Accuracy of a candidate against baseline.onnx (FP32 outputs computed once) and its latency
    through `latency(baseline_path, model_path) -> measure_pair-like dict` (injectable: tests use
    a deterministic function instead of timing; None: PairTimer)."""

    def __init__(self, spec, baseline: Path, threads: int, gates, latency: Callable[[Path, Path], dict] | None):
        self.spec, self.baseline, self.threads, self.gates = spec, baseline, threads, gates
        self.latency = latency or PairTimer(spec.example_inputs, threads)
        self.base_out = run_session(make_session(baseline, threads), spec.eval_batches, spec.postprocess)

    def accuracy(self, model: Path) -> dict:
        out = run_session(make_session(model, self.threads), self.spec.eval_batches, self.spec.postprocess)
        return task_metrics(get_task(self.spec.task), self.base_out, out, self.spec.eval_labels)

    def __call__(self, model: Path) -> tuple[dict, dict, list[dict]]:
        accuracy = self.accuracy(model)
        latency = self.latency(self.baseline, model)
        return accuracy, latency, evaluate_gates(self.gates, accuracy, latency)

    def report_info(self) -> dict:
        """Extra fields for the report's `auto` section (where candidates were measured)."""
        return {}


def _recipe(base: Recipe, sparsity: float, recover: Stage | None) -> Recipe:
    from sqexport.toolchain.pruning.structured_stage import StructuredPruneConfig

    prune = Stage("prune", "structured", StructuredPruneConfig(sparsity=sparsity)) if sparsity > 0 else None
    return base.with_stage("prune", prune).with_stage("recover", recover if prune else None)


def _fresh_timer(state: pipeline.RunState) -> pipeline.StageTimer:
    timer = pipeline.StageTimer(state.progress)
    timer.records = list(state.timer.records)
    return timer


def pruned_level(base: Recipe, spec, sparsity: float, scratch: Path, threads: int, progress) -> pipeline.RunState:
    """The model pruned at `sparsity` (0: the dense copy) with BatchNorm re-estimated; not folded."""
    scratch.mkdir(parents=True, exist_ok=True)
    pipeline.seed_everything(base.seed)
    state = pipeline.RunState(_recipe(base, sparsity, None), spec, scratch, threads, pipeline.StageTimer(progress),
                              progress)
    pipeline.prune(state)
    pipeline.recalibrate(state)
    return state


def with_recovery(pruned: pipeline.RunState, recover: Stage, scratch: Path) -> pipeline.RunState:
    """A copy of a pruned level, fine-tuned (the pruned level itself stays as it was)."""
    scratch.mkdir(parents=True, exist_ok=True)
    pipeline.seed_everything(pruned.recipe.seed)
    sparsity = pruned.recipe.stage("prune").config.sparsity
    state = dataclasses.replace(pruned, recipe=_recipe(pruned.recipe, sparsity, recover), tmp=scratch,
                                work=copy.deepcopy(pruned.work), extra=dict(pruned.extra), notes=list(pruned.notes),
                                timer=_fresh_timer(pruned))
    pipeline.recover(state)
    return state


def finish_level(level: pipeline.RunState) -> tuple[pipeline.RunState, QuantPlan]:
    """Fold, transform and export a copy of the level; plan where int8 goes in its graph."""
    state = dataclasses.replace(level, work=copy.deepcopy(level.work), extra=dict(level.extra),
                                notes=list(level.notes), timer=_fresh_timer(level))
    pipeline.fold(state)
    pipeline.transform(state)
    pipeline.export_prepared(state)
    return state, plan_quantization(state.work, state.prepared, state.spec)


def dynamic_applicable(plan: QuantPlan) -> bool:
    """Dynamic int8 covers MatMul/Gemm only: worth a candidate when they are most of the layers."""
    return 2 * sum(a.dynamic_ok for a in plan.anchors) >= len(plan.anchors)


def write_mode(state: pipeline.RunState, plan: QuantPlan, mode: Mode, out: Path, accuracy_limit: float,
               cache: dict, baseline: Path | None = None) -> Built:
    """Write `state`'s level in `mode` to out/model.onnx. `cache` keeps each method's parameters
    for the level, so the fallback variant reuses the calibration of the plain one. `baseline`:
    the search's baseline.onnx (the fallback's confirmation measures against it)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    base = state.recipe
    if mode.quant == "none":
        shutil.copyfile(pipeline.prepared_file(state), path)
        recipe = base.with_stages("transform", []).with_stage("quantize", None)
        return Built(mode, path, state, recipe, None)
    from sqexport.toolchain.builtin_methods import lookup

    entry = lookup("quantize", mode.quant)
    current = base.stage("quantize")
    params_cfg = dict(current.config.__dict__) if current is not None and current.name == mode.quant else {}
    params_cfg["fallback"] = FallbackPolicy(enabled=mode.fallback)
    stage = Stage("quantize", mode.quant, entry.config_cls(**params_cfg))
    if mode.quant not in cache:
        cache[mode.quant] = compute_params(state.work, state.spec, stage, plan, base.target, state.progress)
    params, decisions = cache[mode.quant]
    info = {"quantized_layers": len(params.anchors), "merged_duplicate_nodes": plan.merged_duplicate_nodes,
            "weight_range": weight_range_info(params),
            "int8_embeddings": sorted(set(params.embeddings) & set(plan.embedding_sites)), **decisions}
    params, settled = settle_params(state.work, state.spec, stage, plan, state.prepared, params, accuracy_limit,
                                    base.target, state.progress, base.stage("prune") is None, mode.fallback, out,
                                    baseline)
    info.update(settled)
    write_model(state.prepared, plan, params, path, labels=state.spec.labels)
    return Built(mode, path, state, base.with_stage("quantize", stage), params, info)


def timed(fn: Callable, *args, **kwargs):
    """(result, seconds)"""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0


def metric_of(accuracy: dict) -> float | None:
    value = accuracy.get("model")
    return None if value is None or not np.isfinite(value) else float(value)
