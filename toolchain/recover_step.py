"""The recovery step of the pipeline: data pool, teacher, metric before/after, progress."""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch

from models.spec import ModelSpec
from runtime_check.accuracy import classification_metrics, embedding_metrics
from toolchain.folding import copy_for_compression
from toolchain.recovery import RecoveryConfig, make_pool, recover

__all__ = ["run_recovery", "torch_metric"]


def torch_metric(spec: ModelSpec, dense_out: np.ndarray, model: torch.nn.Module) -> float:
    """The report's metric of a torch model on the eval split: top-1 (labels), agreement with the
    dense model (no labels) or mean cosine to the dense embeddings (encoders)."""
    out = np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in spec.eval_batches])
    if spec.task == "feature-extraction":
        return embedding_metrics(dense_out, out)["model"]
    m = classification_metrics(dense_out, out, spec.eval_labels)
    return m["model"]


def _sources(spec: ModelSpec, extra_path: str | None):
    sources = [(spec.calib_batches, spec.calib_labels)]
    if spec.recover_data is not None:
        sources.append(spec.recover_data())
    if extra_path:
        from models.data import load_data_file

        sources.append(load_data_file(extra_path, spec))
    batches = [b for bs, _ in sources for b in bs]
    labels = None
    if all(lab is not None for _, lab in sources):
        labels = np.concatenate([lab for _, lab in sources])
    return batches, labels


def _progress(log: Callable[[str], None], quiet: bool):
    """A rich progress bar on a terminal; otherwise a log line at every quarter of the budget."""
    if not quiet and sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task("recovery", total=1.0)
        bar.start()

        def update(step, steps, elapsed, budget, loss):
            done = step / steps if steps else elapsed / budget
            bar.update(task, completed=min(1.0, max(done, elapsed / budget)),
                       description=f"recovery step {step} loss {loss:.4f}")
        return update, bar.stop
    marks = {"next": 0.25}

    def log_update(step, steps, elapsed, budget, loss):
        done = max(step / steps if steps else 0.0, elapsed / budget)
        if done >= marks["next"]:
            marks["next"] += 0.25
            log(f"recovery: step {step}, {elapsed:.0f}s, loss {loss:.4f}")
    return log_update, lambda: None


def run_recovery(work: torch.nn.Module, spec: ModelSpec, config: RecoveryConfig, seed: int,
                 extra_path: str | None = None, log: Callable[[str], None] = lambda m: None,
                 quiet: bool = False) -> dict:
    teacher = copy_for_compression(spec.model)
    batches, labels = _sources(spec, extra_path)
    text = "input_ids" in batches[0]
    pool = make_pool(batches, labels, text, encoder=spec.task == "feature-extraction")
    dense_out = np.concatenate([spec.postprocess(spec.torch_outputs(teacher, b), b) for b in spec.eval_batches])
    update, stop = _progress(log, quiet)
    try:
        info = recover(work, teacher, pool, config, seed, lambda m: torch_metric(spec, dense_out, m), update)
    finally:
        stop()
    info["metric"] = "cosine" if spec.task == "feature-extraction" else \
        ("top1" if spec.eval_labels is not None else "top1_agreement")
    info["labels_used"] = labels is not None
    return info
