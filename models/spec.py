"""ModelSpec: everything the pipeline needs to know about a model, whatever its origin."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Union

import numpy as np
import torch

from sqexport.contracts.pooling import Pooling
from sqexport.contracts.tasks import first_output, task_names

__all__ = ["Batch", "ModelSpec", "TASKS", "TorchModule", "HFFolder", "ModelKind", "first_samples", "leading_samples"]

Batch = dict  # input name -> np.ndarray, one batch


def first_samples(batches: list[Batch], n: int) -> list[Batch]:
    """The leading whole batches that hold at least `n` samples (all of them if fewer)."""
    out, seen = [], 0
    for b in batches:
        if seen >= n:
            break
        out.append(b)
        seen += len(next(iter(b.values())))
    return out

def leading_samples(batches: list[Batch], n: int) -> list[Batch]:
    """The first `n` samples (all of them if fewer), the last batch cut to size: every entry of a
    batch holds one row per sample."""
    out, seen = [], 0
    for b in batches:
        if seen >= n:
            break
        size = len(next(iter(b.values())))
        out.append(b if seen + size <= n else {k: v[:n - seen] for k, v in b.items()})
        seen += min(size, n - seen)
    return out


TASKS = tuple(task_names())  # the task registry (contracts/tasks.py) owns them


@dataclass(frozen=True)
class TorchModule:
    """A torch.nn.Module built in this process (zoo, user factory, TorchScript): torch.onnx exports it."""

    exporter: ClassVar[str] = "torch"


@dataclass(frozen=True)
class HFFolder:
    """A Hugging Face model folder: optimum exports it, and its tokenizer ships beside model.onnx."""

    path: str
    # the user passed --trust-remote-code: transformers may run the folder's own Python (auto_map);
    # False everywhere else, so no loader can prompt on stdin or run the folder's code
    trust_remote_code: bool = False
    exporter: ClassVar[str] = "optimum"


# What kind of model a spec holds; each kind names its exporter (exporters/export.py EXPORTERS).
ModelKind = Union[TorchModule, HFFolder]


@dataclass
class ModelSpec:
    """A loaded model plus its data.

    `postprocess(outputs, batch)` turns raw model outputs (ONNX or torch, as numpy) into what the
    metric compares: logits for classifiers, pooled embeddings for encoders.
    """

    name: str
    model: torch.nn.Module
    task: str
    input_names: list[str]
    output_names: list[str]
    example_inputs: Batch
    calib_batches: list[Batch]
    eval_batches: list[Batch]
    eval_labels: np.ndarray | None = None
    calib_labels: np.ndarray | None = None  # lets the fallback predict a label-accuracy gate
    dynamic_axes: dict = field(default_factory=dict)
    postprocess: Callable[[list[np.ndarray], Batch], np.ndarray] = first_output
    kind: ModelKind = field(default_factory=TorchModule)  # decides the exporter
    description: str = ""
    prune_prefix: str = ""
    # pruning method used when neither --prune nor a recipe names one ("none" for transformers:
    # unstructured zeros without recovery cost fidelity and buy only size)
    default_prune: str = "magnitude"
    # quantization params this model runs with when no recipe file and no flag says otherwise
    # (e.g. the remedies that pay on mobilenet-v2); keys of the quantize method's config
    quant_defaults: dict = field(default_factory=dict)
    # path -> (batches, labels or None) for user data; None = tensor files (.npy/.npz)
    load_data: Callable | None = None
    # where the model came from (user models: kind, reference, input shapes); report.json "source"
    source: dict = field(default_factory=dict)
    # how the calibration / eval data were made (files, preprocessing, labels); report.json "data"
    data_info: dict = field(default_factory=dict)
    # () -> (batches, labels or None): extra data for recovery (e.g. a training split), loaded lazily
    recover_data: Callable | None = None
    # what an app must do to raw data before the model (written into the mobile bundle and into
    # model.onnx's metadata_props), and the class names in output order
    preprocessing: dict = field(default_factory=dict)
    labels: list[str] | None = None
    # encoders: how token states become the embedding the metric compares (and, when it comes
    # from the model folder's own config, the `sentence_embedding` output the export adds)
    pooling: Pooling | None = None

    def __post_init__(self):
        if self.task not in task_names():
            raise ValueError(f"task must be one of {', '.join(task_names())}, got '{self.task}'")

    def torch_outputs(self, model: torch.nn.Module, batch: Batch) -> list[np.ndarray]:
        """Run a torch model on one batch and return outputs as numpy, in output_names order."""
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        if isinstance(out, torch.Tensor):
            return [out.numpy()]
        if isinstance(out, dict) or hasattr(out, "keys"):
            return [out[k].numpy() for k in self.output_names]
        return [t.numpy() for t in out]
