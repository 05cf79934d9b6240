"""Apply --calib-data / --eval-data to a ModelSpec, and record how every split was made.

Built-in models bring their own splits; a user's data replaces them. A user model brings none:
given one data set, a deterministic quarter of it is held out (so calibration and evaluation never
share samples); given none, seeded synthetic inputs stand in and the metric is agreement with the
FP32 model.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sqexport.contracts.errors import ConfigError, DataError
from sqexport.models.image_data import ImagePrep, is_image_folder, load_image_folder
from sqexport.models.spec import ModelSpec
from sqexport.models.validate import check_labels, num_classes

__all__ = ["apply_user_data", "load_data_file", "BATCH_SIZE", "HOLDOUT_EVERY", "SYNTHETIC_SAMPLES"]

BATCH_SIZE = 64
HOLDOUT_EVERY = 4  # with one data set, sample i is held out when i % 4 == 3
SYNTHETIC_SAMPLES = 64
SYNTHETIC_NOTE = ("NO DATA: calibration and evaluation use seeded synthetic inputs (uniform [0, 1)); "
                  "the metric is agreement with the FP32 model on them, not task accuracy. "
                  "Pass --calib-data / --eval-data for real numbers.")

Split = tuple  # (batches, labels or None, info dict)
SHARED_SPLIT = (f"too few samples to hold out (fewer than {HOLDOUT_EVERY}): calibration and evaluation "
                "share them")


def _image_input(spec: ModelSpec) -> str:
    if len(spec.input_names) != 1:
        raise DataError(f"an image folder feeds one input; the model takes {', '.join(spec.input_names)}")
    return spec.input_names[0]


def _load(path: str, spec: ModelSpec, prep: ImagePrep) -> Split:
    p = Path(path)
    if is_image_folder(p):
        name = _image_input(spec)
        images, labels, info = load_image_folder(p, spec.example_inputs[name].shape[1:], prep)
        _check_classes(spec, labels, info)
        return _batches({name: images.astype(spec.example_inputs[name].dtype, copy=False)}), labels, info
    if not p.is_file():
        raise DataError(f"no such data file or image folder: {p}")
    if spec.load_data is not None:
        batches, labels = spec.load_data(p)
        info = {"source": str(p), "format": p.suffix or "text", "samples": _count(batches),
                "labels": "from the file" if labels is not None else "none"}
    else:
        from sqexport.models.tensor_data import load_tensor_data

        batches, labels = load_tensor_data(p, spec)
        info = {"source": str(p), "format": p.suffix, "samples": _count(batches),
                "labels": "'labels' array" if labels is not None else "none"}
    if labels is not None:
        labels = check_labels(p, labels, _count(batches), num_classes(spec))
    return batches, labels, info


def load_data_file(path: str, spec: ModelSpec, prep: ImagePrep = ImagePrep()) -> tuple[list[dict], object]:
    """(batches, labels or None) from a user data file or image folder, in the model's own format."""
    batches, labels, _ = _load(path, spec, prep)
    return batches, labels


def _count(batches: list[dict]) -> int:
    return sum(len(next(iter(b.values()))) for b in batches)


def _concat(batches: list[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _batches(arrays: dict) -> list[dict]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + BATCH_SIZE] for k, v in arrays.items()} for i in range(0, n, BATCH_SIZE)]


def _check_classes(spec: ModelSpec, labels, info: dict) -> None:
    if labels is None or spec.task != "image-classification":
        return
    out = spec.torch_outputs(spec.model, {k: v[:1] for k, v in spec.example_inputs.items()})[0]
    if len(info["class_names"]) > out.shape[-1]:
        raise DataError(f"{info['source']} has {len(info['class_names'])} class folders; the model outputs "
                        f"{out.shape[-1]} classes")


def _holdout(split: Split, keep_eval: bool) -> tuple[Split, Split]:
    """Split one data set: every 4th sample is evaluation data (or calibration when the user gave
    eval data only), the rest the other role. Fewer than 2 samples are used for both."""
    batches, labels, info = split
    arrays = _concat(batches)
    n = len(next(iter(arrays.values())))
    if n // info.get("views", 1) < HOLDOUT_EVERY:  # no image i with i % 4 == 3: one side would be empty
        note = dict(info, split=SHARED_SPLIT, shared=True)
        return (batches, labels, note), (batches, labels, note)
    # views of one image (--views) stay on one side: the split is by image
    held = (np.arange(n) // info.get("views", 1)) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    part = lambda mask: (_batches({k: v[mask] for k, v in arrays.items()}),  # noqa: E731
                         labels[mask] if labels is not None else None)
    small, rest = part(held), part(~held)
    rule = (f"samples i with i % {HOLDOUT_EVERY} == {HOLDOUT_EVERY - 1}" if info.get("views", 1) == 1 else
            f"the views of images i with i % {HOLDOUT_EVERY} == {HOLDOUT_EVERY - 1}")
    small_info = dict(info, samples=int(held.sum()), split=f"held out from {info['source']}: {rule}")
    rest_info = dict(info, samples=int(n - held.sum()), split=f"{info['source']} without the held-out {rule}")
    if keep_eval:  # the user's data is eval data: calibrate on the small part
        return (*small, small_info), (*rest, rest_info)
    return (*rest, rest_info), (*small, small_info)


def _synthetic(spec: ModelSpec, seed: int, offset: int) -> Split:
    rng = np.random.default_rng([seed, offset])  # calibration and eval draw different samples
    arrays = {}
    for name in spec.input_names:
        shape = (SYNTHETIC_SAMPLES,) + spec.example_inputs[name].shape[1:]
        dtype = spec.example_inputs[name].dtype
        arrays[name] = (rng.random(shape, dtype=np.float32).astype(dtype) if np.issubdtype(dtype, np.floating)
                        else rng.integers(0, 10, shape).astype(dtype))
    info = {"source": "synthetic", "samples": SYNTHETIC_SAMPLES, "labels": "none",
            "distribution": f"uniform [0, 1) (integers: [0, 10)), seed {seed}"}
    return _batches(arrays), None, info


def apply_user_data(spec: ModelSpec, calib_data: str | None, eval_data: str | None,
                    prep: ImagePrep = ImagePrep(), seed: int = 0) -> ModelSpec:
    """The spec with the user's data (and data_info/notes saying where every split came from)."""
    calib = _load(calib_data, spec, prep) if calib_data else None
    evals = _load(eval_data, spec, prep) if eval_data else None
    if prep.given and not any(s is not None and s[2].get("format") == "image folder" for s in (calib, evals)):
        raise ConfigError("--image-size, --mean, --std and --views apply to image-folder data; "
                          "none of --calib-data / --eval-data is a folder")
    own = bool(spec.calib_batches)  # built-in models bring their own splits
    notes = []
    if not own and calib is None and evals is None:
        calib, evals = _synthetic(spec, seed, 0), _synthetic(spec, seed, 1)
        notes.append(SYNTHETIC_NOTE)
    elif not own and (calib is None or evals is None):
        calib, evals = _holdout(calib or evals, keep_eval=calib is None)
        if calib[2].get("shared"):  # the console says what report.json's data section says
            notes.append(f"one data set given ({(calib_data or eval_data)}) of {calib[2]['samples']} sample(s): "
                         f"{SHARED_SPLIT}; the metric is not held-out evidence")
        else:
            notes.append(f"one data set given ({(calib_data or eval_data)}): calibration on {calib[2]['samples']} "
                         f"samples, evaluation on {evals[2]['samples']}, split deterministically (every "
                         f"{HOLDOUT_EVERY}th sample {'calibrates' if eval_data else 'evaluates'}); the two never overlap")
    changes: dict = {"data_info": dict(spec.data_info)}
    if calib is not None:
        changes.update(calib_batches=calib[0], calib_labels=calib[1])
        changes["data_info"]["calib"] = calib[2]
    if evals is not None:
        changes.update(eval_batches=evals[0], eval_labels=evals[1])
        changes["data_info"]["eval"] = evals[2]
    _check_same_classes(changes["data_info"])
    if notes:
        changes["data_info"]["notes"] = notes
    return dataclasses.replace(spec, **changes)


def _check_same_classes(info: dict) -> None:
    calib, evals = info.get("calib", {}), info.get("eval", {})
    a, b = calib.get("class_names"), evals.get("class_names")
    if a and b and a != b:
        raise DataError(f"the calibration and eval image folders name different classes "
                        f"({', '.join(a[:4])} ... vs {', '.join(b[:4])} ...)")
