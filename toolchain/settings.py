"""One typed schema for every setting, whether it comes from a flag, a recipe or Python.

A flag (`--seed -1`), a recipe key (`seed: -1`) and a stage parameter (`n: 1.5`) are checked by the
same code with the same limits, and a bad value is a ConfigError (exit 2, one line) naming it:
never a TypeError deep inside a stage (exit 3) and never a silently accepted NaN.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, replace
from typing import Any

from sqexport.contracts.errors import ConfigError

__all__ = ["Setting", "SETTINGS", "check_setting", "check_type", "check_config_params", "max_threads",
           "SEED_MAX"]

SEED_MAX = 2 ** 32 - 1  # numpy's seed range


def max_threads() -> int:
    """More threads than 4 per core only add contention (100000 made onnxruntime hang)."""
    return 4 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class Setting:
    """A scalar setting: its type and range. `low_open`/`high_open` exclude the bound itself."""

    name: str
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def range_text(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}" if self.kind is float else str(self.low)
        high = "inf" if self.high is None else f"{self.high:g}" if self.kind is float else str(self.high)
        return f"{'(' if self.low_open or self.low is None else '['}{low}, {high}{')' if self.high_open or self.high is None else ']'}"

    def check(self, value: Any, label: str | None = None) -> Any:
        label = self.name if label is None else label
        value = check_type(value, self.kind, label)
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            what = "an integer" if self.kind is int else "a number"
            raise _error(label, f"must be {what} in {self.range_text()}, got {value!r}")
        return value


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("seed", int, 0, SEED_MAX),
    Setting("threads", int, 1, None),
    Setting("sparsity", float, 0.0, 1.0, high_open=True),
    Setting("rank_energy", float, 0.0, 1.0, low_open=True),
    Setting("lowrank_eps", float, 0.0, 1.0, low_open=True, high_open=True),
    Setting("max_accuracy_drop", float, 0.0, None),
    Setting("min_speedup", float, 0.0, None, low_open=True),
    Setting("max_latency_ms", float, 0.0, None, low_open=True),
)}


def check_setting(name: str, value: Any, label: str | None = None) -> Any:
    """`value` checked against SETTINGS[name]; threads also against this machine's core count."""
    setting = SETTINGS[name]
    if name == "threads":  # the bound the docs state: 4 per core of this machine
        setting = replace(setting, high=max_threads())
    return setting.check(value, label)


def _error(label: str, text: str) -> ConfigError:
    return ConfigError(f"{label} {text}" if label else text)


def _type_name(kind) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_type(value: Any, kind, label: str) -> Any:
    """`value` if it is of type `kind` (an int is a float; a bool is never a number; floats must be
    finite); `kind` may be an annotation such as `bool | None` or `dict[str, str]`. Other types
    (policy objects that accept a mapping) are left to the config's own checks."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return check_type(value, option, label)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is not None:
        kind = origin
    if kind not in (int, float, bool, str, dict, list):
        return value  # a structured field (e.g. a policy object) validates itself in the config

    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _error(label, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise _error(label, f"must be a finite number, got {value!r}")
        return float(value)
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise _error(label, f"must be an integer, got {value!r}")
    if not isinstance(value, kind):
        raise _error(label, f"must be {_type_name(kind)}, got {value!r}")
    return value


def check_config_params(config_cls: type, params: Any, label: str) -> dict:
    """A stage's `params`: a mapping of the config dataclass's own fields, each of its declared type."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ConfigError(f"{label}: params must be a mapping, got {params!r}")
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(str(k) for k in set(params) - fields)
    if unknown:
        raise ConfigError(f"{label}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    return {k: check_type(v, hints.get(k, typing.Any), f"{label}: {k}") for k, v in params.items()}
