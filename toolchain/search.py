"""`--auto`: the fastest model that passes the gates, searched over structured sparsity levels x
quantization modes x accuracy-aware fallback, within a time budget.

Order (cheapest first):
1. without recovery, sparsity levels ascending (0 = quantization only). Each level is pruned once,
   folded and exported once, and written in every mode: static int8, static int8 with fallback
   (only when plain int8 misses the accuracy gate), dynamic int8 (where MatMul/Gemm are most of
   the layers), and FP32 (pruned levels only: on some CPUs int8 kernels do not beat FP32 on
   narrow layers). The scan stops at the first level where no mode meets the accuracy gate:
   accuracy is assumed to fall monotonically with sparsity, so a sparser (faster) model would
   not pass either.
2. with distillation recovery (unless --no-recover), the levels above the last one that passed,
   ascending, each continuing from its pruned model with an equal share of the remaining budget;
   stopped the same way.
Every candidate's latency is a p50 ratio against baseline.onnx measured interleaved in its own
short run; the chosen one is then verified in full like any run. `frontier` in the report lists
every candidate measured (settings, ratio, metric, pass/fail, seconds) and `auto.why` the choice.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqexport.contracts.errors import ConfigError, SqexportError, first_line
from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.runtime_check.gates import accuracy_limit
from sqexport.runtime_check.session import default_threads
from sqexport.toolchain import pipeline
from sqexport.toolchain.candidates import (
    SCREEN_LATENCY_S, Built, Evaluator, Mode, dynamic_applicable, finish_level, metric_of, pruned_level, timed,
    with_recovery, write_mode,
)
from sqexport.toolchain.output_folder import atomic_output
from sqexport.toolchain.overrides import AUTO_CHOSEN_KEYS
from sqexport.toolchain.quantize_step import torch_reference
from sqexport.toolchain.recipe import Recipe, Stage
from sqexport.toolchain.recovery import RecoveryConfig

__all__ = ["AutoConfig", "run_auto", "check_auto_flags", "DEFAULT_LEVELS", "DEFAULT_MINUTES"]

DEFAULT_LEVELS = (0.0, 0.25, 0.5, 0.625, 0.75)
DEFAULT_MINUTES = 15.0  # 2 CPU cores: mnist-resnet needs about two recovered levels of a few minutes
MIN_RECOVERY_MINUTES = 0.25

# options that set what --auto chooses itself (option name -> flag): declared on Overrides, plus
# the recipe file, which would fix the stages
AUTO_CHOOSES = {name: "--" + name.replace("_", "-") for name in (*AUTO_CHOSEN_KEYS, "recipe")}


def check_auto_flags(given: list[str]) -> None:
    clash = [AUTO_CHOOSES[k] for k in AUTO_CHOOSES if k in given]
    if clash:
        raise ConfigError(f"--auto chooses pruning, sparsity, quantization and recovery budget itself; drop "
                          f"{', '.join(clash)} (or drop --auto)")


@dataclass(frozen=True)
class AutoConfig:
    """`minutes`: search budget (the final verification of the chosen model comes on top);
    `levels`: structured sparsity levels, ascending; `recover`: distillation for levels that miss
    the gate without it; `recover_data`: extra recovery data (as --recover-data)."""

    minutes: float = DEFAULT_MINUTES
    levels: tuple[float, ...] = DEFAULT_LEVELS
    recover: bool = True
    recover_data: str | None = None

    def __post_init__(self):
        if not self.minutes > 0:
            raise ConfigError(f"--auto-minutes must be > 0, got {self.minutes}")
        if not self.levels or list(self.levels) != sorted(set(self.levels)) or not all(0 <= s < 1 for s in self.levels):
            raise ConfigError(f"auto levels must be distinct, ascending, in [0, 1), got {self.levels}")


class _Search:
    def __init__(self, recipe: Recipe, spec, tmp: Path, threads: int, progress: Progress, config: AutoConfig,
                 evaluate: Evaluator):
        self.recipe, self.spec, self.tmp, self.threads = recipe, spec, tmp, threads
        self.progress, self.config, self.evaluate = progress, config, evaluate
        self.limit = accuracy_limit(recipe.gates, spec.task)
        self.t0 = time.monotonic()
        self.frontier: list[dict] = []
        self.built: dict[str, Built] = {}
        self.skipped: list[dict] = []

    def remaining_s(self) -> float:
        return self.config.minutes * 60.0 - (time.monotonic() - self.t0)

    def _modes(self, sparsity: float, plan) -> list[Mode]:
        modes = [Mode("int8")] if self.spec.calib_batches else []
        if dynamic_applicable(plan):
            modes.append(Mode("int8-dynamic"))
        return modes + ([Mode("none")] if sparsity > 0 else [])

    def _measure(self, built: Built, cid: str, sparsity: float, recovery: dict | None, seconds: float) -> dict:
        (accuracy, latency, checks), spent = timed(self.evaluate, built.path)
        acc_ok = all(c["passed"] for c in checks if c["name"] == "accuracy_drop")
        record = {"id": cid, "sparsity": sparsity, "recovered": recovery is not None,
                  "recover_minutes": recovery and recovery["minutes"], "quant": built.mode.quant,
                  "fallback": built.mode.fallback,
                  "fallback_layers": len(built.quant_info.get("fallback", [])),
                  "threads": latency["threads"], "speedup": latency["speedup"],
                  "p50_ms": latency["model"]["p50"], "baseline_p50_ms": latency["baseline"]["p50"],
                  "metric": metric_of(accuracy), "metric_name": accuracy["metric"], "unit": accuracy.get("unit"),
                  "drop": accuracy.get("drop"), "drop_unit": accuracy.get("drop_unit"),
                  "accuracy_passed": acc_ok, "passed": all(c["passed"] for c in checks),
                  "failed_checks": [c["name"] for c in checks if not c["passed"]],
                  "seconds": round(seconds + spent, 2)}
        if latency.get("node"):  # measured on a Ray node (toolchain/auto_ray.py)
            record["latency_node"] = latency["node"]
        self.frontier.append(record)
        self.built[cid] = built
        self.progress.message(f"auto: {cid}: {record['speedup']:.2f}x, {accuracy['metric']} "
                              f"{record['metric']}, drop {record['drop']}: {'pass' if record['passed'] else 'fail'}")
        return record

    def try_level(self, level: pipeline.RunState, sparsity: float, recovery: dict | None) -> bool | None:
        """Write and measure every mode of a level; True if any met the accuracy gate, None if the
        budget ran out before any was measured."""
        (state, plan), seconds = timed(finish_level, level)
        cache: dict = {}
        tag = f"s{sparsity:g}" + ("-recovered" if recovery else "")
        passed, measured = False, 0
        for mode in self._modes(sparsity, plan):
            # a level's first candidate is always measured: its pruning and recovery are paid for
            if measured and self.remaining_s() <= 0:
                self.skipped.append({"id": f"{tag}-{mode.label}", "reason": "time budget spent"})
                continue
            modes = [mode, dataclasses.replace(mode, fallback=True)] if mode.quant == "int8" else [mode]
            for variant in modes:
                cid = f"{tag}-{variant.label.replace(' +', '-')}"
                built, spent = timed(write_mode, state, plan, variant, self.tmp / "candidates" / cid, self.limit,
                                     cache, self.tmp / "baseline.onnx")
                if variant.fallback and not built.quant_info.get("fallback"):
                    # nothing returned to FP32: the same model as plain int8, not worth measuring again
                    why = built.quant_info.get("fallback_skipped") or "no layer needed to return to FP32"
                    self.skipped.append({"id": cid, "reason": f"fallback changed nothing: {why}"})
                    continue
                ok = self._measure(built, cid, sparsity, recovery, seconds + spent)["accuracy_passed"]
                seconds = 0.0  # the level's shared cost is counted once, with its first candidate
                passed, measured = passed or ok, measured + 1
                if ok:
                    break  # fallback only trades speed for accuracy: not needed when plain int8 passes
        return passed if measured else None

    def _recovery_stage(self, levels_left: int) -> tuple[Stage, dict]:
        share = self.remaining_s() / 60.0 / max(1, levels_left)
        minutes = max(MIN_RECOVERY_MINUTES, min(RecoveryConfig().minutes, share))
        config = RecoveryConfig(minutes=round(minutes, 3), data=self.config.recover_data)
        return Stage("recover", "distill", config), {"minutes": config.minutes}

    def _prune(self, s: float) -> pipeline.RunState:
        return pruned_level(self.recipe, self.spec, s, self.tmp / "scratch" / f"s{s:g}", self.threads, self.progress)

    def _unrecovered(self, s: float, pruned: dict) -> bool | None:
        pruned[s] = self._prune(s)
        return self.try_level(pruned[s], s, None)

    def _recovered(self, s: float, pruned: dict, levels_left: int) -> bool | None:
        stage, info = self._recovery_stage(levels_left)
        level = pruned.pop(s) if s in pruned else self._prune(s)
        return self.try_level(with_recovery(level, stage, self.tmp / "scratch" / f"s{s:g}-recovered"), s, info)

    def run(self) -> str:
        """Fill the frontier; return why the search stopped where it did."""
        pruned: dict[float, pipeline.RunState] = {}
        levels, last_ok, why = list(self.config.levels), None, "every level measured"
        for s in levels:
            if self.frontier and self.remaining_s() <= 0:
                why = f"time budget spent before sparsity {s:g}"
                break
            result = self._safe(s, self._unrecovered, s, pruned)
            if result is None:
                why = f"time budget spent at sparsity {s:g}"
                break
            if not result:
                why = (f"without recovery no mode met the accuracy gate at sparsity {s:g}; sparser levels are "
                       "assumed no better (accuracy falls with sparsity)")
                break
            last_ok = s
        todo = [s for s in levels if s > 0 and (last_ok is None or s > last_ok)] if self.config.recover else []
        for i, s in enumerate(todo):
            if self.remaining_s() <= 0:
                why += f"; time budget spent before recovering sparsity {s:g}"
                break
            result = self._safe(s, self._recovered, s, pruned, len(todo) - i)
            if result is None:
                why += f"; time budget spent at recovered sparsity {s:g}"
                break
            if not result:
                why += (f"; with recovery no mode met the accuracy gate at sparsity {s:g}; sparser levels "
                        "are assumed no better")
                break
        return why

    def _safe(self, s: float, fn: Callable, *args) -> bool | None:
        """A level that cannot be built (e.g. nothing prunable) ends the scan instead of the run."""
        try:
            return fn(*args)
        except SqexportError as exc:
            self.skipped.append({"id": f"s{s:g}", "reason": first_line(exc)})
            return False


def _choose(frontier: list[dict]) -> tuple[dict, str]:
    passing = [c for c in frontier if c["passed"]]
    if passing:
        best = max(passing, key=lambda c: c["speedup"])
        faster = [c for c in frontier if c["speedup"] > best["speedup"]]
        why = (f"fastest of {len(passing)} passing candidate(s): {best['id']} at {best['speedup']:.2f}x the FP32 "
               f"p50 ({best['threads']} thread(s), same run)")
        if faster:
            why += "; faster ones failed: " + ", ".join(f"{c['id']} ({', '.join(c['failed_checks'])})" for c in faster)
        return best, why
    # nothing passed: the candidate closest to passing (fewest failed gates, then smallest drop)
    best = min(frontier, key=lambda c: (len(c["failed_checks"]), c["drop"] if c["drop"] is not None else 1e9))
    return best, f"no candidate passed every gate; written: the closest, {best['id']}"


def _final_state(built: Built, tmp: Path, baseline_records: list) -> pipeline.RunState:
    state = built.state
    shutil.move(str(built.path), str(tmp / "model.onnx"))
    if built.params is None:
        work, spec = state.work, state.spec
        reference = lambda b: spec.torch_outputs(work, b)  # noqa: E731 (the FP32 pruned model)
    else:
        reference = torch_reference(state.work, state.spec, built.params, state.progress)
    timer = pipeline.StageTimer(state.progress)
    timer.records = baseline_records + state.timer.records
    return dataclasses.replace(state, tmp=tmp, recipe=built.recipe, reference=reference,
                               quant_info=built.quant_info, timer=timer, extra=dict(state.extra),
                               notes=list(state.notes))


def run_auto(recipe: Recipe, spec, outdir: Path, progress: Progress = NULL_PROGRESS,
             config: AutoConfig = AutoConfig(), latency: Callable[[Path, Path], dict] | None = None,
             evaluator: Callable[..., Evaluator] = Evaluator) -> dict:
    """Search, write the chosen candidate as the output folder's model, verify it, report.
    `evaluator(spec, baseline, threads, gates, latency)` measures candidates: here by default,
    or as Ray tasks (toolchain/auto_ray.py)."""
    recipe = dataclasses.replace(recipe, auto_sparsity=False)  # the search sets every level's amount itself
    pipeline.seed_everything(recipe.seed)
    with atomic_output(outdir, progress.message) as tmp:
        threads = recipe.threads or default_threads()
        base = pipeline.RunState(recipe, spec, tmp, threads, pipeline.StageTimer(progress), progress)
        pipeline.export_baseline(base)
        evaluate = evaluator(spec, tmp / "baseline.onnx", threads, recipe.gates, latency)
        search = _Search(recipe, spec, tmp, threads, progress, config, evaluate)
        stopped = search.run()
        if not search.frontier:
            raise ConfigError("--auto could not build any candidate: " +
                              "; ".join(f"{s['id']}: {s['reason']}" for s in search.skipped))
        chosen, why = _choose(search.frontier)
        for c in search.frontier:
            c["chosen"] = c is chosen
        state = _final_state(search.built[chosen["id"]], tmp, base.timer.records)
        search.built.clear()
        shutil.rmtree(tmp / "candidates", ignore_errors=True)
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        state.extra["frontier"] = search.frontier
        state.extra["auto"] = {"chosen": chosen["id"], "why": why, "stopped": stopped, "skipped": search.skipped,
                               "budget_minutes": config.minutes, "levels": list(config.levels),
                               "seconds": round(time.monotonic() - search.t0, 1),
                               "latency_screen": "each candidate: p50 ratio vs baseline.onnx, interleaved, "
                                                 f"{SCREEN_LATENCY_S:g} s; the chosen model is measured again below",
                               **evaluate.report_info()}
        state.notes.append(f"--auto: {why}")
        pipeline.verify(state)
        pipeline.package(state)
        pipeline.report(state)
    return state.report
