"""The options of one export, as `sqexport export` and `sqexport.export()` both take them.

An `ExportOptions` holds only what the caller asked for: None (False for the on/off switches, ()
for input_shape) means "not given", so a recipe file's value stands and the model's own defaults
apply, exactly as a flag not typed on the command line. Field names are the CLI's parameter names
(the long flag, `_` for `-`). Values are checked on construction with the same rules as the flags
(the click types check the CLI's first, so there the checks here never fire).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from typing import Any

from sqexport.contracts.errors import ConfigError
from sqexport.contracts.targets import target_names
from sqexport.toolchain.settings import SETTINGS, check_setting, check_type

__all__ = ["ExportOptions", "build_recipe", "auto_config", "without_recovery", "image_prep",
           "input_shapes", "option_values"]

_PATHS = ("recover_data", "calib_data", "eval_data", "recipe", "output")
_TEXTS = ("nm", "image_size", "mean", "std", "ray")


def _settings() -> tuple[str, ...]:
    """The options with a typed range (settings.SETTINGS), checked on construction."""
    return tuple(f.name for f in fields(ExportOptions) if f.name in SETTINGS)


@dataclass(frozen=True)
class ExportOptions:
    target: str | None = None
    prune: str | None = None
    sparsity: float | None = None
    nm: str | None = None
    variant: str | None = None
    rank_energy: float | None = None
    lowrank_eps: float | None = None
    quant: str | None = None
    observer: str | None = None
    task: str | None = None
    trust_remote_code: bool = False
    recover: bool | None = None
    recover_steps: int | None = None
    recover_minutes: float | None = None
    recover_data: str | None = None
    auto: bool = False
    auto_minutes: float | None = None
    calib_data: str | None = None
    eval_data: str | None = None
    input_shape: tuple[str, ...] = ()  # as typed: "1x3x224x224" or "NAME=1x128" per input
    image_size: str | None = None
    mean: str | None = None
    std: str | None = None
    views: int | None = None
    max_accuracy_drop: float | None = None
    min_speedup: float | None = None
    max_latency_ms: float | None = None
    threads: int | None = None
    recipe: str | None = None
    output: str | None = None
    seed: int | None = None
    ray: str | None = None
    # the Python API's nn.Module input: a tensor, a tuple of tensors or a dict by input name
    example_inputs: Any = None

    def __post_init__(self):
        for name in _settings():
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_setting(name, getattr(self, name)))
        for name in _PATHS:
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, bytes, os.PathLike)):
                    raise ConfigError(f"{name} must be a path, got {value!r}")
                object.__setattr__(self, name, os.fsdecode(value))
        for name in _TEXTS:
            check_type(getattr(self, name), str | None, name)
        for name in ("trust_remote_code", "auto"):
            check_type(getattr(self, name), bool, name)
        check_type(self.recover, bool | None, "recover")
        if not isinstance(self.input_shape, tuple) or not all(isinstance(s, str) for s in self.input_shape):
            raise ConfigError(f"input_shape must be shape strings like '1x3x224x224', got {self.input_shape!r}")
        self._check_choices()
        self._check_counts()

    def _check_choices(self) -> None:
        from sqexport.contracts.tasks import hf_task_names  # imports numpy: only when choices are checked

        _choice("target", self.target, target_names)
        _choice("task", self.task, hf_task_names)
        if self.prune is not None:
            _choice("prune", self.prune, lambda: _method_names("prune") + ["none"])
        if self.quant is not None:
            _choice("quant", self.quant, lambda: _method_names("quantize") + ["none"])
        if self.observer is not None:
            _choice("observer", self.observer, lambda: ["auto"] + _method_names("observer"))
        if self.variant is not None:
            from sqexport.toolchain.pruning.sensitivity_stage import SENSITIVITY_VARIANTS

            _choice("variant", self.variant, lambda: list(SENSITIVITY_VARIANTS))

    def _check_counts(self) -> None:
        if self.recover_steps is not None:
            check_type(self.recover_steps, int, "recover_steps")
            if self.recover_steps < 1:
                raise ConfigError(f"recover_steps must be at least 1, got {self.recover_steps}")
        if self.views is not None:
            check_type(self.views, int, "views")
            if not 1 <= self.views <= 64:
                raise ConfigError(f"views must be in [1, 64], got {self.views}")
        for name in ("recover_minutes", "auto_minutes"):
            value = getattr(self, name)
            if value is not None:
                value = check_type(value, float, name)
                if not (math.isfinite(value) and value > 0):
                    raise ConfigError(f"{name} must be a finite number > 0, got {value}")

    def given(self) -> list[str]:
        """The names of the options set (what a command line would have typed)."""
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, False, ())]


def _method_names(kind: str) -> list[str]:
    from sqexport.toolchain.builtin_methods import names

    return names(kind)


def _choice(name: str, value, known) -> None:
    if value is None:
        return
    options = known()
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}; got {value!r}")


def option_values(values: dict) -> ExportOptions:
    """ExportOptions from a mapping of given options (the CLI's typed flags), tuples as typed."""
    return ExportOptions(**{k: tuple(v) if k == "input_shape" else v for k, v in values.items()})


def build_recipe(options: ExportOptions, default_prune: str = "magnitude", quant_defaults: dict | None = None):
    """The recipe file (if any), then every option given on top of it."""
    # the options laid over a recipe file are declared once, on Overrides
    from sqexport.toolchain.overrides import OVERRIDE_KEYS, Overrides, apply_overrides
    from sqexport.toolchain.recipe import load_recipe

    typed = {k: getattr(options, k) for k in OVERRIDE_KEYS if getattr(options, k) is not None}
    if not options.recipe:  # without a recipe file the CLI's own defaults apply
        typed.setdefault("seed", 0)
        typed.setdefault("target", "cpu")
    recipe = load_recipe(options.recipe) if options.recipe else None
    return apply_overrides(recipe, Overrides(**typed), default_prune, quant_defaults)


def auto_config(options: ExportOptions):
    """--auto's settings, or None without --auto; options naming what it chooses itself are errors."""
    if options.ray:
        from sqexport.toolchain.ray_cluster import parse_ray_address, require_ray

        if not options.auto:
            raise ConfigError("--ray distributes --auto's candidates; a single export is one job (for many, "
                              "use sqexport sweep --ray)")
        require_ray()
        parse_ray_address(options.ray)
    if not options.auto:
        if options.auto_minutes is not None:
            raise ConfigError("--auto-minutes needs --auto")
        return None
    from sqexport.toolchain.search import AutoConfig, check_auto_flags

    check_auto_flags([k for k in options.given() if k not in ("recover", "ray")])
    kwargs = {"recover": options.recover is not False, "recover_data": options.recover_data}
    if options.auto_minutes is not None:
        kwargs["minutes"] = options.auto_minutes
    return AutoConfig(**kwargs)


def without_recovery(options: ExportOptions) -> ExportOptions:
    """--auto took the recovery settings into its AutoConfig; the search builds its own stages."""
    return replace(options, recover=None, recover_data=None)


def input_shapes(values) -> dict:
    from sqexport.contracts.shapes import parse_input_shapes

    return parse_input_shapes(values)


def image_prep(image_size: str | None, mean: str | None, std: str | None, views: int | None = None,
               seed: int | None = None):
    """How image-folder data is resized and normalized (--image-size, --mean, --std, --views)."""
    from sqexport.models.image_data import ImagePrep, parse_floats, parse_size

    return ImagePrep(parse_size(image_size), parse_floats("--mean", mean), parse_floats("--std", std),
                     views, seed or 0)
