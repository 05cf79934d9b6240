"""The deployment targets a recipe, the CLI and the runtime checks accept (one registry).

Adding a target = one `register_target(Target(...))` here, then what it changes: weight range
(runtime_check/isa.py weight_qmax), sessions (runtime_check/session.py) and packaging steps in the
pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqexport.contracts.errors import ConfigError

__all__ = ["Target", "register_target", "get_target", "target_names"]


@dataclass(frozen=True)
class Target:
    name: str
    summary: str


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


register_target(Target("cpu", "onnxruntime CPUExecutionProvider on this host, all graph optimizations"))
register_target(Target("mobile", "a phone app: ARM int8 (full-range weights), fixed shapes, model.ort, app bundle"))
