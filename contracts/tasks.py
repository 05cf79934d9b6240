"""The task registry: the one owner of what a task means for every layer.

A task says what the model's outputs are compared as (logits or embeddings), how raw outputs
become that (postprocessing), the metric and its unit, and the default accuracy gate. Models pick
their task here, runtime_check computes its metric from it, the quantizer predicts the gate with
it, and the CLI offers its names. Plain data plus numpy-only postprocessing, so every layer can
import it.

Adding a task = one `register_task(Task(...))` below (its `output` must be "logits" or
"embeddings": the two comparisons runtime_check.accuracy.task_metrics knows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sqexport.contracts.errors import ConfigError

__all__ = ["Task", "register_task", "get_task", "task_names", "hf_task_names", "task_for_output", "unit_of_metric",
           "first_output", "mean_pool", "POOLING"]


def first_output(outputs: list[np.ndarray], batch: dict) -> np.ndarray:
    """The first output as it is (logits)."""
    return outputs[0]


def mean_pool(outputs: list[np.ndarray], batch: dict) -> np.ndarray:
    """Attention-mask-weighted mean of the token embeddings (sentence-transformers' pooling)."""
    hidden = outputs[0].astype(np.float32)
    mask = batch["attention_mask"][..., None].astype(np.float32)
    return (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)


POOLING: dict[str, Callable[[list[np.ndarray], dict], np.ndarray]] = {"first": first_output, "mean": mean_pool}
OUTPUTS = ("logits", "embeddings")
# model.onnx metadata_props key: a classifier's class names (JSON list, by class index)
LABELS_KEY = "sqexport.labels"


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    output: str  # "logits" (top-1 vs labels, or the top-1 FP32 expects) or "embeddings" (cosine)
    metric: str  # report.json accuracy.metric ("top1" becomes "top1_expected" without labels)
    unit: str  # unit of the accuracy gate
    default_max_drop: float  # the gate when no --max-accuracy-drop is given
    pooling: str = "first"  # raw outputs -> `output` (POOLING)
    hf_task: str | None = None  # optimum's task name, for Hugging Face models of this task
    hf_head: str | None = None  # transformers auto class loading such a model
    hf_output: str | None = None  # the output name the exported graph carries

    def __post_init__(self):
        if self.output not in OUTPUTS or self.pooling not in POOLING:
            raise ValueError(f"task {self.name}: output must be one of {OUTPUTS}, pooling one of {tuple(POOLING)}")

    @property
    def argmax_fidelity(self) -> bool:
        """Whether onnxruntime-vs-torch fidelity also reports argmax agreement."""
        return self.output == "logits"

    @property
    def postprocess(self) -> Callable[[list[np.ndarray], dict], np.ndarray]:
        """outputs, batch -> what the metric compares (ModelSpec.postprocess)."""
        return POOLING[self.pooling]


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise ConfigError(f"unknown task '{name}'; known: {', '.join(task_names())}")
    return _TASKS[name]


def task_names() -> list[str]:
    return sorted(_TASKS)


def hf_task_names() -> list[str]:
    """Tasks a Hugging Face folder can be loaded as (the CLI's --task choices)."""
    return sorted(n for n, t in _TASKS.items() if t.hf_task)


def task_for_output(output: str) -> Task:
    """The first registered task comparing `output` ("logits" or "embeddings"): how `sqexport check`
    compares a bare ONNX model, whose task is not recorded anywhere."""
    return next(t for t in _TASKS.values() if t.output == output)


def unit_of_metric(metric: str) -> str | None:
    """The gate unit of a report's accuracy.metric (None: a metric no gate reads)."""
    units = {t.metric: t.unit for t in _TASKS.values()}
    units.update({f"{t.metric}_{kind}": t.unit for t in _TASKS.values() if t.output == "logits"
                  for kind in ("expected", "agreement")})
    return units.get(metric)


register_task(Task("image-classification", "image classifier: top-1 vs labels, else the top-1 FP32 expects",
                   output="logits", metric="top1", unit="points", default_max_drop=1.0))
register_task(Task("sequence-classification", "text classifier (Hugging Face): top-1 vs labels, else the top-1 FP32 expects",
                   output="logits", metric="top1", unit="points", default_max_drop=1.0,
                   hf_task="text-classification", hf_head="AutoModelForSequenceClassification",
                   hf_output="logits"))
register_task(Task("feature-extraction", "sentence embeddings (Hugging Face encoder): cosine of mean-pooled "
                   "token states vs FP32", output="embeddings", metric="cosine", unit="1-cosine",
                   default_max_drop=0.01, pooling="mean", hf_task="feature-extraction", hf_head="AutoModel",
                   hf_output="last_hidden_state"))
