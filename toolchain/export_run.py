"""One export from MODEL and its options to a finished output folder: what `sqexport export` and
`sqexport.export()` both run. Checks that need no model come first (options, recipe, output
folder, shapes), so bad input fails in a second; then the model and its data load and the
pipeline (or --auto's search) writes the folder. Gates are not judged here: the report says
whether they passed, and each caller says so in its own way (exit 1, GateFailed)."""
from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqexport.contracts.errors import ConfigError, ModelLoadError
from sqexport.contracts.progress import NULL_PROGRESS, Progress
from sqexport.contracts.targets import get_target
from sqexport.contracts.units import format_value
from sqexport.toolchain.export_options import (ExportOptions, auto_config, build_recipe, image_prep,
                                               input_shapes, without_recovery)

__all__ = ["ExportRun", "run_export", "default_output", "model_label", "gate_failure", "failed_checks"]


@dataclass(frozen=True)
class ExportRun:
    report: dict  # what report.json holds
    outdir: Path  # the output folder as the caller named it (or the default)


def run_export(model, options: ExportOptions,
               progress: Callable[[], AbstractContextManager[Progress]] = lambda: nullcontext(NULL_PROGRESS),
               on_note: Callable[[Progress, str], None] = lambda progress, note: None) -> ExportRun:
    """Export `model` (a reference string or a torch.nn.Module) as `options` say. `progress` opens
    the progress display once the checks that need no model have passed; `on_note` hears what the
    run must say even when quiet (e.g. synthetic calibration data)."""
    from sqexport.toolchain import pipeline
    from sqexport.toolchain.output_folder import check_output
    from sqexport.toolchain.stage_meter import measured_stage

    model = _model_ref(model)
    auto = auto_config(options)
    if auto is not None:  # recovery settings went into AutoConfig; the search builds its own stages
        options = without_recovery(options)
    recipe = build_recipe(options)
    outdir = Path(options.output) if options.output else default_output(model)
    check_output(outdir)  # before the slow part: a bad output folder fails in a second
    shapes = input_shapes(options.input_shape)
    # a built-in or Hugging Face model knows its inputs: --input-shape only fixes its mobile shapes
    fixed_shapes = get_target(recipe.target).fixed_shapes
    mobile_only = fixed_shapes and not _is_user_model(model)
    prep = image_prep(options.image_size, options.mean, options.std, options.views, options.seed)
    with progress() as shown:
        with measured_stage(shown, f"load {model_label(model)}"):
            spec = _load(model, options, None if mobile_only else shapes)
            if spec.default_prune != "magnitude" or spec.quant_defaults:
                recipe = build_recipe(options, spec.default_prune, spec.quant_defaults)
            spec = _with_user_data(spec, options.calib_data, options.eval_data, prep, recipe.seed)
        for note in spec.data_info.get("notes", []):
            on_note(shown, note)
        if auto is not None and options.ray:
            from sqexport.toolchain.auto_ray import run_auto_on_ray

            report = run_auto_on_ray(options.ray, recipe, spec, outdir, shown, auto)
        elif auto is not None:
            from sqexport.toolchain.search import run_auto

            report = run_auto(recipe, spec, outdir, shown, auto)
        else:
            report = pipeline.run(recipe, spec, outdir, shown, shapes if fixed_shapes else None,
                                  model_disposable=True)
    return ExportRun(report, outdir)


def gate_failure(report: dict, outdir: Path) -> str:
    """The one line that says which gates failed, by how much, and where the report is."""
    return f"gate failed: {failed_checks(report['checks'])}; report written to {outdir}"


def failed_checks(checks: list[dict]) -> str:
    """`accuracy_drop 3.1 points (limit 1.00 points), ...` for the checks that failed."""
    return ", ".join(f"{c['name']} {format_value(c['value'], c['unit'])} "
                     f"(limit {format_value(c['limit'], c['unit'])})" for c in checks if not c["passed"])


def _is_module(model) -> bool:
    from torch import nn

    return isinstance(model, nn.Module)


def _model_ref(model):
    """A reference string (paths as given), or the nn.Module itself."""
    if isinstance(model, str) or _is_module(model):
        return model
    if isinstance(model, os.PathLike):
        return os.fspath(model)
    raise ConfigError(f"model must be a built-in name, a path, 'pkg.module:factory' or a torch.nn.Module, "
                      f"got a {type(model).__name__}")


def model_label(model) -> str:
    """How a model is named in progress lines and the default output folder."""
    return type(model).__name__ if _is_module(model) else model


def default_output(model) -> Path:
    """./sqexport-out/NAME; `.` and `..` name the folder they stand for. A reference with no name
    at all ('' or '/') is a bad MODEL, said as such (not as a complaint about sqexport-out)."""
    from sqexport.models.zoo import BUILTIN_MODELS

    if _is_module(model):
        return Path("sqexport-out") / type(model).__name__
    name = Path(model.rstrip("/")).name if model.strip() else ""
    if name in ("", ".", "..") and model.strip():
        name = Path(os.path.abspath(model)).name
    if not name:
        raise ModelLoadError(f"cannot load {model!r}: not a built-in name, a Hugging Face folder (config.json), a "
                             f"TorchScript .pt, an ExportedProgram .pt2 or pkg.module:factory; built-in models: "
                             f"{', '.join(sorted(BUILTIN_MODELS))}")
    return Path("sqexport-out") / name.replace(":", "_")


def _is_user_model(model) -> bool:
    from sqexport.models.user_model import is_user_model
    from sqexport.models.zoo import BUILTIN_MODELS

    return _is_module(model) or (model not in BUILTIN_MODELS and is_user_model(model))


def _load(model, options: ExportOptions, shapes: dict | None):
    if not _is_module(model):
        if options.example_inputs is not None:
            raise ConfigError("example_inputs gives an nn.Module's example input; for a model reference "
                              "use input_shape")
        from sqexport.models.zoo import load_model

        return load_model(model, options.task, shapes, options.trust_remote_code)
    if options.task:
        raise ModelLoadError("task applies to Hugging Face folders; an nn.Module's task follows its output "
                             "(2-D: classification)")
    if options.trust_remote_code:
        raise ModelLoadError("trust_remote_code applies to Hugging Face folders whose config names their own "
                             "code (auto_map)")
    from sqexport.models.user_model import load_module_model

    return load_module_model(model, shapes, options.example_inputs)


def _with_user_data(spec, calib_data, eval_data, prep, seed):
    from sqexport.models.data import apply_user_data

    return apply_user_data(spec, calib_data, eval_data, prep, seed)
