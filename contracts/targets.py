"""The deployment targets a recipe, the CLI and the runtime checks accept (one registry).

A target carries its behaviour as data: the code asks `get_target(name).app_bundle`, never
`name == "mobile"`. Adding a target = one `register_target(Target(...))` here; a new kind of
behaviour = one field here and the one place that reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqexport.contracts.errors import ConfigError

__all__ = ["Target", "register_target", "get_target", "target_names", "bundle_target_names"]


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    # where the int8 kernels run: "host" = this machine's CPU, whose ISA sets the weight range (x86
    # without VNNI saturates full-range weights); "arm" = ARM kernels, which widen before adding,
    # so full-range weights are exact whatever host builds the model
    int8_kernels: str = "host"
    # the shipped model has fixed input shapes (--input-shape or the model's example), because
    # mobile runtimes plan their memory once
    fixed_shapes: bool = False
    # model.ort, its operator config, the app bundle and the ARM64 / mobile-runtime checks
    app_bundle: bool = False

    def __post_init__(self):
        if self.int8_kernels not in ("host", "arm"):
            raise ValueError(f"target {self.name}: int8_kernels must be 'host' or 'arm'")


_TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    _TARGETS[target.name] = target
    return target


def get_target(name: str) -> Target:
    if name not in _TARGETS:
        raise ConfigError(f"unknown target '{name}'; known: {', '.join(target_names())}")
    return _TARGETS[name]


def target_names() -> list[str]:
    return list(_TARGETS)


def bundle_target_names() -> list[str]:
    """Targets `sqexport package` builds an app bundle for."""
    return [name for name, t in _TARGETS.items() if t.app_bundle]


register_target(Target("cpu", "onnxruntime CPUExecutionProvider on this host, all graph optimizations"))
register_target(Target("mobile", "a phone app: ARM int8 (full-range weights), fixed shapes, model.ort, app bundle",
                       int8_kernels="arm", fixed_shapes=True, app_bundle=True))
