"""The Python API: `sqexport.export`, `sqexport.check` and `sqexport.package`.

Each function runs what its CLI command runs (toolchain/export_run.py, check_run.py, packaging.py)
and turns the outcome into Python terms: a typed, read-only result instead of printed lines, and
exceptions instead of exit codes. Bad input raises an `InputError` subclass (exit 2 on the command
line); a failed gate raises `GateFailed` carrying the result (exit 1), after the output and its
report are written, unless `raise_on_gate=False` asks for the result alone.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqexport.contracts.errors import ConfigError, GateFailed
from sqexport.contracts.targets import bundle_target_names, get_target, target_names
from sqexport.toolchain.export_options import ExportOptions
from sqexport.toolchain.report_view import Bundle, CheckReport, Report
from sqexport.toolchain.settings import check_setting

__all__ = ["export", "check", "package"]

log = logging.getLogger("sqexport")


def export(model: Any, *, target: str | None = None, prune: str | None = None, sparsity: float | None = None,
           quant: str | None = None, calib_data: str | os.PathLike | None = None,
           eval_data: str | os.PathLike | None = None, output: str | os.PathLike | None = None,
           recipe: str | os.PathLike | None = None, seed: int | None = None, threads: int | None = None,
           input_shape: Any = None, example_inputs: Any = None,
           max_accuracy_drop: float | None = None, min_speedup: float | None = None,
           max_latency_ms: float | None = None, nm: str | None = None, variant: str | None = None,
           rank_energy: float | None = None, lowrank_eps: float | None = None, observer: str | None = None,
           task: str | None = None, trust_remote_code: bool = False, recover: bool | None = None,
           recover_steps: int | None = None, recover_minutes: float | None = None,
           recover_data: str | os.PathLike | None = None, auto: bool = False, auto_minutes: float | None = None,
           ray: str | None = None, image_size: str | Sequence[int] | None = None,
           mean: str | Sequence[float] | None = None, std: str | Sequence[float] | None = None,
           views: int | None = None, progress: bool = False, raise_on_gate: bool = True) -> Report:
    """Prune, quantize, export to ONNX and verify a model; write its output folder and report.

    The same run as `sqexport export MODEL ...`: every keyword is the command's long flag
    (`--max-accuracy-drop` -> `max_accuracy_drop`), and the same seed gives the same report.
    None means "not given": a `recipe` file's value stands, else the command line's default.

    Args:
        model: a built-in name (`"digits-cnn"`, see `sqexport models`), `"pkg.module:factory"`, a
            TorchScript `.pt` / ExportedProgram `.pt2` file, a Hugging Face folder, or a
            `torch.nn.Module` object (give `input_shape` or `example_inputs` with it; the run
            works on a copy, so the module is not changed).
        target: `"cpu"` (default) or `"mobile"` (adds model.ort and the app bundle).
        prune: a pruning method (`sqexport methods`) or `"none"`; default magnitude (none for
            transformers).
        sparsity: fraction of prunable weights to remove, in [0, 1); default: chosen within the
            accuracy gate (magnitude, structured).
        quant: a quantization method (`"int8"` static QDQ by default, `"int8-dynamic"`, ...) or
            `"none"` for an FP32 export.
        calib_data: calibration data file or image folder (formats as `--calib-data`).
        eval_data: evaluation data file or image folder (formats as `--eval-data`).
        output: the output folder; default `./sqexport-out/<model name>`.
        recipe: a YAML recipe; the keywords given here override its values.
        seed: the run's seed (default 0).
        threads: onnxruntime intra-op threads for the checks; default all cores.
        input_shape: example input of a user model, batch first: `(1, 3, 224, 224)`,
            `"1x3x224x224"`, `{"ids": (1, 128)}` or a list of `"NAME=1x128"` strings. With
            `target="mobile"` it fixes the mobile model's shapes (any model).
        example_inputs: for an `nn.Module` instead of `input_shape`: a tensor, a tuple of tensors
            in forward()'s order, or a dict by parameter name (numpy arrays work too).
        max_accuracy_drop, min_speedup, max_latency_ms: the gates (`--max-accuracy-drop` ...).
        nm, variant, rank_energy, lowrank_eps, observer: method settings (`--nm 2:4`, ...).
        task: overrides the task detected from a Hugging Face config.
        trust_remote_code: let a Hugging Face folder run its own code (auto_map).
        recover, recover_steps, recover_minutes, recover_data: distillation after pruning.
        auto, auto_minutes, ray: the `--auto` search, its budget and its Ray cluster.
        image_size, mean, std, views: image-folder preprocessing: `(224, 224)` or `"224x224"`,
            `(0.485, 0.456, 0.406)` or `"0.485,0.456,0.406"`.
        progress: show progress on stderr as the command line does (default: silent; notes such
            as "synthetic calibration data" go to the `sqexport` logger as warnings).
        raise_on_gate: raise GateFailed when a gate fails (default); False returns the report,
            whose `passed` is then False.

    Returns:
        Report: the report written to `<output>/report.json`; `report.output_dir` is the folder.

    Raises:
        ConfigError: an option, the recipe or the model's example input is invalid.
        ModelLoadError: the model cannot be found or loaded.
        DataError: calibration or evaluation data cannot be used.
        ExportError: the model cannot be exported to ONNX.
        OutputError: the output folder cannot be written (or holds files sqexport did not write).
        GateFailed: a gate failed; the output folder and report were written and
            `exc.report` holds the Report (only with `raise_on_gate=True`).
        All the bad-input errors derive from InputError.
    """
    from sqexport.toolchain.export_run import gate_failure, run_export
    from sqexport.toolchain.progress import make_progress
    from sqexport.toolchain.quiet import quiet_libraries

    options = ExportOptions(
        target=target, prune=prune, sparsity=sparsity, nm=nm, variant=variant, rank_energy=rank_energy,
        lowrank_eps=lowrank_eps, quant=quant, observer=observer, task=task, trust_remote_code=trust_remote_code,
        recover=recover, recover_steps=recover_steps, recover_minutes=recover_minutes, recover_data=recover_data,
        auto=auto, auto_minutes=auto_minutes, calib_data=calib_data, eval_data=eval_data,
        input_shape=_shape_texts(input_shape), image_size=_size_text(image_size), mean=_floats_text("mean", mean),
        std=_floats_text("std", std), views=views, max_accuracy_drop=max_accuracy_drop, min_speedup=min_speedup,
        max_latency_ms=max_latency_ms, threads=threads, recipe=recipe, output=output, seed=seed, ray=ray,
        example_inputs=example_inputs)
    _check_flag("raise_on_gate", raise_on_gate)
    _check_flag("progress", progress)
    quiet_libraries()

    def note(shown, text):
        if progress:
            shown.message(f"! {text}")
        else:
            log.warning("%s", text)

    run = run_export(model, options, lambda: make_progress(not progress), note)
    report = Report.from_dict(run.report, run.outdir)
    if raise_on_gate and not report.passed:
        raise GateFailed(gate_failure(run.report, run.outdir), report)
    return report


def check(model: str | os.PathLike, *, baseline: str | os.PathLike | None = None,
          eval_data: str | os.PathLike | None = None, threads: int | None = None,
          max_accuracy_drop: float | None = None, min_speedup: float | None = None,
          max_latency_ms: float | None = None, arch: str | None = None, target: str = "cpu",
          image_size: str | Sequence[int] | None = None, mean: str | Sequence[float] | None = None,
          std: str | Sequence[float] | None = None, raise_on_gate: bool = True) -> CheckReport:
    """Verify an existing .onnx or .ort model: accuracy against a baseline, latency and gates.

    The same check as `sqexport check MODEL ...`. A model inside an sqexport output folder is
    compared with that folder's baseline.onnx when no `baseline` is given.

    Args:
        model: the .onnx or .ort file.
        baseline: the FP32 reference .onnx.
        eval_data: .npy/.npz inputs (optional `labels`), .txt/.jsonl text (with a tokenizer beside
            the model) or an image folder; default: seeded synthetic inputs.
        threads: onnxruntime intra-op threads; default all cores.
        max_accuracy_drop, min_speedup, max_latency_ms: the gates.
        arch: `"arm64"` also runs the model on aarch64 onnxruntime under emulation (`make arm64`).
        target: `"mobile"` also reports which nodes NNAPI and CoreML would take (`mobile_usability`).
        image_size, mean, std: image-folder preprocessing, as for `export`.
        raise_on_gate: raise GateFailed when a gate fails (default); False returns the result.

    Returns:
        CheckReport: what `sqexport check --json` prints, as typed attributes.

    Raises:
        ConfigError, ModelLoadError, DataError: bad options, model or data (all InputError).
        GateFailed: a gate failed; `exc.report` holds the CheckReport (with `raise_on_gate=True`).
    """
    from sqexport.runtime_check.gates import Gates
    from sqexport.toolchain.check_run import run_check
    from sqexport.toolchain.export_options import image_prep
    from sqexport.toolchain.export_run import failed_checks
    from sqexport.toolchain.quiet import quiet_libraries

    model, baseline, eval_data = (_path(n, v) for n, v in (("model", model), ("baseline", baseline),
                                                           ("eval_data", eval_data)))
    if model is None:
        raise ConfigError("model must be the path of an .onnx or .ort file, got None")
    settings = {"threads": threads, "max_accuracy_drop": max_accuracy_drop, "min_speedup": min_speedup,
                "max_latency_ms": max_latency_ms}
    settings = {k: check_setting(k, v) if v is not None else None for k, v in settings.items()}
    if arch not in (None, "arm64"):
        raise ConfigError(f"arch must be None or 'arm64', got {arch!r}")
    if not isinstance(target, str):
        raise ConfigError(f"target must be one of {', '.join(target_names())}, got {target!r}")
    get_target(target)  # an unknown name: ConfigError naming the known ones
    _check_flag("raise_on_gate", raise_on_gate)
    prep = image_prep(_size_text(image_size), _floats_text("mean", mean), _floats_text("std", std))
    quiet_libraries()
    gates = Gates(settings["max_accuracy_drop"], settings["min_speedup"], settings["max_latency_ms"])
    result = CheckReport.from_dict(run_check(model, baseline, eval_data, prep, settings["threads"], gates, arch,
                                             target))
    if raise_on_gate and not result.passed:
        raise GateFailed(f"gate failed: {failed_checks(result['checks'])}", result)
    return result


def package(output_dir: str | os.PathLike, *, target: str = "mobile",
            output: str | os.PathLike | None = None) -> Bundle:
    """Build the mobile app bundle (`<name>-mobile.zip`) from an export's output folder.

    The same as `sqexport package OUTPUT_DIR --target mobile`; the folder must come from an export
    with `target="mobile"`.

    Args:
        output_dir: the output folder of `export(..., target="mobile")`.
        target: what to package for; `"mobile"` is the one packaging target.
        output: the zip to write; default `<output_dir>/<name>-mobile.zip`. An existing file is
            replaced only when sqexport's manifest shows sqexport wrote it.

    Returns:
        Bundle: the zip's path, size in bytes and the files in it.

    Raises:
        ConfigError: the folder is not a mobile export, or the zip cannot be written there.
    """
    from sqexport.toolchain.packaging import package_outdir

    if target not in bundle_target_names():
        raise ConfigError(f"package builds an app bundle: target must be one of {', '.join(bundle_target_names())}, "
                          f"got {target!r}")
    folder = _path("output_dir", output_dir)
    if folder is None:
        raise ConfigError("output_dir must be the output folder of an export with target='mobile', got None")
    info = package_outdir(Path(folder), Path(_path("output", output)) if output is not None else None)
    return Bundle(path=Path(info["path"]), bytes=info["bytes"], files=tuple(info["files"]))


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")


def _path(name: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise ConfigError(f"{name} must be a path, got {value!r}")
    return os.fsdecode(value)


def _shape_texts(value) -> tuple[str, ...]:
    """input_shape in the command line's words: one "1x3x224x224" or "NAME=1x128" per input, so
    the CLI's parser (contracts/shapes.py) checks it with the CLI's messages."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Mapping):
        return tuple(f"{name}={_dims_text('input_shape', dims)}" for name, dims in value.items())
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return (_dims_text("input_shape", value),)


def _dims_text(name: str, dims) -> str:
    if isinstance(dims, str):
        return dims
    if not isinstance(dims, Sequence) or not dims or not all(isinstance(d, int) and not isinstance(d, bool)
                                                              for d in dims):
        raise ConfigError(f"{name} must be dimensions like (1, 3, 224, 224) or '1x3x224x224', got {dims!r}")
    return "x".join(str(d) for d in dims)


def _size_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and len(value) != 2:
        raise ConfigError(f"image_size must be (height, width) or 'HxW', got {value!r}")
    return _dims_text("image_size", value)


def _floats_text(name: str, value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, Sequence) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
        raise ConfigError(f"{name} must be numbers like (0.5, 0.5, 0.5) or '0.5,0.5,0.5', got {value!r}")
    return ",".join(repr(float(v)) for v in value)
