"""`sqexport check`: verify an existing .onnx or .ort model, optionally against an FP32 baseline
and on aarch64 onnxruntime under emulation (`--arch arm64`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from sqexport.contracts.tasks import LABELS_KEY, mean_pool, task_for_output
from sqexport.exporters.mobile import PREPROCESSING_KEY
from sqexport.runtime_check.accuracy import nonfinite_outputs, run_session, task_metrics
from sqexport.runtime_check.gates import DEFAULT_DROP, Gates, evaluate_gates
from sqexport.runtime_check.id_inputs import id_bounds
from sqexport.runtime_check.inspect_model import load_onnx
from sqexport.runtime_check.latency import measure_interleaved, measure_pair
from sqexport.runtime_check.fixed_inputs import fit_batches, is_fixed, run_fixed, session_shapes
from sqexport.runtime_check.isa import int8_saturates
from sqexport.runtime_check.saturation import saturating_pairs
from sqexport.runtime_check.session import make_session
from sqexport.contracts.errors import ConfigError, DataError, ModelLoadError, first_line
from sqexport.contracts.files import first_special_file, require_regular
from sqexport.models.validate import check_labels

__all__ = ["check_model", "SYNTHETIC_MAX_DROP"]

# The drop allowed against --baseline when no --eval-data is given (seeded uniform random inputs).
# Random inputs are off the data's distribution and sit near decision boundaries, so a correct int8
# model moves more of them than of real data (digits-cnn: 3.1 points of top-1 agreement on 64
# samples, digits-mlp: 9.4); a broken one (a weight tensor replaced by noise) agrees on ~10%.
# --max-accuracy-drop replaces it.
SYNTHETIC_MAX_DROP = {"points": 25.0, "1-cosine": 0.1}

_NP_TYPES = {"tensor(float)": np.float32, "tensor(int32)": np.int32, "tensor(int64)": np.int64,
             "tensor(bool)": np.bool_, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _model_io(path: Path) -> dict:
    """Inputs -> (dims, numpy dtype) and the output ranks, from onnxruntime (.onnx and .ort alike);
    a dynamic dim is None."""
    if Path(path).suffix == ".ort":
        if not Path(path).is_file():
            require_regular(Path(path), "model", ModelLoadError)
            raise ModelLoadError(f"no such file: {path}")
        try:
            session = make_session(path, 1)
        except Exception as exc:  # onnxruntime raises its own types for a bad flatbuffer
            raise ModelLoadError(f"{path} is not a valid ORT format model: {first_line(exc)}") from None
    else:
        graph = load_onnx(path)
        session = make_session(path, 1)
    dims = lambda shape: [d if isinstance(d, int) and d > 0 else None for d in shape]  # noqa: E731
    return {"inputs": {i.name: (dims(i.shape), _NP_TYPES.get(i.type, np.float32)) for i in session.get_inputs()},
            "output_ranks": [len(o.shape) for o in session.get_outputs()],
            "labels": _label_names(session.get_modelmeta().custom_metadata_map),
            "id_bounds": id_bounds(graph) if Path(path).suffix != ".ort" else {}}


def _label_names(metadata: dict) -> list[str] | None:
    """A classifier's class names from the model's metadata (export writes LABELS_KEY; a mobile
    model's preprocessing entry carries them too). Data from elsewhere: only a list of strings counts."""
    for key, pick in ((LABELS_KEY, lambda v: v), (PREPROCESSING_KEY, lambda v: v.get("labels") if isinstance(v, dict) else None)):
        try:
            names = pick(json.loads(metadata.get(key, "null")))
        except (ValueError, TypeError, RecursionError):
            continue
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return names
    return None


SYNTHETIC_IDS = 1000  # synthetic ids are drawn below this, and below the rows of the table they index


def _synthetic_batches(io: dict, n: int = 64, seed: int = 0) -> list[dict]:
    """Seeded random inputs shaped like the graph inputs (dynamic dims: batch 1, others 16)."""
    rng = np.random.default_rng(seed)
    bounds = io.get("id_bounds", {})
    batches = []
    for _ in range(n):
        feed = {}
        for name, (shape, dtype) in io["inputs"].items():
            dims = [d if d is not None else (1 if i == 0 else 16) for i, d in enumerate(shape)]
            if np.issubdtype(dtype, np.integer):
                feed[name] = (np.ones(dims, dtype) if "mask" in name else
                              np.zeros(dims, dtype) if "type" in name else
                              rng.integers(0, min(SYNTHETIC_IDS, bounds.get(name, SYNTHETIC_IDS)), dims).astype(dtype))
            else:
                feed[name] = rng.random(dims, dtype=np.float32).astype(dtype)
        batches.append(feed)
    return batches


def _tensor_batches(path: Path, io: dict) -> tuple[list[dict], np.ndarray | None]:
    from sqexport.models.tensor_data import load_tensor_batches

    return load_tensor_batches(path, {n: (tuple(s[1:]), t) for n, (s, t) in io["inputs"].items()})


def _image_batches(path: Path, io: dict, prep) -> tuple[list[dict], np.ndarray | None, dict]:
    """An image folder shaped by the graph's one (N, C, H, W) input (dynamic H/W: --image-size)."""
    from sqexport.models.data import BATCH_SIZE
    from sqexport.models.image_data import ImagePrep, load_image_folder

    if len(io["inputs"]) != 1:
        raise DataError(f"an image folder feeds one input; the model takes {', '.join(io['inputs'])}")
    (name, (dims, dtype)), = io["inputs"].items()
    images, labels, info = load_image_folder(path, tuple(dims[1:]), prep or ImagePrep())
    batches = [{name: images[i:i + BATCH_SIZE].astype(dtype)} for i in range(0, len(images), BATCH_SIZE)]
    return batches, labels, info


def _text_batches(path: Path, model_path: Path, io: dict) -> tuple[list[dict], np.ndarray | None]:
    """Text eval data, tokenized with the tokenizer saved beside the model (sqexport export writes it)."""
    folder = Path(model_path).parent
    if not (folder / "tokenizer_config.json").is_file():
        raise DataError(f"text eval data needs a tokenizer beside {model_path} (tokenizer_config.json); "
                        "sqexport export writes one into its output folder")
    from transformers import AutoTokenizer

    from sqexport.models.remote_code import remote_code_files
    from sqexport.models.text_data import MAX_LENGTH, read_texts, text_batches

    special = first_special_file(folder)
    if special:
        raise DataError(f"{special}; sqexport reads regular files only")
    asks = remote_code_files(folder)
    if asks:  # `check` never runs code from a folder: transformers would prompt, then run it
        raise DataError(f"the tokenizer beside {model_path} asks to run its own Python code ('auto_map' in "
                        f"{asks[0]}); sqexport check never runs it")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for a damaged tokenizer folder
        raise DataError(f"cannot load the tokenizer beside {model_path}: {first_line(exc)}") from None
    names = io.get("labels")
    texts, labels = read_texts(path, {n: i for i, n in enumerate(names)} if names else None)
    declared = getattr(tokenizer, "model_max_length", MAX_LENGTH)  # export saves the model's positions here
    max_length = min(MAX_LENGTH, declared) if isinstance(declared, int) and declared >= 2 else MAX_LENGTH
    return text_batches(tokenizer, texts, list(io["inputs"]), labels, max_length=max_length)


def _first(outputs, batch):
    """Logits as they are; token states mean-pooled over the attention mask (or flattened)."""
    out = outputs[0]
    if out.ndim == 3 and "attention_mask" in batch:
        return mean_pool(outputs, batch)
    return out.reshape(len(out), -1) if out.ndim > 2 else out


def _outputs(path: Path, batches: list[dict], threads: int) -> np.ndarray:
    session = make_session(path, threads)
    if is_fixed(session_shapes(session)):  # mobile models: batch 1, fixed lengths
        return run_fixed(session, batches, _first)
    return run_session(session, batches, _first)


def _latency_feed(batches: list[dict], io: dict) -> dict:
    feed = {k: v[:1] for k, v in batches[0].items()}
    shapes = {n: s for n, (s, _) in io["inputs"].items()}
    if all(d is not None for s in shapes.values() for d in s):
        feed = fit_batches([feed], shapes)[0][0]
    return feed


def check_model(model_path: Path, baseline_path: Path | None, eval_data: Path | None,
                threads: int, gates: Gates, prep=None, arch: str | None = None) -> dict:
    """`prep` (models.image_data.ImagePrep): --image-size/--mean/--std for an image-folder eval set;
    `arch="arm64"`: also run on aarch64 onnxruntime under emulation (runtime_check.arm64_check)."""
    io = _model_io(model_path)
    if baseline_path is not None:
        base_io = _model_io(baseline_path)
        io["id_bounds"] = io["id_bounds"] or base_io["id_bounds"]  # an .ort model's tables, read from its baseline
    data_info = None
    if prep is not None and prep.given and not (eval_data is not None and Path(eval_data).is_dir()):
        raise ConfigError("--image-size, --mean and --std apply to an image-folder --eval-data")
    if eval_data is None:
        batches, labels = _synthetic_batches(io), None
    elif Path(eval_data).is_dir():
        batches, labels, data_info = _image_batches(Path(eval_data), io, prep)
    elif Path(eval_data).suffix in (".txt", ".jsonl"):
        batches, labels = _text_batches(Path(eval_data), model_path, io)
    else:
        batches, labels = _tensor_batches(Path(eval_data), io)
    try:
        model_out = _outputs(model_path, batches, threads)
        base_out = _outputs(baseline_path, batches, threads) if baseline_path is not None else None
    except Exception as exc:  # onnxruntime reports shape/type mismatches as its own exception types
        raise DataError(f"the data does not fit the model: {first_line(exc)}") from None
    if base_out is not None and base_out.shape != model_out.shape:
        raise DataError(f"baseline output shape {base_out.shape} differs from the model's {model_out.shape}")
    # no ModelSpec here: the graph's output decides (2-D: logits of a classifier, else embeddings)
    logits = io["output_ranks"][0] == 2
    task = task_for_output("logits" if logits else "embeddings")
    if labels is not None and logits:
        labels = check_labels(Path(eval_data), labels, len(model_out), model_out.shape[-1])
    synthetic = eval_data is None
    accuracy = _accuracy(task, logits, base_out, model_out, labels, agreement=synthetic)
    limit = _drop_limit(gates, accuracy, synthetic) if base_out is not None else None
    if synthetic and limit is not None:
        accuracy["note"] = (f"synthetic inputs: agreement with the baseline gated at a drop of at most {limit:g} "
                            f"{accuracy['drop_unit']} (SYNTHETIC_MAX_DROP; random inputs sit near decision "
                            "boundaries); pass --eval-data for the task's own gate")
    feed = _latency_feed(batches, io)
    if baseline_path is not None:
        latency = measure_pair(baseline_path, model_path, feed, threads)
    else:
        latency = {"threads": threads, "model": measure_interleaved({"model": model_path}, feed, threads)["model"]}
    if baseline_path is None and gates.min_speedup is not None:
        raise DataError("--min-speedup needs --baseline to compare against")
    checks = evaluate_gates(Gates(limit, gates.min_speedup, gates.max_latency_ms), accuracy, latency)
    result = {"model": str(model_path), "baseline": str(baseline_path) if baseline_path else None,
              "accuracy": accuracy, "latency_ms": latency, "checks": checks,
              "data": str(eval_data) if eval_data else "synthetic",
              **({"data_info": data_info} if data_info else {})}
    if arch == "arm64":
        from sqexport.runtime_check.arm64_check import verify_arm64

        # the tiers' accuracy is gated against the baseline as the host's is; without a baseline
        # they are compared with x86 only, which says they compute the same, not that it is right
        result["arm64"], arm_checks = verify_arm64(model_path, batches, labels, base_out, logits,
                                                   Gates(limit), _first, base_out is None, _exact_reference(model_path))
        checks += arm_checks
    host = host_kernel_note(model_path)
    if host:
        result["host_int8"] = host
    result["passed"] = all(c["passed"] for c in checks)
    return result


def host_kernel_note(model_path: Path) -> dict | None:
    """On a host whose int8 kernels saturate (x86 without VNNI): how many of the model's int8 weight
    pairs exceed what those kernels add exactly, and what it means for the numbers above."""
    if not int8_saturates() or Path(model_path).suffix != ".onnx":
        return None
    found = saturating_pairs(onnx.load(str(model_path)))  # _model_io has checked it already
    if not found["pairs"]:
        return {**found, "note": "this CPU has no VNNI; every int8 weight pair of the model fits its int16 sums"}
    return {**found, "note": f"this CPU has no VNNI: {found['pairs']} weight pairs in {found['layers']} layer(s) exceed "
                              "what its int8 kernels add exactly (saturating int16), so the outputs measured here "
                              "differ from the model's QDQ graph; rebuild on this CPU or with `pair_limit: true`"}


def _accuracy(task, logits: bool, base_out, model_out, labels, agreement: bool = False) -> dict:
    """The metric against the baseline; without one, the drop is not measured (None): top-1 on
    labels alone is shown but gated by nothing, never as a drop of 0. `agreement`: synthetic
    inputs, judged by sameness with the baseline (their class probabilities mean nothing)."""
    if base_out is not None:
        return task_metrics(task, base_out, model_out, labels if logits else None, agreement)
    if logits and labels is not None:
        accuracy = task_metrics(task, model_out, model_out, labels)
        accuracy.update(baseline=None, drop=None, note="no --baseline: the accuracy drop is not measured and not gated")
        accuracy["nonfinite_outputs"] = nonfinite_outputs(None, model_out)
        return accuracy
    return {"metric": "none", "unit": "", "baseline": None, "model": None, "drop": None, "drop_unit": "",
            "note": "no --baseline and no labels: accuracy is not measured",
            "nonfinite_outputs": nonfinite_outputs(None, model_out)}


def _drop_limit(gates: Gates, accuracy: dict, synthetic: bool) -> float | None:
    """--max-accuracy-drop, else the stated limit for synthetic inputs, else the task's default."""
    if gates.max_accuracy_drop is not None:
        return gates.max_accuracy_drop
    unit = accuracy.get("drop_unit")
    if synthetic:
        return SYNTHETIC_MAX_DROP.get(unit)
    return DEFAULT_DROP.get(unit)


def _exact_reference(model_path: Path) -> Path | None:
    """The .onnx whose unoptimized run is the exact QDQ arithmetic: the file itself, or for a .ort
    the model.onnx it was converted from, which sqexport writes beside it."""
    if Path(model_path).suffix != ".ort":
        return Path(model_path)
    sibling = Path(model_path).with_name("model.onnx")
    return sibling if sibling.is_file() else None
