"""run(recipe, spec, outdir) -> report: the named STEPS below, in order, over one RunState.

Everything is built in a temporary folder next to `outdir` and renamed into place at the end, so
a failed or interrupted run never leaves a half-written output folder behind.
"""
from __future__ import annotations

import dataclasses
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import torch

from sqexport.contracts.progress import NULL_PROGRESS, Progress, track
from sqexport.contracts.quant import ObservedRanges
from sqexport.contracts.tasks import get_task
from sqexport.contracts.targets import get_target
from sqexport.exporters.bundle import build_bundle
from sqexport.exporters.export import exporter_for
from sqexport.exporters.sparse import sizes_measured_meanwhile, store_sparse
from sqexport.models.spec import ModelSpec
from sqexport.runtime_check.gates import accuracy_limit, evaluate_gates, slower_note
from sqexport.runtime_check.report import write_report
from sqexport.runtime_check.report_schema import SCHEMA_VERSION
from sqexport.runtime_check.session import default_threads
from sqexport.runtime_check.sparse_check import storage_diff
from sqexport.runtime_check.verify import accuracy_of, fidelity_of, latency_of, latency_sessions, sizes_of
from sqexport.contracts.errors import DataError
from sqexport.toolchain import signals
from sqexport.toolchain.bn_recalibration import recalibrate_batchnorm
from sqexport.toolchain.builtin_methods import lookup
from sqexport.toolchain.folding import copy_for_compression, fold_batchnorm
from sqexport.toolchain.reparam import merge_parallel_branches
from sqexport.toolchain.mobile_step import mobile_step
from sqexport.toolchain.order import DEFAULT_ORDER, order_errors, quantize_layers_
from sqexport.toolchain.prepared_graph import BaselineGraph, GraphMismatch, derive_prepared, keep_baseline, recipe_blocker
from sqexport.runtime_check.isa import weight_grid
from sqexport.toolchain.output_folder import atomic_output
from sqexport.toolchain.pruning import layer_sparsity, overall_sparsity, prunable_layers
from sqexport.toolchain.quantize_step import quantize_to_onnx
from sqexport.toolchain.recipe import Recipe, Stage
from sqexport.toolchain.quantization.fallback import FallbackPolicy
from sqexport.toolchain.sparsity_search import choose_sparsity
from sqexport.toolchain.recover_step import make_fine_tune
from sqexport.toolchain.stage_meter import measured_stage
from sqexport.toolchain.stages import PruneContext, RecoverContext, TransformContext

__all__ = ["run", "RunState", "STEPS", "StageTimer", "seed_everything", "prepared_file"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StageTimer:
    """Times each stage, measures its peak memory, reports it as progress and records it for the report."""

    def __init__(self, progress: Progress):
        self.records, self.progress = [], progress

    @contextmanager
    def stage(self, name: str, params: dict | None = None):
        record = {"name": name, "params": dict(params or {}), "seconds": 0.0, "peak_rss_mb": None}
        cpu0 = time.process_time()
        with measured_stage(self.progress, name) as meter:
            yield record
            signals.check()  # a signal some library swallowed still ends the run here
        # CPU seconds of this process (all its threads): on a shared machine wall time counts
        # the waits for a core, CPU time only the work
        record.update(seconds=round(meter.seconds, 3), peak_rss_mb=meter.peak_rss_mb,
                      cpu_seconds=round(time.process_time() - cpu0, 3))
        self.records.append(record)


@dataclass
class Measured:
    """What verify measured on onnxruntime: the report's accuracy, fidelity, latency_ms and size_bytes."""

    accuracy: dict
    fidelity: dict
    latency: dict
    sizes: dict


@dataclass
class RunState:
    """What the steps hand on to each other; one run, one state."""

    recipe: Recipe
    spec: ModelSpec
    tmp: Path  # the output folder being built
    threads: int
    timer: StageTimer
    progress: Progress
    work: torch.nn.Module | None = None  # the copy being compressed (the user's model is never touched)
    layers: dict = field(default_factory=dict)  # its prunable layers
    masks: dict = field(default_factory=dict)  # layer -> 1 = kept, from the prune stages (recovery keeps them)
    notes: list[str] = field(default_factory=list)
    sparsity: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # report sections methods add (structure, recovery)
    # min-max ranges of `work` on the calibration data that the last transform stage observed in
    # its own pass (TransformResult.ranges); the quantize stage's calibration reads them
    observed_ranges: ObservedRanges | None = None
    prepared: onnx.ModelProto | None = None  # FP32 export of `work`, where int8 gets written
    reference: Callable | None = None  # torch model that model.onnx must reproduce
    quant_info: dict = field(default_factory=dict)
    measured: Measured | None = None  # verify's numbers, the report's core
    report: dict | None = None
    input_shapes: dict = field(default_factory=dict)  # --input-shape, for the mobile model
    storage: dict = field(default_factory=dict)  # sparse initializer storage of model.onnx
    mobile: dict | None = None  # the report's `mobile` section (--target mobile)
    checks: list = field(default_factory=list)  # checks steps add beside the recipe's gates
    # the caller hands the run its model (the CLI loaded it for this run alone): without pruning
    # or recovery nothing needs the untouched FP32 model once baseline.onnx is written, so `work`
    # is that model itself instead of a second copy (BERT-base: 440 MB less at the peak)
    model_disposable: bool = False
    # a prune stage (or q_then_s) changed `work`: recovery has something to recover
    pruned: bool = False
    # re-estimate BatchNorm statistics after pruning; the sparsity search turns it off where keeping
    # the model's own statistics measured better (sparsity_search.py)
    recalibrate_batchnorm: bool = True
    # export.model may write prepared.onnx from the baseline graph instead of exporting again
    # (toolchain/prepared_graph.py); run() allows it, a state built elsewhere (--auto levels,
    # which have no baseline graph of their own) exports
    derive_prepared: bool = False
    baseline_graph: BaselineGraph | None = None  # kept from export.baseline for that
    derive_skipped: str | None = None  # why prepared.onnx is exported after all


def _needs_calibration(state: RunState, stage) -> None:
    if stage.config.requires_calibration and not state.spec.calib_batches:
        raise DataError(f"{stage.qualified} needs calibration data; pass --calib-data")


def export_baseline(state: RunState) -> None:
    exporter = exporter_for(state.spec)
    with state.timer.stage("export.baseline", {"exporter": exporter.name}):
        graph = exporter.export(state.spec, state.spec.model, state.tmp / "baseline.onnx")
        if state.derive_prepared:
            state.derive_skipped = recipe_blocker(state.recipe)
            if state.derive_skipped is None:  # located now: later stages may change these very weights
                try:
                    state.baseline_graph = keep_baseline(graph, state.spec.model)
                except GraphMismatch as exc:
                    state.derive_skipped = f"{exc}: exported"


def _merge_masks(state: RunState, masks: dict) -> None:
    """AND of every prune stage's masks; a layer whose shape changed since keeps only the new one."""
    for name, mask in masks.items():
        old = state.masks.get(name)
        state.masks[name] = mask.bool() & old if old is not None and old.shape == mask.shape else mask.bool()


def _work_copy(state: RunState) -> torch.nn.Module:
    """The model the run compresses: the user's own when it is disposable and no later step reads
    the FP32 original (pruning and recovery compare against it, q_then_s re-prunes a copy)."""
    recipe = state.recipe
    needs_original = (recipe.stage("prune") is not None or recipe.stage("recover") is not None
                      or recipe.order != DEFAULT_ORDER)
    if not state.model_disposable or needs_original:
        return copy_for_compression(state.spec.model)
    work = state.spec.model.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    return work


def prune(state: RunState) -> None:
    spec = state.spec
    state.work = _work_copy(state)
    state.layers = prunable_layers(state.work, spec.prune_prefix)
    dense = {n: m.weight.numel() for n, m in state.layers.items()}  # structured pruning shrinks them
    exporter = exporter_for(spec)
    skipped = []  # layers a method could not prune, with its reason (never a silent 0)
    dense_weights = _quantize_first(state)
    for stage in state.recipe.stages_of("prune"):
        _needs_calibration(state, stage)

        def context(layers):
            return PruneContext(layers, spec.calib_batches, spec.torch_outputs, state.progress, spec.example_inputs,
                                lambda model, path: exporter.export(spec, model, path), state.threads,
                                make_fine_tune(spec, state.recipe.seed, state.progress) if spec.calib_batches else None,
                                state.recipe.seed,
                                (lambda: spec.recover_data()[0]) if spec.recover_data is not None else None)
        if state.recipe.auto_sparsity and stage is state.recipe.stage("prune"):
            stage = _choose_sparsity(state, stage, context)
        with state.timer.stage(stage.qualified, stage.to_dict()["params"]) as rec:
            result = lookup("prune", stage.name).handler(state.work, stage.config, context(state.layers))
            if dense_weights and result.masks:  # methods that remove structure have no masks to compare
                _compare_orders(state, stage, dense_weights, result.masks, context)
            # structured pruning may replace modules (transformers' prune_heads builds new Linears)
            state.layers = prunable_layers(state.work, spec.prune_prefix)
            rec["params"]["achieved_sparsity"] = round(overall_sparsity(state.layers, dense), 6)
        state.notes.append(result.speed_note)
        state.pruned |= result.changed and not _keeps_every_weight(result)
        state.extra.update(result.extra)
        _merge_masks(state, result.masks)
        for name, why in result.skipped.items():
            skipped.append({"layer": name, "stage": stage.qualified, "reason": why})
            state.notes.append(f"{stage.qualified} skipped {name}: {why}")
    state.sparsity = {"overall": overall_sparsity(state.layers, dense), "layers": layer_sparsity(state.layers, dense),
                      "skipped": skipped}


def _keeps_every_weight(result) -> bool:
    """Masks that keep every weight (a mask method at sparsity 0): the model is the dense one, and
    nothing after it (BatchNorm re-estimation, recovery) may treat it as pruned. Methods that
    remove structure say so themselves (PruneResult.changed)."""
    return bool(result.masks) and all(bool(m.all()) for m in result.masks.values())


def _choose_sparsity(state: RunState, stage: Stage, context) -> Stage:
    """The amount nobody gave: measured on the evaluation split (sparsity_search.py); the recipe
    (and so report.json's recipe) then holds the chosen value."""
    spec = state.spec
    limit = accuracy_limit(state.recipe.gates, spec.task)
    with state.timer.stage("choose_sparsity") as rec:
        choice = choose_sparsity(spec, stage, context, lookup("prune", stage.name).handler, limit,
                                 spec.prune_prefix, state.progress, _fidelity_floor(state.recipe))
        rec["params"].update(chosen=choice.sparsity, tried=len(choice.trace))
    chosen = Stage(stage.kind, stage.name, dataclasses.replace(stage.config, sparsity=choice.sparsity))
    state.recipe = state.recipe.with_stage("prune", chosen)
    state.extra["sparsity_choice"] = choice.to_report(limit, get_task(spec.task).unit)
    state.recalibrate_batchnorm = choice.recalibrate_batchnorm
    state.notes.append(f"{stage.qualified}: sparsity {choice.sparsity:.2f} chosen on {choice.samples} evaluation "
                       f"and {choice.calibration_samples} calibration sample(s): {choice.why}")
    state.progress.message(f"{stage.qualified}: sparsity {choice.sparsity:.2f} ({choice.why})")
    return chosen


def _fidelity_floor(recipe) -> float:
    """The int8 stage's fidelity floor (fallback.min_cosine), whose share the chosen pruning amount
    may use; the default floor when nothing quantizes or the method has no fallback."""
    quant = recipe.stage("quantize")
    policy = getattr(quant.config, "fallback", None) if quant is not None else None
    return policy.min_cosine if isinstance(policy, FallbackPolicy) else FallbackPolicy().min_cosine


def _quantize_first(state: RunState) -> dict:
    """`order: q_then_s`: fake-quantize the prunable weights before pruning (toolchain/order.py);
    returns the FP32 weights for the error comparison (empty in the default S->Q order)."""
    if state.recipe.order == DEFAULT_ORDER:
        return {}
    dense = {n: m.weight.detach().clone() for n, m in state.layers.items()}
    quantize_layers_(state.layers, weight_grid(state.recipe.target))
    state.pruned = True
    state.notes.append("order q_then_s (study option): weights were quantized before pruning")
    return dense


def _compare_orders(state: RunState, stage, dense: dict, masks_qs: dict, context) -> None:
    """The report's `order` section: per-layer weight error of S->Q and of Q->S. S->Q's masks come
    from the same method run on a fresh FP32 copy (mask methods only: methods that remove
    structure have no masks to compare)."""
    copy = copy_for_compression(state.spec.model)
    layers = prunable_layers(copy, state.spec.prune_prefix)
    masks_sq = lookup("prune", stage.name).handler(copy, stage.config, context(layers)).masks
    errors = order_errors(dense, masks_sq, masks_qs, weight_grid(state.recipe.target))
    total = {k: float(sum(e[k] ** 2 for e in errors.values()) ** 0.5) for k in ("s_then_q", "q_then_s")}
    state.extra["order"] = {"order": state.recipe.order, "qmax": weight_grid(state.recipe.target).qmax,
                            "weight_error": {"total": total, "layers": errors}}


def recalibrate(state: RunState, after_recovery: bool = False) -> None:
    """Pruning shifts activation statistics: re-estimate BatchNorm's before folding it, unless
    nothing was pruned or the sparsity search measured the model's own statistics better (recovery
    moved the weights: then always)."""
    if state.recipe.stage("prune") is None or not state.pruned:
        return
    if not (state.recalibrate_batchnorm or after_recovery):
        state.notes.append("BatchNorm statistics kept: on the evaluation split the pruned model dropped less with its "
                           "own statistics than with statistics re-estimated on the calibration data")
        return
    with state.timer.stage("recalibrate_batchnorm") as rec:
        batches = track(state.progress, state.spec.calib_batches, "BatchNorm statistics", "batches")
        rec["params"]["layers"] = recalibrate_batchnorm(state.work, batches, state.spec.torch_outputs)


def recover(state: RunState) -> None:
    """Fine-tune the pruned copy; its BatchNorm statistics then move again."""
    stage = state.recipe.stage("recover")
    if stage is None:
        return
    if not state.pruned:  # distilling the model from itself: minutes of steps that change nothing
        why = "no prune stage changed the model (e.g. prune.lowrank factored no layer)"
        state.extra["recovery"] = {"steps": 0, "skipped": why}
        state.notes.append(f"{stage.qualified} skipped: {why}")
        with state.timer.stage(stage.qualified, {**stage.to_dict()["params"], "steps_run": 0, "skipped": why}):
            pass
        return
    _needs_calibration(state, stage)
    with state.timer.stage(stage.qualified, stage.to_dict()["params"]) as rec:
        ctx = RecoverContext(state.spec, state.recipe.seed, state.progress, state.masks)
        state.extra["recovery"] = lookup("recover", stage.name).handler(state.work, stage.config, ctx)
        rec["params"]["steps_run"] = state.extra["recovery"]["steps"]
    recalibrate(state, after_recovery=True)


def fold(state: RunState) -> None:
    with state.timer.stage("fold_batchnorm") as rec:
        before = state.work
        state.work, rec["params"]["folded"] = fold_batchnorm(state.work)
        # with the norms folded, parallel conv branches are linear in their input: one conv each
        state.work, rec["params"]["merged_branches"] = merge_parallel_branches(state.work)
    if (state.work is not before or rec["params"]["merged_branches"]) and state.baseline_graph is not None:
        state.baseline_graph = None  # torch.fx rebuilt the model: only an export shows its graph
        state.derive_skipped = (f"fold_batchnorm rebuilt the model with torch.fx ({rec['params']['folded']} "
                                f"BatchNorm layer(s) folded, {rec['params']['merged_branches']} branch sum(s) "
                                "merged): it is exported")


def transform(state: RunState) -> None:
    for stage in state.recipe.stages_of("transform"):
        _needs_calibration(state, stage)
        ctx = TransformContext(state.spec.calib_batches, state.spec.torch_outputs, state.progress)
        with state.timer.stage(stage.qualified, stage.to_dict()["params"]) as rec:
            result = lookup("transform", stage.name).handler(state.work, stage.config, ctx)
            state.work = result.model
            state.observed_ranges = result.ranges  # a later transform without ranges invalidates them
            rec["params"].update(result.info)


def _derived(state: RunState, params: dict) -> onnx.ModelProto | None:
    """The graph of `work` written from the baseline graph (prepared_graph.py), or None with the
    reason in `params`. The baseline graph is given up either way: it becomes prepared.onnx, or
    nothing reads it again."""
    baseline, state.baseline_graph = state.baseline_graph, None
    if baseline is None:
        params["derive_skipped"] = state.derive_skipped or "no baseline graph was kept in this run: exported"
        return None
    try:
        graph, groups = derive_prepared(baseline, state.work)
    except GraphMismatch as exc:
        params["derive_skipped"] = f"{exc}: exported"
        return None
    params.update(derived_from="baseline.onnx", smoothed_groups=groups)
    return graph


def export_prepared(state: RunState) -> None:
    exporter = exporter_for(state.spec)
    with state.timer.stage("export.model", {"exporter": exporter.name}) as rec:
        # an export keeps one core busy: baseline.onnx is deflated for verify.sizes on the other
        # meanwhile (the same numbers, measured earlier; this stage's CPU seconds include it)
        with sizes_measured_meanwhile(state.tmp / "baseline.onnx"):
            # derived: prepared.onnx is written only if something reads the file (prepared_file)
            state.prepared = _derived(state, rec["params"])
            if state.prepared is None:
                state.prepared = exporter.export(state.spec, state.work, state.tmp / "prepared.onnx")
        rec["params"]["meanwhile"] = "baseline.onnx deflated for verify.sizes"


def prepared_file(state: RunState) -> Path:
    """prepared.onnx on disk: an exported graph is there already, a derived one is written now."""
    path = state.tmp / "prepared.onnx"
    if not path.exists():
        onnx.save(state.prepared, str(path))
    return path


def quantize(state: RunState) -> None:
    spec, work, quant = state.spec, state.work, state.recipe.stage("quantize")
    if quant is None:
        prepared_file(state).rename(state.tmp / "model.onnx")
        state.reference = lambda b: spec.torch_outputs(work, b)
        return
    with state.timer.stage(quant.qualified, quant.to_dict()["params"]) as rec:
        limit = accuracy_limit(state.recipe.gates, spec.task)
        state.reference, info = quantize_to_onnx(work, spec, quant, state.prepared, state.tmp / "model.onnx",
                                                 limit, state.recipe.target, state.progress,
                                                 work_is_dense=not state.pruned,
                                                 consume_prepared=True, observed_ranges=state.observed_ranges)
        state.prepared = None  # rewritten into model.onnx: nothing reads the FP32 graph again
        rec["params"]["quantized_layers"] = info["quantized_layers"]
        if info.get("fallback"):
            state.notes.append(f"accuracy-aware fallback: {len(info['fallback'])} layer(s) kept in FP32: "
                               + ", ".join(f["layer"] for f in info["fallback"]))
        ranges = info.get("range_choice") or {}
        if ranges.get("chosen") == "percentile":
            errors = ranges["output_error"]
            state.notes.append(f"activation ranges: the {ranges['percentile']:g}th percentile, not min-max: its int8 "
                               f"outputs on {ranges['samples']} calibration samples were "
                               f"{errors['percentile'] / errors['minmax']:.2f}x as far from FP32 (1 - cosine)")
        speed = info.get("speed_check") or {}
        if speed.get("kept_fp32"):
            state.notes.append(f"speed check: {', '.join(speed['kept_fp32'])} kept in FP32; with them in FP32 the "
                               f"whole model measured {speed['gain']:.2f}x as fast as all int8 on this host")
        floor = info.get("fidelity_floor") or {}
        if floor.get("why"):
            state.notes.append(f"fidelity floor: {floor['why']}")
        confirmation = info.get("fallback_confirmation") or {}
        if confirmation.get("added_layers"):
            state.notes.append(f"accuracy fallback confirmed on the evaluation split: {confirmation['why']}")
        cap = info.get("fallback_cap") or {}
        drop_kind = "measured (evaluation split)" if confirmation else "predicted"
        if cap.get("raised"):
            state.notes.append(f"fallback cap raised from {cap['max_layers']} to {cap['used']} of {cap['layers']} "
                               f"layers because the {drop_kind} drop still exceeded the limit: accuracy traded "
                               "for speed")
        if cap and not cap["holds"]:
            last = confirmation["drop"] if confirmation else info["predicted_drop_trace"][-1]
            state.notes.append(f"fallback stopped at {cap['used']} of {cap['layers']} layers in FP32 with the "
                               f"{drop_kind} drop {last:.4g} still above the limit")
    state.quant_info = info
    (state.tmp / "prepared.onnx").unlink(missing_ok=True)  # a derived graph was never written


def sparse_storage(state: RunState) -> None:
    """Pruned initializers stored sparse where smaller; onnxruntime densifies them at load, which
    is checked here on the eval data (bit-identical outputs expected)."""
    path = state.tmp / "model.onnx"
    with state.timer.stage("export.sparse_storage") as rec:
        dense_bytes = path.read_bytes()
        state.storage = store_sparse(path)
        rec["params"]["sparse_initializers"] = len(state.storage["initializers"])
        if state.storage["used"]:
            state.storage["outputs_vs_dense"] = storage_diff(dense_bytes, path, state.spec.eval_batches)
    if state.storage["used"]:
        st = state.storage
        # "pruned" only when pruning made the zeros: int8 rounding alone can zero a quarter of a
        # kernel whose channel range one large tap sets (RepVGG's merged identity)
        kind = "pruned initializer(s)" if state.pruned else "initializer(s) with enough zeros"
        state.notes.append(f"{len(st['initializers'])} {kind} stored as ONNX sparse initializers "
                           f"(int64 indices): model.onnx {st['dense']['raw']:,} -> {st['sparse']['raw']:,} bytes; "
                           "onnxruntime densifies them at load, so the outputs are unchanged")


def _pooling_record(spec: ModelSpec) -> dict:
    """Which pooling the embedding metric used, where it came from, and whether model.onnx has it."""
    pooling = spec.pooling
    exported = pooling.from_config and "attention_mask" in spec.input_names
    return {**pooling.to_dict(), "onnx_output": "sentence_embedding" if exported else None}


def verify(state: RunState) -> None:
    spec, tmp, threads, progress = state.spec, state.tmp, state.threads, state.progress
    with state.timer.stage("verify.accuracy"):
        sessions = latency_sessions(tmp / "baseline.onnx", tmp / "model.onnx", threads)
        accuracy, onnx_out = accuracy_of(spec, tmp / "baseline.onnx", tmp / "model.onnx", threads, progress, sessions)
        fidelity = fidelity_of(spec, state.reference, onnx_out, progress)
    if spec.pooling is not None:
        accuracy["pooling"] = _pooling_record(spec)
    with state.timer.stage("verify.latency", {"threads": threads}):
        latency = latency_of(spec, tmp / "baseline.onnx", tmp / "model.onnx", threads, progress, sessions)
    with state.timer.stage("verify.sizes"):
        sizes = sizes_of(tmp / "baseline.onnx", tmp / "model.onnx", progress)
    state.measured = Measured(accuracy, fidelity, latency, sizes)


def package(state: RunState) -> None:
    """What an app needs beside model.onnx (the tokenizer of a Hugging Face model)."""
    files = exporter_for(state.spec).artifacts(state.spec, state.tmp)
    if get_target(state.recipe.target).app_bundle:
        limit = accuracy_limit(state.recipe.gates, state.spec.task)
        state.mobile, checks = mobile_step(state.spec, state.tmp, state.input_shapes, limit, state.timer.stage, files)
        state.checks += checks
        sizes = sizes_of(state.tmp / "baseline.onnx", state.tmp / "model.onnx")  # model.onnx: fixed shapes now
        sizes.update(ort=state.mobile["sizes"]["ort"]["raw"], ort_compressed=state.mobile["sizes"]["ort"]["compressed"])
        state.measured.sizes = sizes
    if state.storage:
        state.measured.sizes.update(model_dense=state.storage["dense"]["raw"],
                                       model_dense_compressed=state.storage["dense"]["compressed"])


def with_method_sections(core: dict, sections: dict) -> dict:
    """The report: core sections, then the ones methods added. A method's section never replaces a
    core one (a `**extra` spread once could overwrite `accuracy` silently): that is a bug, raised."""
    clash = sorted(core.keys() & sections.keys())
    if clash:
        raise RuntimeError(f"report sections set twice (a method's section names a core one): {', '.join(clash)}")
    return {**core, **sections}


def report(state: RunState) -> None:
    m, recipe, spec = state.measured, state.recipe, state.spec
    note = slower_note(m.latency)
    if note:
        state.notes.append(note)
    checks = evaluate_gates(recipe.gates, m.accuracy, m.latency) + state.checks
    core = {
        "schema_version": SCHEMA_VERSION,
        "model": spec.name, "target": recipe.target, "passed": all(c["passed"] for c in checks),
        "stages": state.timer.records, "sparsity": state.sparsity, "size_bytes": m.sizes,
        "accuracy": m.accuracy, "fidelity": m.fidelity, "sparse_storage": state.storage,
        "quantization": state.quant_info,
        "latency_ms": m.latency, "checks": checks, "notes": state.notes,
        "recipe": recipe.to_dict(), "task": spec.task, "data": spec.data_info,
        **({"source": spec.source} if spec.source else {}),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    state.report = with_method_sections(core, state.extra)
    if state.mobile is not None:
        state.report["mobile"] = state.mobile
        state.mobile["bundle"] = build_bundle(state.tmp, state.report)
    write_report(state.report, state.tmp)


STEPS = (export_baseline, prune, recalibrate, recover, fold, transform, export_prepared, quantize, sparse_storage,
         verify, package, report)


def run(recipe: Recipe, spec: ModelSpec, outdir: Path, progress: Progress = NULL_PROGRESS,
        input_shapes: dict | None = None, model_disposable: bool = False) -> dict:
    """`input_shapes` (from --input-shape) fixes the mobile model's inputs; default: the spec's example.
    `model_disposable`: spec.model was loaded for this run alone and may be changed by it (saves a
    copy of the model where nothing needs the original; see RunState.model_disposable)."""
    seed_everything(recipe.seed)
    with atomic_output(outdir, progress.message) as tmp:
        state = RunState(recipe, spec, tmp, recipe.threads or default_threads(), StageTimer(progress), progress,
                         input_shapes=dict(input_shapes or {}), model_disposable=model_disposable,
                         derive_prepared=True)
        state.notes += spec.data_info.get("notes", [])  # e.g. synthetic data: said first
        for step in STEPS:
            step(state)
    return state.report
