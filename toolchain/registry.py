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

from contracts.errors import ConfigError

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
    try:
        kind, name = str(data["type"]).split(".", 1)
    except (KeyError, ValueError):
        raise ConfigError(f"stage needs a type like 'prune.magnitude', got {data!r}") from None
    entry = lookup(kind, name)
    params = dict(data.get("params") or {})
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(f"{kind}.{name}: unknown parameter(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    try:
        return kind, name, entry.config_cls(**params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind}.{name}: {exc}") from None
