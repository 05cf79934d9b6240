"""The recovery step of the pipeline: data pool, teacher, metric before/after, progress."""
from __future__ import annotations

import numpy as np
import torch

from contracts.progress import NULL_PROGRESS, Progress
from models.spec import ModelSpec
from contracts.tasks import get_task
from runtime_check.accuracy import task_metrics
from toolchain.folding import copy_for_compression
from toolchain.recovery import RecoveryConfig, make_pool, recover
from toolchain.registry import register
from toolchain.stages import RecoverContext

__all__ = ["run_recovery", "torch_metric", "recover_distill"]


def torch_metric(spec: ModelSpec, dense_out: np.ndarray, model: torch.nn.Module) -> float:
    """The report's metric of a torch model on the eval split: top-1 (labels), agreement with the
    dense model (no labels) or mean cosine to the dense embeddings (encoders)."""
    out = np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in spec.eval_batches])
    return task_metrics(get_task(spec.task), dense_out, out, spec.eval_labels)["model"]


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


def run_recovery(work: torch.nn.Module, spec: ModelSpec, config: RecoveryConfig, seed: int,
                 extra_path: str | None = None, progress: Progress = NULL_PROGRESS) -> dict:
    teacher = copy_for_compression(spec.model)
    batches, labels = _sources(spec, extra_path)
    text = "input_ids" in batches[0]
    kind = get_task(spec.task)
    pool = make_pool(batches, labels, text, encoder=kind.output == "embeddings")
    dense_out = np.concatenate([spec.postprocess(spec.torch_outputs(teacher, b), b) for b in spec.eval_batches])
    with progress.task("recovery", config.steps, "step") as task:
        def update(step, steps, elapsed, budget, loss):
            if steps is None and step % 10 == 0:  # time-bounded: estimate the total from the pace
                task.set_total(step * budget / max(elapsed, 1e-6))
            task.advance()

        info = recover(work, teacher, pool, config, seed, lambda m: torch_metric(spec, dense_out, m), update)
    info["metric"] = kind.metric if kind.output == "embeddings" or spec.eval_labels is not None \
        else f"{kind.metric}_agreement"
    info["labels_used"] = labels is not None
    return info


@register("recover", "distill", RecoveryConfig,
          "distillation from the dense teacher after pruning (KL / hidden-state MSE + cosine), augmented")
def recover_distill(model: torch.nn.Module, config: RecoveryConfig, ctx: RecoverContext) -> dict:
    return run_recovery(model, ctx.spec, config, ctx.seed, config.data, ctx.progress)
