"""The recovery step of the pipeline: data pool, teacher, metric before/after, progress."""
from __future__ import annotations

import numpy as np
import torch

from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.contracts.units import metric_units
from sqexport.models.spec import ModelSpec, first_samples
from sqexport.contracts.tasks import get_task
from sqexport.runtime_check.accuracy import task_metrics
from sqexport.toolchain.folding import copy_for_compression
from sqexport.toolchain.recovery import RecoveryConfig, make_pool, recover
from sqexport.toolchain.registry import register
from sqexport.toolchain.stages import RecoverContext

__all__ = ["run_recovery", "make_fine_tune", "torch_metric", "recover_distill", "METRIC_SAMPLES"]


METRIC_SAMPLES = 2000  # eval samples for the before/after metric (the final one uses them all, in onnxruntime)


def _metric_batches(spec: ModelSpec) -> list[dict]:
    return first_samples(spec.eval_batches, METRIC_SAMPLES)


def _outputs(spec: ModelSpec, model: torch.nn.Module, batches: list[dict]) -> np.ndarray:
    return np.concatenate([spec.postprocess(spec.torch_outputs(model, b), b) for b in batches])


def torch_metric(spec: ModelSpec, dense_out: np.ndarray, model: torch.nn.Module, batches: list[dict] | None = None,
                 labels: np.ndarray | None = None) -> float:
    """The report's metric of a torch model on (the first METRIC_SAMPLES of) the eval split: top-1
    (labels), agreement with the dense model (no labels) or mean cosine to the dense embeddings.
    `batches` (with their `labels`) replace the eval split, e.g. by the training samples."""
    if batches is None:
        batches, labels = _metric_batches(spec), spec.eval_labels
    out = _outputs(spec, model, batches)
    labels = labels[:len(out)] if labels is not None else None
    return task_metrics(get_task(spec.task), dense_out, out, labels)["model"]


def _sources(spec: ModelSpec, extra_path: str | None):
    sources = [(spec.calib_batches, spec.calib_labels)]
    if spec.recover_data is not None:
        sources.append(spec.recover_data())
    if extra_path:
        from sqexport.models.data import load_data_file

        sources.append(load_data_file(extra_path, spec))
    batches = [b for bs, _ in sources for b in bs]
    labels = None
    if all(lab is not None for _, lab in sources):
        labels = np.concatenate([lab for _, lab in sources])
    return batches, labels


def run_recovery(work: torch.nn.Module, spec: ModelSpec, config: RecoveryConfig, seed: int,
                 extra_path: str | None = None, progress: Progress = NULL_PROGRESS,
                 masks: dict[str, torch.Tensor] | None = None) -> dict:
    teacher = copy_for_compression(spec.model)
    batches, labels = _sources(spec, extra_path)
    text = "input_ids" in batches[0]
    kind = get_task(spec.task)
    pool = make_pool(batches, labels, text, encoder=kind.output == "embeddings")
    dense_out = _outputs(spec, teacher, _metric_batches(spec))
    # the same metric on training samples as drawn before augmentation (diagnostic: optimization
    # vs generalization gap)
    train_batches = first_samples(batches, METRIC_SAMPLES)
    dense_train = _outputs(spec, teacher, train_batches)
    with progress.task("recovery", config.steps, "step") as task:
        def update(step, steps, elapsed, budget, loss):
            if steps is None and step % 10 == 0:  # time-bounded: estimate the total from the pace
                task.set_total(step * budget / max(elapsed, 1e-6))
            task.advance()

        info = recover(work, teacher, pool, config, seed, lambda m: torch_metric(spec, dense_out, m), update, masks,
                       lambda m: torch_metric(spec, dense_train, m, train_batches, labels))
    info["metric"] = kind.metric if kind.output == "embeddings" or spec.eval_labels is not None \
        else f"{kind.metric}_agreement"
    info["unit"] = metric_units(info["metric"])[0]  # of metric_before / metric_after, as in "accuracy"
    info["labels_used"] = labels is not None
    info["metric_samples"] = len(dense_out)
    info["train_metric_samples"] = len(dense_train)
    return info


def make_fine_tune(spec: ModelSpec, seed: int, progress: Progress = NULL_PROGRESS):
    """The PruneContext's `fine_tune` (toolchain/stages.py): distillation for a given number of
    steps with masks held, between the rounds of an iterative pruning method. Its record adds
    `metric_dense`, the dense model's metric on the same samples (computed once)."""
    dense: list[float] = []

    def fine_tune(model: torch.nn.Module, masks: dict, steps: int, round_: int) -> dict:
        if not dense:
            teacher_out = np.concatenate([spec.postprocess(spec.torch_outputs(spec.model, b), b)
                                          for b in _metric_batches(spec)])
            dense.append(torch_metric(spec, teacher_out, spec.model))
        info = run_recovery(model, spec, RecoveryConfig(steps=steps), seed + round_, progress=progress, masks=masks)
        return {**info, "metric_dense": dense[0]}

    return fine_tune


@register("recover", "distill", RecoveryConfig,
          "distillation from the dense teacher after pruning (KL; encoders: layer-wise hidden + "
          "attention-output MSE, pooled cosine), augmented")
def recover_distill(model: torch.nn.Module, config: RecoveryConfig, ctx: RecoverContext) -> dict:
    return run_recovery(model, ctx.spec, config, ctx.seed, config.data, ctx.progress, ctx.masks)
