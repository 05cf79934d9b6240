"""Accuracy, fidelity, latency and size of baseline.onnx vs model.onnx: the report's numbers."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from sqexport.contracts.progress import NULL_PROGRESS, Progress, track
from sqexport.exporters.sparse import file_sizes
from sqexport.models.spec import ModelSpec, first_samples
from sqexport.contracts.tasks import get_task
from sqexport.runtime_check.accuracy import run_session, task_metrics
from sqexport.runtime_check.latency import measure_pair
from sqexport.runtime_check.other_outputs import keeping_rest, other_outputs
from sqexport.runtime_check.session import make_session

__all__ = ["FIDELITY_SAMPLES", "accuracy_of", "fidelity_batches", "fidelity_of", "latency_of", "latency_sessions",
           "sizes_of"]

# Evaluation samples the onnxruntime-vs-torch fidelity check covers. It checks that the int8
# kernels compute what the torch fake-quant model computes (a systematic disagreement, e.g. int16
# saturation, shows on every sample), not accuracy, which the task metric measures on all of them;
# the torch fake-quant pass over every evaluation batch was ~15% of quantize.int8 (BERT-base size).
FIDELITY_SAMPLES = 32


def fidelity_batches(spec: ModelSpec) -> list[dict]:
    """The leading evaluation batches holding FIDELITY_SAMPLES samples (all if there are fewer)."""
    return first_samples(spec.eval_batches, FIDELITY_SAMPLES)


def latency_sessions(baseline: Path, model: Path, threads: int) -> dict:
    """The pair of sessions latency_of measures first, made once so accuracy_of can run on them
    too (loading and optimizing a 440 MB graph takes seconds); spinning off as latency needs it."""
    return {"baseline": make_session(baseline, threads, spinning=False),
            "model": make_session(model, threads, spinning=False)}


def accuracy_of(spec: ModelSpec, baseline: Path, model: Path, threads: int,
                progress: Progress = NULL_PROGRESS, sessions: dict | None = None) -> tuple[dict, np.ndarray]:
    """Metrics of model.onnx against baseline.onnx on the eval batches; also returns model outputs.
    `sessions` (latency_sessions) are used instead of new ones when given."""
    sessions = sessions or {}
    base_session = sessions.get("baseline") or make_session(baseline, threads)
    model_session = sessions.get("model") or make_session(model, threads)
    extra: dict[str, list] = {"baseline": [], "model": []}  # outputs after the first, which the metric does not read
    base_out = run_session(base_session, track(progress, spec.eval_batches, "evaluation baseline.onnx", "batches"),
                           keeping_rest(spec.postprocess, extra["baseline"]))
    model_out = run_session(model_session, track(progress, spec.eval_batches, "evaluation model.onnx", "batches"),
                            keeping_rest(spec.postprocess, extra["model"]))
    metrics = task_metrics(get_task(spec.task), base_out, model_out, spec.eval_labels)
    views = (getattr(spec, "data_info", None) or {}).get("eval", {}).get("views", 1)
    names = [o.name for o in model_session.get_outputs()]
    others = other_outputs(names[1:], extra["baseline"], extra["model"])
    if others:
        metrics["other_outputs"] = others
    return {**metrics, **sample_evidence(metrics, views)}, model_out


def sample_evidence(metrics: dict, views: int = 1) -> dict:
    """How much one sample moves a top-1 metric: with few evaluation samples a gate in points can
    only be met or missed in steps of 100 / N, which the report must say. With `views` per image
    the samples are views of N / views images, which is what the evidence rests on."""
    n = metrics.get("samples")
    if not n or metrics.get("drop_unit") != "points":
        return {}
    step = 100.0 / n
    images = n // views if views > 1 else n
    what = (f"{n} evaluation samples ({images} image(s) x {views} views; views of one image are not independent)"
            if views > 1 else f"{n} evaluation sample(s)")
    return {"one_sample_points": step,
            "evidence": f"{what}: one changed prediction moves the metric by {step:.3g} points"
                        + (f"; fewer than 100 {'images' if views > 1 else 'samples'} give a coarse estimate, "
                           "pass more --eval-data" if images < 100 else "")}


def fidelity_of(spec: ModelSpec, reference: Callable, onnx_out: np.ndarray,
                progress: Progress = NULL_PROGRESS) -> dict:
    """Max deviation of onnxruntime's model.onnx from the torch model it was built from, on the
    leading evaluation batches (fidelity_batches); `onnx_out`: model.onnx on every eval batch."""
    batches = fidelity_batches(spec)
    ref = np.concatenate([spec.postprocess(reference(b), b) for b in batches])
    onnx_out = onnx_out[:len(ref)]  # eval outputs concatenate in batch order: the leading rows
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf outputs: the finite_outputs check says so
        dev = np.abs(ref.astype(np.float64) - onnx_out.astype(np.float64))
    total = sum(len(next(iter(b.values()))) for b in spec.eval_batches)
    out = {"max_abs_deviation": float(dev.max()), "mean_abs_deviation": float(dev.mean()),
           "reference_max_abs": float(np.abs(ref).max()),
           "samples": sum(len(next(iter(b.values()))) for b in batches), "eval_samples": total,
           "covers": f"the leading evaluation batches (at least {FIDELITY_SAMPLES} samples): it checks that "
                     "onnxruntime's kernels compute what the torch model does; the task metric uses every sample"}
    if get_task(spec.task).argmax_fidelity:
        out["argmax_agreement"] = float((ref.argmax(-1) == onnx_out.argmax(-1)).mean())
    return out


def latency_of(spec: ModelSpec, baseline: Path, model: Path, threads: int,
               progress: Progress = NULL_PROGRESS, sessions: dict | None = None) -> dict:
    """Interleaved latency at `threads`, plus at 1 thread when that differs. `sessions`
    (latency_sessions at `threads`) are handed over: the dict is emptied, so the pair is freed
    before the 1-thread pair loads."""
    feed = spec.example_inputs
    pair = (sessions.pop("baseline"), sessions.pop("model")) if sessions else (baseline, model)
    lat = measure_pair(*pair, feed, threads, progress=progress)
    del pair
    if threads != 1:
        lat["at_1_thread"] = measure_pair(baseline, model, feed, 1, progress=progress)
    return lat


def sizes_of(baseline: Path, model: Path, progress: Progress = NULL_PROGRESS) -> dict:
    """Raw and zip-deflated sizes; deflating a large FP32 baseline takes seconds: a bar in MB."""
    total = (Path(baseline).stat().st_size + Path(model).stat().st_size) / 1e6
    with progress.task("compressed sizes (zip deflate)", round(total, 1), "MB") as task:
        b, m = (file_sizes(p, lambda n: task.advance(n / 1e6)) for p in (baseline, model))
    return {"baseline": b["raw"], "model": m["raw"], "compressed": m["compressed"],
            "baseline_compressed": b["compressed"],
            "ratio_compressed": b["raw"] / m["compressed"] if m["compressed"] else None}
