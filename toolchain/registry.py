"""Name -> (config class, handler) registry, one namespace per kind ("prune", "transform",
"quantize", and "observer").

Every CLI choice, recipe stage and Python call resolves through here, so a listed method is a
registered method, and a miss names the known ones. This module imports no method: method modules
import `register` from here, and toolchain/builtin_methods.py imports every built-in method module
(the one list). Code that looks methods up imports toolchain.builtin_methods, which re-exports
the query functions below once everything is registered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from sqexport.contracts.errors import ConfigError
from sqexport.toolchain.settings import check_config_params

__all__ = ["StageEntry", "register", "lookup", "names", "config_to_dict", "config_from_dict", "entries"]


@dataclass(frozen=True)
class StageEntry:
    kind: str
    name: str
    config_cls: type
    handler: Callable[..., Any]
    summary: str


_REGISTRY: dict[str, dict[str, StageEntry]] = {}


def register(kind: str, name: str, config_cls: type, summary: str):
    """Decorator registering `handler(model, config, ctx)` for `kind.name` (toolchain/stages.py)."""

    if getattr(config_cls, "kind", kind) != kind:  # a programming error, caught at import time
        raise TypeError(f"{config_cls.__name__}.kind is '{config_cls.kind}', registered as '{kind}'")

    def wrap(handler):
        _REGISTRY.setdefault(kind, {})[name] = StageEntry(kind, name, config_cls, handler, summary)
        return handler

    return wrap


def lookup(kind: str, name: str) -> StageEntry:
    known = _REGISTRY.get(kind, {})
    if name not in known:
        raise ConfigError(f"unknown {kind} method '{name}'; known: {', '.join(sorted(known))}")
    return known[name]


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))


def entries() -> list[StageEntry]:
    return [e for kind in sorted(_REGISTRY) for e in _REGISTRY[kind].values()]


def config_to_dict(kind: str, name: str, config: Any) -> dict:
    return {"type": f"{kind}.{name}", "version": getattr(config, "VERSION", 1),
            "params": dataclasses.asdict(config)}


def config_from_dict(data: dict) -> tuple[str, str, Any]:
    """Inverse of config_to_dict; unknown params are a ConfigError, not silently dropped."""
    if not isinstance(data, dict):
        raise ConfigError(f"a stage must be a mapping with a type like 'prune.magnitude', got {data!r}")
    unknown = sorted(str(k) for k in set(data) - {"type", "version", "params"})
    if unknown:
        raise ConfigError(f"stage {data.get('type')!r}: unknown key(s) {', '.join(unknown)}; known: params, type, version")
    try:
        if not isinstance(data["type"], str):
            raise ValueError
        kind, name = data["type"].split(".", 1)
    except (KeyError, ValueError):
        raise ConfigError(f"stage needs a type like 'prune.magnitude', got {data!r}") from None
    entry = lookup(kind, name)
    params = check_config_params(entry.config_cls, data.get("params"), f"{kind}.{name}")
    try:
        return kind, name, entry.config_cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind}.{name}: {exc}") from None
