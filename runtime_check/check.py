"""`sqexport check`: verify an existing ONNX model, optionally against an FP32 baseline."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from contracts.tasks import mean_pool, task_for_output
from runtime_check.accuracy import run_session, task_metrics
from runtime_check.gates import Gates, evaluate_gates
from runtime_check.inspect_model import load_onnx
from runtime_check.latency import measure_interleaved, measure_pair
from runtime_check.session import make_session
from contracts.errors import ConfigError, DataError, first_line
from models.validate import check_labels

__all__ = ["check_model"]

_NP_TYPES = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}


def _synthetic_batches(model, n: int = 64, seed: int = 0) -> list[dict]:
    """Seeded random inputs shaped like the graph inputs (dynamic dims: batch 1, others 16)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        feed = {}
        for inp in model.graph.input:
            tt = inp.type.tensor_type
            dims = [d.dim_value if d.dim_value > 0 else (1 if i == 0 else 16) for i, d in enumerate(tt.shape.dim)]
            dtype = _NP_TYPES.get(tt.elem_type, np.float32)
            if np.issubdtype(dtype, np.integer):
                feed[inp.name] = (np.ones(dims, dtype) if "mask" in inp.name else
                                  np.zeros(dims, dtype) if "type" in inp.name else
                                  rng.integers(0, 1000, dims).astype(dtype))
            else:
                feed[inp.name] = rng.random(dims, dtype=np.float32).astype(dtype)
        batches.append(feed)
    return batches


def _tensor_batches(path: Path, model) -> tuple[list[dict], np.ndarray | None]:
    from models.tensor_data import load_tensor_batches

    inputs = {}
    for inp in model.graph.input:
        tt = inp.type.tensor_type
        shape = tuple(d.dim_value if d.dim_value > 0 else None for d in tt.shape.dim)[1:]
        inputs[inp.name] = (shape, _NP_TYPES.get(tt.elem_type, np.float32))
    return load_tensor_batches(path, inputs)


def _image_batches(path: Path, model, prep) -> tuple[list[dict], np.ndarray | None, dict]:
    """An image folder shaped by the graph's one (N, C, H, W) input (dynamic H/W: --image-size)."""
    from models.data import BATCH_SIZE
    from models.image_data import ImagePrep, load_image_folder

    inputs = list(model.graph.input)
    if len(inputs) != 1:
        raise DataError(f"an image folder feeds one input; the model takes {', '.join(i.name for i in inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.dim_value > 0 else None for d in dims)[1:]
    images, labels, info = load_image_folder(path, shape, prep or ImagePrep())
    dtype = _NP_TYPES.get(inputs[0].type.tensor_type.elem_type, np.float32)
    batches = [{inputs[0].name: images[i:i + BATCH_SIZE].astype(dtype)} for i in range(0, len(images), BATCH_SIZE)]
    return batches, labels, info


def _text_batches(path: Path, model_path: Path, model) -> tuple[list[dict], np.ndarray | None]:
    """Text eval data, tokenized with the tokenizer saved beside the model (sqexport export writes it)."""
    folder = Path(model_path).parent
    if not (folder / "tokenizer_config.json").is_file():
        raise DataError(f"text eval data needs a tokenizer beside {model_path} (tokenizer_config.json); "
                        "sqexport export writes one into its output folder")
    from transformers import AutoTokenizer

    from models.text_data import read_texts, tokenize_batches

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a damaged tokenizer folder
        raise DataError(f"cannot load the tokenizer beside {model_path}: {first_line(exc)}") from None
    texts, labels = read_texts(path)
    return tokenize_batches(tokenizer, texts, [i.name for i in model.graph.input]), labels


def _first(outputs, batch):
    """Logits as they are; token states mean-pooled over the attention mask (or flattened)."""
    out = outputs[0]
    if out.ndim == 3 and "attention_mask" in batch:
        return mean_pool(outputs, batch)
    return out.reshape(len(out), -1) if out.ndim > 2 else out


def check_model(model_path: Path, baseline_path: Path | None, eval_data: Path | None,
                threads: int, gates: Gates, prep=None) -> dict:
    """`prep` (models.image_data.ImagePrep): --image-size/--mean/--std for an image-folder eval set."""
    model = load_onnx(model_path)
    if baseline_path is not None:
        load_onnx(baseline_path)
    data_info = None
    if prep is not None and prep.given and not (eval_data is not None and Path(eval_data).is_dir()):
        raise ConfigError("--image-size, --mean and --std apply to an image-folder --eval-data")
    if eval_data is None:
        batches, labels = _synthetic_batches(model), None
    elif Path(eval_data).is_dir():
        batches, labels, data_info = _image_batches(Path(eval_data), model, prep)
    elif Path(eval_data).suffix in (".txt", ".jsonl"):
        batches, labels = _text_batches(Path(eval_data), model_path, model)
    else:
        batches, labels = _tensor_batches(Path(eval_data), model)
    try:
        model_out = run_session(make_session(model_path, threads), batches, _first)
        base_out = (run_session(make_session(baseline_path, threads), batches, _first)
                    if baseline_path is not None else None)
    except Exception as exc:  # onnxruntime reports shape/type mismatches as its own exception types
        raise DataError(f"the data does not fit the model: {first_line(exc)}") from None
    if base_out is not None and base_out.shape != model_out.shape:
        raise DataError(f"baseline output shape {base_out.shape} differs from the model's {model_out.shape}")
    # no ModelSpec here: the graph's output decides (2-D: logits of a classifier, else embeddings)
    task = task_for_output("logits" if len(model.graph.output[0].type.tensor_type.shape.dim) == 2 else "embeddings")
    if labels is not None and task.output == "logits":
        labels = check_labels(Path(eval_data), labels, len(model_out), model_out.shape[-1])
    if task.output == "logits" and (labels is not None or base_out is not None):
        accuracy = task_metrics(task, base_out if base_out is not None else model_out, model_out, labels)
        if base_out is None:
            accuracy.update(baseline=None, drop=0.0)
    elif base_out is not None:
        accuracy = task_metrics(task, base_out, model_out)
    else:
        accuracy = {"metric": "none", "unit": "", "baseline": None, "model": None, "drop": 0.0, "drop_unit": ""}
    feed = batches[0]
    feed = {k: v[:1] for k, v in feed.items()}
    if baseline_path is not None:
        latency = measure_pair(baseline_path, model_path, feed, threads)
    else:
        latency = {"threads": threads, "model": measure_interleaved({"model": model_path}, feed, threads)["model"]}
    if baseline_path is None and gates.min_speedup is not None:
        raise DataError("--min-speedup needs --baseline to compare against")
    if not eval_data and gates.max_accuracy_drop is None:
        # Agreement on random inputs says little about task accuracy: only an explicit limit applies.
        accuracy["note"] = "synthetic inputs: no default accuracy gate; pass --eval-data for one"
        checks = [c for c in evaluate_gates(gates, accuracy, latency) if c["name"] != "accuracy_drop"]
    else:
        checks = evaluate_gates(gates, accuracy, latency)
    return {"model": str(model_path), "baseline": str(baseline_path) if baseline_path else None,
            "passed": all(c["passed"] for c in checks), "accuracy": accuracy, "latency_ms": latency,
            "checks": checks, "data": str(eval_data) if eval_data else "synthetic",
            **({"data_info": data_info} if data_info else {})}
